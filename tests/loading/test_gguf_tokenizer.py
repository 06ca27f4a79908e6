"""Our GGUF tokenizer (built from metadata with `tokenizers`) behaves like the one
transformers builds from the same GGUF file, on the real SmolLM2 file, and splits
text like SmolLM2's own tokenizer.json (digits isolated, then GPT-2 byte-level).

One known difference: transformers' GGUF converter has no "smollm" pre-tokenizer
and splits with plain GPT-2 rules, so a run of 2+ whitespace characters before a
digit comes out differently ("x  1": transformers Ġ,Ġ,1; SmolLM2/llama.cpp/us ĠĠ,1).
Texts with that pattern are checked against SmolLM2's original pipeline instead.
"""

from __future__ import annotations

import copy
import re

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from pinfer.loading.gguf_loader import GGUFCheckpoint
from pinfer.loading.gguf_tokenizer import load_gguf_tokenizer

TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "",
    " ",
    "Numbers: 0 7 42 1234567890 3.14159 -273.15 1,000,000 2024-01-31",
    "x  1   22    333",
    "a\n\n1 and\t\t2 and  \n3",
    "Unicode: café naïve Ångström Ελληνικά русский 中文 日本語 한국어 हिन्दी العربية",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✓ ∑ √ ∞ ≠",
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n",
    "if (a && b) { printf(\"%d\\n\", a[i++]); } // C code",
    "multiple   spaces\tand\ttabs\n\n\nand newlines\r\n",
    "   leading and trailing spaces   ",
    "I'm sure you'll see they've done it, isn't it? We'd go.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|endoftext|><repo_name>pinfer<file_sep>",
    "<|im_start <|im_end| <|im_start|x",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "URL: https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2#frag",
]


# See the module docstring: where transformers' GGUF tokenizer departs from SmolLM2's.
WHITESPACE_RUN_BEFORE_DIGIT = re.compile(r"\s\s\d")


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return GGUFCheckpoint(smollm2_gguf).load_tokenizer()


@pytest.fixture(scope="module")
def reference(smollm2_hf_dir):
    # The tokenizer transformers built from the same GGUF file (see conftest.py).
    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


def test_builds_without_transformers_gguf_conversion(smollm2_gguf, monkeypatch):
    # The fast path builds from metadata with `tokenizers`; transformers' GGUF conversion (~10 s here) is not used.
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to transformers' GGUF tokenizer conversion")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    tokenizer = GGUFCheckpoint(smollm2_gguf).load_tokenizer()
    assert type(tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")


@pytest.fixture(scope="module")
def original_pipeline(reference):
    """SmolLM2's tokenizer.json pipeline: Digits(individual) then ByteLevel(use_regex),
    on the vocabulary transformers extracted; built from `tokenizers`' own components."""
    backend = copy.deepcopy(reference.backend_tokenizer)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


@pytest.mark.parametrize("text", [t for t in TEXTS if not WHITESPACE_RUN_BEFORE_DIGIT.search(t)])
def test_ids_match_transformers(ours, reference, text):
    assert ours(text)["input_ids"] == reference(text)["input_ids"]
    assert ours.encode(text) == reference.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_smollm2_original_pipeline(ours, original_pipeline, text):
    assert ours.encode(text) == original_pipeline.encode(text).ids


def test_whitespace_before_digits_follows_smollm2(ours):
    tokens = ours.convert_ids_to_tokens(ours.encode("x  1   22"))
    assert tokens == ["x", "ĠĠ", "1", "ĠĠĠ", "2", "2"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(ours, reference, text):
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_digits_are_split_one_by_one(ours):
    # SmolLM2's pre-tokenizer ("smollm" in llama.cpp) isolates every digit.
    ids = ours.encode("Hello world! 123")
    assert ours.convert_ids_to_tokens(ids) == ["Hello", "Ġworld", "!", "Ġ", "1", "2", "3"]


def test_special_tokens_are_single_tokens(ours):
    for token in ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]:
        ids = ours.encode(token)
        assert len(ids) == 1
        assert ours.convert_ids_to_tokens(ids) == [token]
    assert ours.convert_tokens_to_ids("<|im_start|>") == 1
    assert "<|im_start|>" in ours.all_special_tokens
    assert ours.decode(ours.encode("<|im_start|>hi"), skip_special_tokens=True) == "hi"


def test_special_token_attributes(ours, reference):
    assert (ours.bos_token, ours.bos_token_id) == ("<|im_start|>", 1)
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 2)
    assert ours.unk_token == "<|endoftext|>"
    for attr in ["bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"]:
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert len(ours) == len(reference) == 49152
    assert ours.all_special_tokens == reference.all_special_tokens
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in reference.added_tokens_decoder.items()
    }


def test_no_bos_added(ours, reference):
    # tokenizer.ggml.add_bos_token is false in this file; neither tokenizer adds one.
    assert ours("Hi")["input_ids"] == reference("Hi")["input_ids"] == ours.encode("Hi", add_special_tokens=False)
    assert ours("Hi")["input_ids"][0] != ours.bos_token_id


def test_chat_template_matches(ours, reference, smollm2_gguf):
    assert ours.chat_template == reference.chat_template == GGUFCheckpoint(smollm2_gguf).chat_template
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Count to 3 😀"},
        ],
    ]
    for messages in conversations:
        ours_text = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ref_text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours_text == ref_text
        assert ours_text.endswith("<|im_start|>assistant\n")
        assert ours.encode(ours_text) == reference.encode(ref_text)


def test_batch_encode(ours, reference):
    batch = TEXTS[:5]
    assert ours(batch)["input_ids"] == reference(batch)["input_ids"]


def test_unknown_pre_tokenizer_falls_back_to_transformers(tmp_path, monkeypatch):
    calls = []

    def fake_from_pretrained(directory, gguf_file=None, **kwargs):
        calls.append((directory, gguf_file))
        return "transformers-tokenizer"

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_from_pretrained)
    path = tmp_path / "model.gguf"
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "some-new-regex", "tokenizer.ggml.merges": []}
    assert load_gguf_tokenizer(path, metadata) == "transformers-tokenizer"
    assert load_gguf_tokenizer(path, {"tokenizer.ggml.model": "llama"}) == "transformers-tokenizer"
    assert calls == [(str(tmp_path), "model.gguf")] * 2


def tiny_metadata(**overrides) -> dict:
    """A byte-level vocabulary: the 256 byte symbols, one merge, and added tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["ab", "<|ctl|>", "<think>", "<｜x▁y｜>"]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 257 + [3, 4, 3],  # NORMAL, CONTROL, USER_DEFINED
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 257,
        "tokenizer.ggml.eos_token_id": 257,
    }
    return metadata | overrides


def test_added_token_kinds_from_metadata(tmp_path):
    tokenizer = load_gguf_tokenizer(tmp_path / "unused.gguf", tiny_metadata())
    assert len(tokenizer) == 260
    ids = tokenizer.encode("ab<think>c<｜x▁y｜>")
    assert ids == [256, 258, tokenizer.convert_tokens_to_ids("c"), 259]
    assert tokenizer.decode(ids) == "ab<think>c<｜x▁y｜>"
    # control tokens are special (dropped by skip_special_tokens), user-defined ones are not
    added = tokenizer.added_tokens_decoder
    assert (added[257].content, added[257].special) == ("<|ctl|>", True)
    assert (added[258].content, added[258].special) == ("<think>", False)
    assert (added[259].content, added[259].special) == ("<｜x▁y｜>", True)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab<think>c"


def test_add_bos_token_flag(tmp_path):
    without = load_gguf_tokenizer(tmp_path / "unused.gguf", tiny_metadata())
    with_bos = load_gguf_tokenizer(tmp_path / "unused.gguf", tiny_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert without.encode("ab") == [256]
    assert with_bos.encode("ab") == [257, 256]
    assert with_bos.encode("ab", add_special_tokens=False) == [256]
