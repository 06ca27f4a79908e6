"""Configuration dataclasses: the model's shape (read from a checkpoint's
config.json-style dict) and the engine's knobs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from pinfer.errors import PinferError


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3 | yarn
    factor: float = 1.0
    # llama3 and yarn
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    sliding_window: int | None = None  # Mistral v0.1: attend to the last N tokens only
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hidden_act: str = "silu"

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        architectures = hf.get("architectures") or []
        if not architectures:
            raise PinferError("config.json has no 'architectures' entry; cannot tell which model code to use")
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        sliding_window = hf.get("sliding_window")
        if hf.get("use_sliding_window") is False:
            sliding_window = None
        return cls(
            architecture=architectures[0],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope=_rope_config(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias")) or architectures[0].startswith("Qwen2"),
            qk_norm=architectures[0].startswith("Qwen3"),
            sliding_window=sliding_window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hidden_act=hf.get("hidden_act", "silu"),
        )


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_config(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs use rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise PinferError(
            f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        attention_factor=params.get("attention_factor"),
    )


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise PinferError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    if dtype not in _DTYPES:
        raise PinferError(f"unsupported dtype {dtype!r}; use one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def parse_memory_size(size: str | int | float) -> int:
    """'2GiB', '512MiB', '1.5GB', '1e9' or a number of bytes -> bytes."""
    if isinstance(size, (int, float)):
        return int(size)
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([KMGT]i?B|[KMGT]|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise PinferError(f"cannot parse memory size {size!r}; examples: 1GiB, 512MiB, 2e9")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
              "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}
    return int(number * powers[unit])


@dataclass
class EngineConfig:
    model: str
    dtype: str | torch.dtype = "auto"  # auto: bfloat16 for GGUF and 16-bit checkpoints, else float32
    device: str | torch.device | None = None  # None: cuda if available, else cpu
    block_size: int = 16
    kv_cache_memory: str | int = "1GiB"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    attention_backend: str | None = None  # None: "paged", or "batch_invariant" when deterministic
    seed: int = 0  # draws seeds for requests that do not set one
    # Batch-invariant mode: a request's tokens and logprobs are bitwise the same whatever else
    # runs with it (batch size, chunking, preemption). Slower; see model/batch_invariant.py.
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.attention_backend is None:
            self.attention_backend = "batch_invariant" if self.deterministic else "paged"
        elif self.deterministic and self.attention_backend != "batch_invariant":
            raise PinferError(
                f"deterministic=True needs the batch_invariant attention backend, not {self.attention_backend!r}"
            )
        if self.block_size < 1:
            raise PinferError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise PinferError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise PinferError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
