"""From a --model string to a model with weights in place and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pinfer import kernels
from pinfer.config import ModelConfig
from pinfer.errors import ModelLoadError, PinferError
from pinfer.loading.checkpoint import Checkpoint
from pinfer.loading.resolve import resolve_model
from pinfer.loading.safetensors_loader import SafetensorsCheckpoint
from pinfer.memory import return_freed_memory_to_os
from pinfer.model.huge_pages import move_to_huge_pages
from pinfer.model.packed_linear import onednn_packs
from pinfer.model.quantization import hot_quantized_tensors, quantize_model
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


def default_dtype(checkpoint: Checkpoint, device: torch.device | None = None) -> torch.dtype:
    """bfloat16 for GGUF (quantized or 16-bit) and 16-bit checkpoints, float32 for float32 ones;
    and float32 on a CPU with no fast bf16 matmul: neither pinfer's GEMM (no compiler, or an x86
    without AVX2) nor oneDNN's (which needs AVX-512 or AVX-NE-CONVERT), where aten's bf16 linear
    runs ~8x slower than float32's (a Zen 3 core: ~8 vs ~67 GFLOPS)."""
    declared = checkpoint.config.get("torch_dtype") or checkpoint.config.get("dtype")
    if declared == "float32":
        return torch.float32
    if (device is None or device.type == "cpu") and not (kernels.has("bf16_gemm") or onednn_packs(torch.bfloat16)):
        return torch.float32
    return torch.bfloat16


def load_model(
    checkpoint: Checkpoint,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str | None = None,
    deterministic: bool = False,
) -> nn.Module:
    """Build the model and load its weights; quantization ("int8"/"int4") then swaps in
    quantized linears (model/quantization.py), batch-invariant ones if deterministic."""
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
    model = model.eval().requires_grad_(False)
    if quantization is not None:
        _quantize(model, checkpoint, quantization, device, deterministic)
    return model


def _quantize(model: nn.Module, checkpoint: Checkpoint, mode: str, device: torch.device, deterministic: bool) -> None:
    if device.type != "cpu":
        raise PinferError(f"quantization={mode!r} uses CPU kernels (torch._int_mm, torch's int4 CPU matmul); "
                          f"device {device} is not supported")
    # A GGUF file's Q4_0/Q4_1 blocks are int4 groups of 32 already: write the file's own
    # values into the int4 linears instead of re-quantizing the dequantized floats.
    blocks = getattr(checkpoint, "int4_weights", None)
    prequantized = blocks() if mode == "int4" and blocks is not None else ()
    with torch.no_grad():  # not inference_mode: update_weights later writes these buffers in place
        quantize_model(model, mode, batch_invariant=deterministic, prequantized=prequantized)
    move_to_huge_pages(hot_quantized_tensors(model))
    return_freed_memory_to_os()  # the freed float weights: RSS stayed ~100 MiB higher without it


def reload_model_weights(model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype) -> set[str]:
    """Re-read every weight from the checkpoint into a loaded model (wake_up after
    sleep(level=2)). For an int4 model on a GGUF file the Q4 blocks are written as
    they are again, not re-quantized from the dequantized floats."""
    with torch.no_grad():
        loaded = model.load_weights(checkpoint.weights(dtype))
        blocks = getattr(checkpoint, "int4_weights", None)
        if getattr(model, "quantization", None) == "int4" and blocks is not None:
            model.load_weights.load_quantized(blocks())
    return loaded
