"""Fixtures of the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(smollm2_hf_dir, tmp_path_factory):
    """SmolLM2's tokenizer files, copied into every tiny checkpoint."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(smollm2_hf_dir).save_pretrained(out)
    return out
