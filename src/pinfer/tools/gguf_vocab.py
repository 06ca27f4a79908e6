"""A Hugging Face byte-level BPE tokenizer as GGUF tokenizer metadata, the way llama.cpp's
convert_hf_to_gguf.py writes it (`_set_vocab_gpt2`): tokenizer.ggml.model = "gpt2", the
token list and types from the transformers tokenizer, merges / special ids / add_bos /
chat template through the gguf package's own SpecialVocab, and tokenizer.ggml.pre.

llama.cpp picks `pre` from a hash of how the tokenizer encodes a test text (a table of
known models). We compare how the tokenizer's pre-tokenizer *splits* a test text with
the pre-tokenizers pinfer's GGUF reader builds for each name, so the name written is
one the reader (and llama.cpp) will split the same way.
"""

from __future__ import annotations

from pathlib import Path

import gguf
from tokenizers import Regex, pre_tokenizers

from pinfer.errors import PinferError
from pinfer.loading.gguf_tokenizer import PRE_TOKENIZERS, PreTokenizerSpec

# One llama.cpp name per distinct split rule (see gguf_tokenizer.PRE_TOKENIZERS).
CANDIDATE_PRE_NAMES = ("smollm", "gpt-2", "llama-bpe", "qwen2", "gpt-4o", "tekken")

# Digits runs, whitespace runs and newlines, contractions in both cases, mixed scripts
# and emoji: the cases on which the candidate split rules differ (as llama.cpp's chktxt).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙 3 33 333 3333 33333 "
    "333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL HelloWorld camelCase ABCdef x1y22z333 /path/to\r\nend"
)


def _split_pieces(pre_tokenizer) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(CHECK_TEXT)]


def _candidate(spec: PreTokenizerSpec):
    # The same pre-tokenizer gguf_tokenizer.build_byte_level_bpe builds for the name.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def detect_pre_tokenizer(tokenizer) -> str:
    """The tokenizer.ggml.pre name whose split rule matches the tokenizer's pre-tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        raise PinferError("the tokenizer has no pre-tokenizer (tokenizer.json); cannot choose tokenizer.ggml.pre")
    pieces = _split_pieces(backend.pre_tokenizer)
    for name in CANDIDATE_PRE_NAMES:
        if _split_pieces(_candidate(PRE_TOKENIZERS[name])) == pieces:
            return name
    raise PinferError(
        "the tokenizer's pre-tokenizer splits text like none of the GGUF pre-tokenizers pinfer knows "
        f"({', '.join(CANDIDATE_PRE_NAMES)}); refusing to write a GGUF file that would tokenize differently"
    )


def _looks_special(token: str) -> bool:
    # llama.cpp's does_token_look_special: added tokens some models forget to mark special.
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def vocab_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and gguf.TokenType per id, as llama.cpp's get_vocab_base lists them:
    ids the tokenizer lacks (the embedding is padded) become unused "[PAD<id>]" tokens."""
    reverse_vocab = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(reverse_vocab) >= vocab_size:
        raise PinferError(
            f"the tokenizer has token id {max(reverse_vocab)} but the model's vocab_size is {vocab_size}"
        )
    added_vocab = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse_vocab.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added_vocab:
            if not added_decoder[i].normalized:
                # llama.cpp expects added tokens pre-normalized: their text as decoding gives it.
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added_decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def check_byte_level_bpe(folder: Path) -> None:
    """Refuse, before any work, tokenizers this writer cannot express (SentencePiece, WordPiece...)."""
    import json

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise PinferError(f"{folder} has no tokenizer.json; only byte-level BPE tokenizers are converted to GGUF")
    spec = json.loads(file.read_text(encoding="utf-8"))
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise PinferError(
            f"{file}: a {model_type} tokenizer without a ByteLevel pre-tokenizer; only byte-level BPE "
            "tokenizers (GGUF tokenizer.ggml.model 'gpt2': Llama 3, SmolLM, Qwen2/3...) are converted"
        )


def add_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> str:
    """Write the tokenizer metadata of the HF folder; returns the tokenizer.ggml.pre name chosen."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    pre = detect_pre_tokenizer(tokenizer)
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return pre
