"""Reference attention: one sequence at a time, the whole score matrix in float32.

Written to be read, not to be fast. The other backends are tested against it
(and it against a float64 implementation in the tests).
"""

from __future__ import annotations

import torch

from pinfer.model.attention.base import AttentionBackend, AttentionMetadata, KVPool, gather_blocks


def gather_context(cache: KVPool, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """A sequence's first context_len keys (or values) as one [L, Hkv, D] tensor."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    return gather_blocks(cache, block_table[:num_blocks]).flatten(0, 1)[:context_len]


class ReferenceAttention(AttentionBackend):
    name = "reference"

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: KVPool,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: KVPool,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        out = torch.empty_like(query)
        start = 0
        for i, (query_len, context_len) in enumerate(zip(meta.query_lens_cpu, meta.context_lens_cpu)):
            q = query[start : start + query_len].float().transpose(0, 1)  # [H, Lq, D]
            # Query head h reads kv head h // group.
            k = gather_context(k_cache, meta.block_tables[i], context_len).float().repeat_interleave(group, dim=1)
            v = gather_context(v_cache, meta.block_tables[i], context_len).float().repeat_interleave(group, dim=1)
            scores = scale * (q @ k.permute(1, 2, 0))  # [H, Lq, L]
            # New token j sits at position context_len - query_len + j.
            q_pos = torch.arange(query_len, device=query.device) + (context_len - query_len)
            k_pos = torch.arange(context_len, device=query.device)
            hidden = k_pos[None, :] > q_pos[:, None]
            if sliding_window is not None:  # only the window p - W < k <= p is visible
                hidden |= k_pos[None, :] <= q_pos[:, None] - sliding_window
            scores = scores.masked_fill(hidden, float("-inf"))
            probs = scores.softmax(dim=-1)
            out[start : start + query_len] = (probs @ v.transpose(0, 1)).transpose(0, 1).to(query.dtype)
            start += query_len
        return out
