"""The one interface every attention implementation follows.

A step's batch is "flattened": the new tokens of all sequences are concatenated
into one [num_tokens, ...] tensor. Sequence i owns rows
query_start_loc[i]:query_start_loc[i+1]. Its keys/values live in the paged KV
pool: a [num_blocks, block_size, num_kv_heads, head_dim] tensor per layer,
addressed through block_tables[i]. The new tokens' K/V are written to the pool
(at slot_mapping) *before* attention runs, so every backend reads the whole
context, cached prefix included, from the pool.

Causality: the j-th new token of sequence i sits at position
context_lens[i] - query_lens[i] + j and attends to kv positions <= its own.

int8 pools (kv_cache_dtype="int8"): a layer's K and V are each an Int8KV, int8 values with
one float32 scale per (slot, kv head), as llama.cpp's q8_0 cache stores 8-bit values with a
scale per 32. Backends read pages through gather_blocks(), which dequantizes; the CPU kernels
read the int8 rows in place.

Sliding window (Mistral, Gemma 3's local layers): with sliding_window = W, a
query at position p attends only to key positions k with p - W < k <= p, i.e.
itself and the W - 1 keys before it (transformers' convention). None: full
causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pinfer import kernels


@dataclass(frozen=True)
class Int8KV:
    """One layer's K (or V) pool in 8 bits: value = data * scale, symmetric per (slot, kv head)."""

    data: torch.Tensor  # int8 [num_blocks, block_size, num_kv_heads, head_dim]
    scale: torch.Tensor  # float32 [num_blocks, block_size, num_kv_heads, 1]
    values_dtype: torch.dtype  # what dequantized pages are handed out as: the model's dtype

    @classmethod
    def from_values(cls, pool: torch.Tensor) -> Int8KV:
        """A new int8 pool holding pool's values [num_blocks, block_size, Hkv, D], every slot stored."""
        quantized = cls(torch.empty(pool.shape, dtype=torch.int8, device=pool.device),
                        torch.empty(*pool.shape[:-1], 1, device=pool.device), pool.dtype)
        rows = pool.reshape(-1, *pool.shape[2:])
        quantized.store(torch.arange(rows.shape[0], device=pool.device), rows)
        return quantized

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:  # int8, so that no code path for the model's dtype takes it
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def store(self, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize values [T, Hkv, D] into their slots: scale = max|row| / 127, q = round(x / scale),
        the ops (and bits) of the int8 linears' activation quantization and of the kernels' store."""
        x = values.float()
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
        num_slots = self.data.shape[0] * self.data.shape[1]
        self.data.view(num_slots, *self.data.shape[2:]).index_copy_(0, slot_mapping, torch.round(x / scale).to(torch.int8))
        self.scale.view(num_slots, *self.scale.shape[2:]).index_copy_(0, slot_mapping, scale)

    def blocks(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Pages block_ids, dequantized: [len(block_ids), block_size, Hkv, D] in values_dtype."""
        data, scale = self.data.index_select(0, block_ids), self.scale.index_select(0, block_ids)
        return (data.float() * scale).to(self.values_dtype)


KVPool = torch.Tensor | Int8KV  # one layer's K (or V): [num_blocks, block_size, Hkv, D] values


def values_dtype(cache: KVPool) -> torch.dtype:
    """The dtype a pool's values are read in: its own, or an int8 pool's values_dtype."""
    return cache.values_dtype if isinstance(cache, Int8KV) else cache.dtype


def gather_blocks(cache: KVPool, block_ids: torch.Tensor) -> torch.Tensor:
    """Pages block_ids of a pool as values: [len(block_ids), block_size, Hkv, D]."""
    return cache.blocks(block_ids) if isinstance(cache, Int8KV) else cache.index_select(0, block_ids)


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and keys are, for one model step.

    Tensors live on the model's device; the *_cpu lists mirror them so that
    backends can make shape decisions without a device sync.
    """

    query_start_loc: torch.Tensor  # [B + 1] int64, cumulative query lengths
    query_lens: torch.Tensor  # [B] int64, new tokens per sequence this step
    context_lens: torch.Tensor  # [B] int64, kv length per sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, block_id * block_size + offset
    query_lens_cpu: list[int]
    context_lens_cpu: list[int]
    block_size: int
    # Values a backend derives from this metadata once and reuses in every layer of the step
    # (e.g. the paged decode's gather indices and mask), keyed by the backend.
    step_cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend:
    """Computes attention for a flattened ragged batch against the paged KV pool."""

    name: str = "base"

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: KVPool,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: KVPool,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,  # W: attend to keys p - W < k <= p only
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        raise NotImplementedError


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: KVPool,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: KVPool,
    slot_mapping: torch.Tensor,  # [num_tokens]
) -> None:
    """Write the new tokens' keys and values into their slots of the pool."""
    if isinstance(k_cache, Int8KV):
        if kernels.usable(key) and kernels.has("store_kv_int8") and _packed_heads(key) and _packed_heads(value):
            torch.ops.pinfer.store_kv_int8(key, value, k_cache.data, v_cache.data, k_cache.scale, v_cache.scale,
                                           slot_mapping)
        else:
            k_cache.store(slot_mapping, key)
            v_cache.store(slot_mapping, value)
        return
    if (kernels.usable(key) and kernels.has("store_kv") and key.dtype == k_cache.dtype and _packed_heads(key)
            and _packed_heads(value)):
        torch.ops.pinfer.store_kv(key, value, k_cache, v_cache, slot_mapping)  # one call, no dtype copies
        return
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _packed_heads(x: torch.Tensor) -> bool:
    """A token's heads are one dense row (rows themselves may be strided: views of the qkv output)."""
    return x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]


def store_and_attend(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    kv_cache: tuple[KVPool, KVPool],
    meta: AttentionMetadata,
    backend: AttentionBackend,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """A layer's attention: write the new K/V into the pool, then attend over it."""
    k_cache, v_cache = kv_cache
    store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
    return backend.forward(query, k_cache, v_cache, meta, scale, sliding_window=sliding_window)
