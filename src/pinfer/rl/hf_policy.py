"""A Hugging Face folder with the same weights as a GGUF file, for the trainer side of an RL loop.

The engine loads the GGUF; a transformers trainer needs config.json + safetensors.
`gguf_to_hf_folder` has *transformers* do the conversion (its own dequantization,
Q/K un-permutation and tokenizer), so the trainer is independent of pinfer's loader:

    hf_dir = cached_hf_folder(resolve_model("smollm2-135m"))   # ~/.cache/pinfer/... (or $PINFER_CACHE)
    policy = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)

Needs `accelerate` (transformers uses it to read GGUF files); the result is float32.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch


def cache_dir() -> Path:
    return Path(os.environ.get("PINFER_CACHE", Path.home() / ".cache" / "pinfer")).expanduser()


def gguf_to_hf_folder(gguf: str | Path, out: str | Path) -> Path:
    """Write a float32 transformers checkpoint (weights + tokenizer) of `gguf` to `out`; reuse it if present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain one.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")  # rename at the end: no half-written folder is reused
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached_hf_folder(gguf: str | Path) -> Path:
    """gguf_to_hf_folder into the cache, keyed by the file's name and size."""
    gguf = Path(gguf)
    return gguf_to_hf_folder(gguf, cache_dir() / f"{gguf.stem}-hf-{gguf.stat().st_size}")
