"""Rotary position embeddings (RoPE), in Hugging Face's "rotate half" layout,
with the scaling types Llama-family configs use (linear, llama3, yarn, dynamic NTK), and
partial rotary (Phi-3 / Phi-4-mini: only the first part of each head rotates)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pinfer import kernels
from pinfer.config import RopeConfig


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the cos/sin scale, as transformers computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        return _llama3_inv_freq(inv_freq, rope), 1.0
    if rope.type == "yarn":
        return _yarn_inv_freq(head_dim, rope)
    if rope.type == "dynamic":
        return _dynamic_ntk_inv_freq(head_dim, rope), 1.0
    raise ValueError(f"unsupported rope type {rope.type!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are interpolated by `factor`, short ones kept, the middle smoothed.
    old_len = rope.original_max_position_embeddings or 8192
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _dynamic_ntk_inv_freq(dim: int, rope: RopeConfig) -> torch.Tensor:
    """Dynamic NTK, frozen at the longest supported length (what vLLM does).

    transformers recomputes the base from the *current* sequence length whenever it exceeds
    max_position_embeddings (and uses plain RoPE below it). One static cos/sin table cannot
    follow that, so like vLLM we use the frequencies for seq_len = max_position_embeddings *
    factor at every position: identical to transformers for a forward whose length is exactly
    that, different (by design) for shorter sequences.
    """
    original_len = rope.original_max_position_embeddings or 2048
    seq_len = original_len * rope.factor
    base = rope.theta * ((rope.factor * seq_len / original_len) - (rope.factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_inv_freq(dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    # YaRN: blend interpolated and extrapolated frequencies with a linear ramp over dimensions.
    base, factor = rope.theta, rope.factor
    original_len = rope.original_max_position_embeddings or 4096
    attention_factor = rope.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to query and key heads at given positions, from a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig, device: torch.device | None = None):
        super().__init__()
        self.head_dim, self.max_positions, self.rope = head_dim, max_positions, rope
        # Frequencies are computed over the rotated dims only, as transformers does.
        self.rotary_dim = int(head_dim * rope.partial_rotary_factor)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.rebuild_buffers(device)

    def rebuild_buffers(self, device: torch.device | None) -> None:
        """(Re)compute the float32 cos/sin tables: also after materialising a meta-device model."""
        inv_freq, scale = rope_inv_freq(self.rotary_dim, self.rope)
        freqs = torch.arange(self.max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos = (freqs.cos() * scale).to(device)
        self.sin = (freqs.sin() * scale).to(device)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, H, D], key [T, Hkv, D]; the kernel rotates them in place (callers pass fresh
        projections), the PyTorch path returns new tensors."""
        if (self.rotary_dim == self.head_dim and kernels.usable(query) and kernels.has("rotary_")
                and query.dtype == key.dtype
                and query.stride(-1) == key.stride(-1) == 1 and query.stride(-2) == key.stride(-2) == self.head_dim):
            torch.ops.pinfer.rotary_(query, key, self.cos, self.sin, positions)
            return query, key
        cos = self.cos[positions].unsqueeze(1).to(query.dtype)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1).to(query.dtype)
        if self.rotary_dim < self.head_dim:  # partial: the tail of each head passes through unrotated
            d = self.rotary_dim
            return (torch.cat((_rotate(query[..., :d], cos, sin), query[..., d:]), dim=-1),
                    torch.cat((_rotate(key[..., :d], cos, sin), key[..., d:]), dim=-1))
        return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
