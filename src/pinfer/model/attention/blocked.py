"""Blocked (streaming) attention: flash-attention's online softmax over KV pages.

The loop runs over block index j, one page of block_size keys at a time, for
all sequences and all queries of the batch at once (queries padded to
max_query_len). A running max, running sum and output accumulator, all in
float32, replace the full [Lq, L] score matrix: peak memory is
O(B * H * max_query_len * block_size) for scores, however long the context.
That bound, not speed, is why this backend exists.
"""

from __future__ import annotations

import torch

from pinfer.model.attention.base import AttentionBackend, AttentionMetadata, KVPool, gather_blocks


class BlockedAttention(AttentionBackend):
    name = "blocked"

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: KVPool,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: KVPool,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        group = num_heads // num_kv_heads
        num_seqs, max_q = meta.num_seqs, meta.max_query_len
        device = query.device

        # Pad the ragged queries to [B, max_q]; padding rows repeat a real token and are dropped at the end.
        t = torch.arange(max_q, device=device)
        is_real = t[None, :] < meta.query_lens[:, None]  # [B, max_q]
        rows = (meta.query_start_loc[:-1, None] + t[None, :]).clamp(max=num_tokens - 1)
        q = query[rows].float() * scale  # [B, max_q, H, D]
        # Grouped-query layout: the G query heads sharing a kv head are stacked with the queries,
        # so every page is read once per kv head, never repeated.  Row r of a head = (g, t).
        q = q.view(num_seqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(num_seqs, num_kv_heads, group * max_q, head_dim)

        # New token t of sequence b sits at position context_len - query_len + t.
        q_pos = (meta.context_lens - meta.query_lens)[:, None] + t[None, :]  # [B, max_q]
        # Padding rows take the last real position, so that a window never leaves them without a key.
        q_pos = torch.minimum(q_pos, meta.context_lens[:, None] - 1)
        q_pos = q_pos[:, None, None, :].expand(num_seqs, 1, group, max_q).reshape(num_seqs, 1, group * max_q, 1)
        context_lens = meta.context_lens[:, None, None, None]
        offsets = torch.arange(block_size, device=device)

        running_max = torch.full((num_seqs, num_kv_heads, group * max_q, 1), float("-inf"), device=device)
        running_sum = torch.zeros_like(running_max)
        acc = torch.zeros(num_seqs, num_kv_heads, group * max_q, head_dim, device=device)
        num_blocks = -(-meta.max_context_len // block_size)
        first_block = 0
        if sliding_window is not None:
            # Pages before every query's window are skipped: they would be fully masked anyway.
            first_visible = min(c - n for c, n in zip(meta.context_lens_cpu, meta.query_lens_cpu)) - sliding_window + 1
            first_block = max(0, first_visible) // block_size
        for j in range(first_block, num_blocks):
            block_ids = meta.block_tables[:, j]  # past a sequence's end this is padding; its keys get masked
            k = gather_blocks(k_cache, block_ids).float().permute(0, 2, 3, 1)  # [B, Hkv, D, bs]
            v = gather_blocks(v_cache, block_ids).float().permute(0, 2, 1, 3)  # [B, Hkv, bs, D]
            scores = q @ k  # [B, Hkv, G*max_q, bs]
            k_pos = j * block_size + offsets
            hidden = (k_pos > q_pos) | (k_pos >= context_lens)
            if sliding_window is not None:
                hidden |= k_pos <= q_pos - sliding_window
            scores.masked_fill_(hidden, float("-inf"))

            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
            # A row with no visible key yet keeps max -inf; shift by 0 there to avoid inf - inf.
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
            probs = torch.exp(scores - shift)
            rescale = torch.exp(running_max - shift)
            running_sum = running_sum * rescale + probs.sum(dim=-1, keepdim=True)
            acc = acc * rescale + probs @ v
            running_max = new_max

        out = acc / running_sum  # every query sees at least its own key, so running_sum > 0
        out = out.view(num_seqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)  # [B, max_q, Hkv, G, D]
        return out.reshape(num_seqs, max_q, num_heads, head_dim)[is_real].to(query.dtype)
