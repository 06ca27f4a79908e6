"""Build a Hugging Face fast tokenizer straight from a GGUF file's tokenizer metadata.

Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM, Llama 3,
Qwen2/3, Mistral-Nemo...) are assembled with the `tokenizers` library in well under a
second. Everything else goes through transformers' own GGUF conversion, which is
slow (~10 s for a 49k vocabulary) but handles SentencePiece and friends.

Where we differ from transformers' GGUF conversion, we follow llama.cpp and the
models' own tokenizer.json files:
- the pre-tokenizer comes from `tokenizer.ggml.pre` for more names (transformers has
  no "smollm" entry and uses GPT-2 splitting, which differs on whitespace before digits);
- llama3/tekken vocabularies use BPE `ignore_merges`, as their tokenizer.json does;
- control tokens whose text is not byte-level spelled (DeepSeek's "<｜begin▁of▁sentence｜>")
  stay whole special tokens instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from pinfer.errors import ModelLoadError

# llama.cpp's token types (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4

# Split regexes as the models' own tokenizer.json files spell them (llama.cpp's
# llama-vocab.cpp carries hand-adapted copies of the same expressions).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_DIGIT_SPLIT = r"\p{N}"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    splits: tuple[str, ...]  # applied in order, each splitting the previous pieces
    ignore_merges: bool = False  # a piece that is itself a token skips BPE (llama.cpp's ignore_merges)


_SMOLLM = PreTokenizerSpec((_DIGIT_SPLIT, _GPT2_SPLIT))
_GPT2 = PreTokenizerSpec((_GPT2_SPLIT,))
_LLAMA3 = PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True)
_QWEN2 = PreTokenizerSpec((_QWEN2_SPLIT,))
_GPT4O = PreTokenizerSpec((_GPT4O_SPLIT,))
_TEKKEN = PreTokenizerSpec((_TEKKEN_SPLIT,), ignore_merges=True)

# tokenizer.ggml.pre (llama.cpp's names) -> how to split text before BPE, following
# the groupings in llama.cpp's llama-vocab.cpp. Names not listed use the fallback.
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _SMOLLM),
    **dict.fromkeys(["gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"], _GPT2),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe"],
        _LLAMA3,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan"], _QWEN2),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "minimax-m2"], _GPT4O),
    "tekken": _TEKKEN,
}


def load_gguf_tokenizer(path: Path, metadata: Mapping[str, Any]):
    """A transformers tokenizer for the GGUF file at `path`, whose metadata is given."""
    spec = PRE_TOKENIZERS.get(metadata.get("tokenizer.ggml.pre", "default"))
    fast_path = (
        metadata.get("tokenizer.ggml.model") == "gpt2"
        and spec is not None
        and "tokenizer.ggml.merges" in metadata
        and not metadata.get("tokenizer.ggml.add_space_prefix", False)
    )
    if fast_path:
        return build_byte_level_bpe(metadata, spec)
    if (
        metadata.get("general.architecture") == "gemma3"
        and metadata.get("tokenizer.ggml.model") == "llama"
        and "tokenizer.ggml.merges" not in metadata
    ):
        return build_gemma_sentencepiece_bpe(metadata)
    # SentencePiece ("llama"), unigram, WordPiece, a byte-level vocabulary without
    # merges or with a prefix space, or a pre-tokenizer we have no regex for:
    # transformers' converter is slow but knows these cases.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def build_byte_level_bpe(metadata: Mapping[str, Any], spec: PreTokenizerSpec):
    """PreTrainedTokenizerFast for a byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`)."""
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    alphabet = _byte_alphabet()

    vocab: dict[str, int] = {}
    for index, (token, token_type) in enumerate(zip(tokens, token_types)):
        # Regular tokens are spelled in the byte-level alphabet. Added tokens are stored
        # as their literal text (llama.cpp writes "<｜begin▁of▁sentence｜>" or "   " as
        # is); they keep that spelling so the added-token lookup below finds their id.
        if token_type not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
            token = _to_byte_level(token)
        vocab.setdefault(token, index)
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]

    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=spec.ignore_merges,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) are special; user-defined ones
    # (<think>) are matched whole in text like llama.cpp does, but are not special.
    kinds = list(zip(tokens, token_types))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == _USER_DEFINED])
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        # Token ids must line up with the embedding rows; duplicated spellings would shift them.
        raise ModelLoadError(
            f"GGUF tokenizer metadata lists {len(tokens)} tokens but they make "
            f"{backend.get_vocab_size(with_added_tokens=True)} distinct ones"
        )

    def token_of(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_of("bos_token_id"),
        eos_token=token_of("eos_token_id"),
        unk_token=token_of("unknown_token_id"),
        pad_token=token_of("padding_token_id"),
        # As transformers' GGUF tokenizer: BOS/EOS only when the file says so. (llama.cpp
        # also defaults to BOS for a few pre-tokenizers such as llama3 when the flag is
        # missing; converted files carry it.)
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def build_gemma_sentencepiece_bpe(metadata: Mapping[str, Any]):
    """PreTrainedTokenizerFast for a Gemma SentencePiece vocabulary (`tokenizer.ggml.model == "llama"`).

    The same tokenizer transformers' GGUF conversion builds (GemmaTokenizer: BPE with byte
    fallback, spaces normalised to "▁", split after each space, merges recovered from the
    vocabulary), in ~5 s instead of ~60 s for Gemma 3's 262k tokens:
    - runs of spaces stored as real spaces are respelled with "▁", as GemmaTokenizer looks them up;
    - the file has no merges: every split of a token into two tokens is a merge, ranked by the
      merged token's position in the vocabulary (Gemma's scores do not follow merge order), then
      by the longer left part first -- transformers' generate_merges order, without its per-token sorts.
    """
    from transformers import PreTrainedTokenizerFast

    raw_tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(raw_tokens)
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in raw_tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    ranked = []
    for token, index in vocab.items():
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((index, left, right))
    ranked.sort(key=lambda m: m[0])  # stable: longer left part first within a token
    merges = [(left, right) for _, left, right in ranked]

    def token_of(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    unk = token_of("unknown_token_id")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Control tokens are special, user-defined ones plain added tokens -- except the respelled
    # space runs, which the normalised text reaches through the vocabulary (as in transformers).
    kinds = [(t, k) for t, raw, k in zip(tokens, raw_tokens, token_types) if t == raw]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == _USER_DEFINED])
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ModelLoadError(
            f"GGUF tokenizer metadata lists {len(tokens)} tokens but they make "
            f"{backend.get_vocab_size(with_added_tokens=True)} distinct ones"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_of("bos_token_id"),
        eos_token=token_of("eos_token_id"),
        unk_token=unk,
        pad_token=token_of("padding_token_id"),
        # transformers (and llama.cpp) add BOS to a SentencePiece vocabulary unless the file says not to.
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _byte_alphabet() -> set[str]:
    return set(_byte_to_unicode().values())


def _to_byte_level(text: str) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))
