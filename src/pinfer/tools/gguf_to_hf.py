"""A GGUF file as a Hugging Face checkpoint folder (config.json, generation_config.json,
model.safetensors, tokenizer files) that transformers' AutoModelForCausalLM and
AutoTokenizer load.

Everything model-specific is pinfer's GGUF reader (loading/gguf_loader.py): HF tensor
names, dequantization, Q/K un-permutation, Gemma 3's norm offsets, the HF-style config,
and the tokenizer rebuilt from the metadata. This module only writes them out.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from pinfer.loading.gguf_loader import GGUFCheckpoint
from pinfer.model.registry import check_architecture

HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _save_config(config: dict, dtype: torch.dtype, folder: Path) -> None:
    from transformers import AutoConfig, GenerationConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    # transformers' config class fills its defaults and writes the keys its version expects.
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    hf_config.dtype = dtype
    hf_config.save_pretrained(folder)
    generation = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**{k: v for k, v in generation.items() if v is not None}).save_pretrained(folder)


def gguf_to_hf(path: Path, out: Path, dtype: str = "float32") -> None:
    """Write the GGUF file at `path` as an HF folder at `out` (built in a temporary folder, renamed at the end)."""
    checkpoint = GGUFCheckpoint(path)
    check_architecture(checkpoint.config)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        from safetensors.torch import save_file

        tensors = {name: t.contiguous() for name, t in checkpoint.weights(HF_DTYPES[dtype])}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _save_config(checkpoint.config, HF_DTYPES[dtype], tmp)
        checkpoint.load_tokenizer().save_pretrained(tmp)
        if out.exists():  # --force: replace only once the new folder is complete
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
