"""Shared fixtures: the real SmolLM2 weights, and an independent reference
checkpoint made from them by transformers' own GGUF loader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pinfer.loading.resolve import DEFAULT_MODEL, resolve_model

CACHE_DIR = Path(os.environ.get("PINFER_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "tests"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF file (installed by `make test`)."""
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf: Path) -> Path:
    """A float32 Hugging Face folder made by *transformers* from the GGUF file:
    its dequantization, Q/K un-permutation and tokenizer are independent of ours.
    Built once and cached under .cache/tests (keyed by the GGUF's size)."""
    from pinfer.rl.hf_policy import gguf_to_hf_folder

    return gguf_to_hf_folder(smollm2_gguf, CACHE_DIR / f"smollm2-hf-{smollm2_gguf.stat().st_size}")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_hf_dir: Path):
    """transformers' LlamaForCausalLM on the reference folder, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf: Path):
    """One float32 engine on the real weights, shared by the tests that only send requests."""
    from pinfer import LLM

    return LLM(str(smollm2_gguf), dtype="float32")
