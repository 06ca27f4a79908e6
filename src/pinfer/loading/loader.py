"""From a --model string to a model with weights in place and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pinfer.config import ModelConfig
from pinfer.errors import ModelLoadError
from pinfer.loading.checkpoint import Checkpoint
from pinfer.loading.resolve import resolve_model
from pinfer.loading.safetensors_loader import SafetensorsCheckpoint
from pinfer.model.registry import check_architecture, model_class_for


def open_checkpoint(model: str | Path) -> Checkpoint:
    """Resolve, open and validate a checkpoint: unknown architectures and corrupt files fail here."""
    path = resolve_model(model)
    if path.is_file():
        from pinfer.loading.gguf_loader import GGUFCheckpoint

        checkpoint = GGUFCheckpoint(path)  # validates the file while opening it
        check_architecture(checkpoint.config)
        return checkpoint
    checkpoint = SafetensorsCheckpoint(path)
    check_architecture(checkpoint.config)
    checkpoint.validate()
    return checkpoint


def default_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """bfloat16 for GGUF (quantized or 16-bit) and 16-bit checkpoints, float32 for float32 ones."""
    declared = checkpoint.config.get("torch_dtype") or checkpoint.config.get("dtype")
    if declared == "float32":
        return torch.float32
    return torch.bfloat16


def load_model(
    checkpoint: Checkpoint, config: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int
) -> nn.Module:
    model_cls = model_class_for(config)
    with torch.device("meta"):
        model = model_cls(config, max_positions=max_positions)
    # Materialise without running random init, then rebuild the non-parameter buffers (RoPE tables).
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    for module in model.modules():
        if hasattr(module, "rebuild_buffers"):
            module.rebuild_buffers(device)
    loaded = model.load_weights(checkpoint.weights(dtype))
    missing = model.expected_weight_keys() - loaded
    if missing:
        names = sorted(k.split("@")[0] for k in missing)
        raise ModelLoadError(
            f"checkpoint {checkpoint.path} is missing {len(missing)} tensor(s) for {config.architecture}, "
            f"e.g. {', '.join(names[:5])}"
        )
    return model.eval().requires_grad_(False)
