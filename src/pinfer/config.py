"""Configuration dataclasses: the model's shape (read from a checkpoint's
config.json-style dict) and the engine's knobs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from pinfer.errors import PinferError, UnsupportedArchitectureError


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3 | yarn | dynamic
    factor: float = 1.0
    # llama3 and yarn
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    # Phi-3 / Phi-4-mini: RoPE rotates only the first head_dim * factor dims of each head.
    partial_rotary_factor: float = 1.0


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
    # Gemma 3: per-layer sliding (local) / full (global) attention, the local layers' RoPE,
    # the attention scale's denominator and tanh soft-capping.
    layer_types: list[str] | None = None  # "sliding_attention" | "full_attention" per layer
    sliding_window_pattern: int | None = None  # older configs: every Nth layer is global
    rope_local: RopeConfig | None = None  # rope of sliding layers (rope_local_base_freq)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hidden_act: str = "silu"
    # Mixture of experts (Qwen2-MoE, Qwen3-MoE, Mixtral); num_experts == 0: dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1  # every Nth layer is sparse ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... except these, which stay dense

    def is_moe_layer(self, layer_idx: int) -> bool:
        # Same rule as transformers' Qwen2-MoE / Qwen3-MoE decoder layers.
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

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
        if architectures[0].startswith("Qwen"):
            sliding_window = _qwen_sliding_window(hf)
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
            max_position_embeddings=_context_length(hf),
            rope=_rope_config(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias")) or architectures[0].startswith("Qwen2"),
            qk_norm=architectures[0].startswith("Qwen3"),
            layer_types=hf.get("layer_types"),
            sliding_window_pattern=hf.get("sliding_window_pattern"),
            rope_local=_local_rope_config(hf),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            sliding_window=sliding_window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),  # Gemma: hidden_activation
            **_moe_fields(hf, architectures[0]),
        )


def _context_length(hf: dict[str, Any]) -> int:
    length = hf.get("max_position_embeddings", 2048)
    rope = _rope_config(hf)
    if rope.type == "dynamic":  # dynamic NTK exists to extend the context by `factor` (vLLM does the same)
        length = int(length * rope.factor)
    return length


def _qwen_sliding_window(hf: dict[str, Any]) -> int | None:
    """Qwen2/Qwen3 window every layer from max_window_layers on, and only with use_sliding_window
    (off by default, whatever sliding_window says). The Llama code path applies one window to all
    layers, so a model that windows only some of them is refused rather than computed wrongly."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return None
    num_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(num_layers)
    ]
    windowed = sum(t == "sliding_attention" for t in layer_types)
    if windowed == 0:
        return None
    if windowed < len(layer_types):
        raise UnsupportedArchitectureError(
            f"{hf['architectures'][0]} with sliding-window attention on {windowed} of {len(layer_types)} layers "
            "(use_sliding_window with max_window_layers / layer_types) is not supported; only all or no layers"
        )
    return hf["sliding_window"]


def _moe_fields(hf: dict[str, Any], architecture: str) -> dict[str, Any]:
    num_experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    if not num_experts:
        return {}
    mixtral = architecture.startswith("Mixtral")
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=hf["num_experts_per_tok"],
        # Mixtral's experts use intermediate_size (all its layers are sparse).
        moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"],
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
        norm_topk_prob=True if mixtral else bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=hf.get("decoder_sparse_step") or 1,
        mlp_only_layers=list(hf.get("mlp_only_layers") or []),
    )


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def _local_rope_config(hf: dict[str, Any]) -> RopeConfig | None:
    """Gemma 3's sliding layers: their own base (rope_local_base_freq), no scaling."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params.get("sliding_attention"), dict):
        local = params["sliding_attention"]
        return _rope_config({"rope_parameters": local, "rope_theta": hf.get("rope_local_base_freq", 10000.0)})
    if "rope_local_base_freq" in hf:
        return RopeConfig(theta=float(hf["rope_local_base_freq"]))
    return None


def _rope_config(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs use rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    if isinstance(params.get("full_attention"), dict):  # Gemma 3: one entry per layer type
        params = dict(params["full_attention"])
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
        # dynamic NTK scales relative to the config's max_position_embeddings (as transformers does)
        original_max_position_embeddings=hf.get("max_position_embeddings") if rope_type == "dynamic"
        else params.get("original_max_position_embeddings"),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        attention_factor=params.get("attention_factor"),
        partial_rotary_factor=float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)),
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


KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype


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
    # Weight-only quantization of the linears at load: None (keep the dtype), "int8" (per-channel
    # scales) or "int4" (group-wise scales); see model/quantization.py.
    quantization: str | None = None
    # The KV cache's storage: "auto" (the model's dtype) or "int8" (one byte a value and a float32
    # scale per head row, ~0.53x bf16's bytes; llama.cpp's --cache-type-k/v q8_0, vLLM's
    # kv_cache_dtype). int8 doubles the tokens kv_cache_memory holds and the bytes decode
    # attention reads shrink with it; its values are rounded to 8 bits. See model/attention/base.py.
    kv_cache_dtype: str = "auto"
    # Chrome Trace JSON (open in Perfetto) of scheduling, prefill, decode and sampling spans per
    # step, with TTFT/TPOT counters; trace_layers adds one span per decoder layer. See tools/trace.py.
    trace_file: str | None = None
    trace_layers: bool = False
    # Scale-out (pinfer/distributed/): tensor parallelism over torch.distributed worker processes
    # (gloo on CPU, NCCL on CUDA), and data-parallel engine replicas as Ray actors.
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # torch.compile the sampler's plain-temperature path (sampling/sampler.py; RL rollouts):
    # one fused pass instead of ~20 over [batch, vocab]; the first such step pays the compile.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.attention_backend is None:
            self.attention_backend = "batch_invariant" if self.deterministic else "paged"
        elif self.deterministic and self.attention_backend != "batch_invariant":
            raise PinferError(
                f"deterministic=True needs the batch_invariant attention backend, not {self.attention_backend!r}"
            )
        if self.quantization not in (None, "int8", "int4"):
            raise PinferError(f"quantization must be None, 'int8' or 'int4', got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise PinferError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                              f"got {self.kv_cache_dtype!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise PinferError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.block_size < 1:
            raise PinferError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise PinferError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise PinferError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.compile and self.deterministic:
            raise PinferError("compile=True cannot be combined with deterministic=True: the batch-invariant "
                              "mode's guarantees are for its eager kernels")
        if not isinstance(self.data_parallel_size, int) or self.data_parallel_size < 1:
            raise PinferError(f"data_parallel_size must be an integer >= 1, got {self.data_parallel_size!r}")
