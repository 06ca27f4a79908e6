"""Batch-invariant attention, for deterministic mode.

Every query token is computed by the same function of (its query, its
position, the K/V pages of its sequence), whatever else is in the step: a
prompt token in a 500-token prefill chunk, the same token recomputed after a
preemption, or a decode token next to 63 others all take exactly the same
arithmetic. That is the "fixed split" of batch-invariant attention: the context
is always split into runs of SPLIT_TOKENS keys (whole KV pages) and folded in
order with an online softmax in float32, one split per iteration for all
tokens at once.

Keys past a token's position are masked, and folding a split that is wholly
past it is an exact no-op (scale by exp(0) = 1, add 0), so the number of
iterations (set by the longest context in the step) does not leak into any
token's result.

With a sliding window, splits wholly *before* a token's window are masked too.
The running max starts at a finite sentinel (float32 min) rather than -inf, so
folding such a split is also an exact no-op (exp(0) = 1 times a zero sum, plus
exp(-inf) = 0), where -inf - -inf would give nan. The state after any number of
leading masked splits is exactly the initial state, so leading splits that are
before every token's window can be skipped without changing any result.

Cost: one gather and two small batched matmuls per split per layer, for every
token; prefill pays per token for its whole context. Much slower than "paged"
for long prompts; meant for RL rollouts, where reproducibility is worth it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pinfer.model.attention.base import AttentionBackend, AttentionMetadata, KVPool, gather_blocks


SPLIT_TOKENS = 64  # keys folded per iteration (rounded to whole pages); fixed, or results would vary


class BatchInvariantAttention(AttentionBackend):
    name = "batch_invariant"

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
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        device = query.device

        # Each token's sequence and position.
        seq = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), meta.query_lens)
        first_pos = meta.context_lens - meta.query_lens
        positions = first_pos[seq] + torch.arange(num_tokens, device=device) - meta.query_start_loc[seq]
        pages_per_split = max(1, SPLIT_TOKENS // block_size)
        split = pages_per_split * block_size
        num_splits = -(-meta.max_context_len // split)
        first_split = 0
        if sliding_window is not None:
            first_visible = min(c - n for c, n in zip(meta.context_lens_cpu, meta.query_lens_cpu)) - sliding_window + 1
            first_split = max(0, first_visible) // split
        pages = meta.block_tables[seq, : num_splits * pages_per_split]  # [N, P], padded with page 0 (masked)
        if pages.shape[1] < num_splits * pages_per_split:
            pages = F.pad(pages, (0, num_splits * pages_per_split - pages.shape[1]))

        q = query.float().view(num_tokens, num_kv_heads, group, head_dim) * scale
        # Finite sentinel, not -inf: see the module docstring.
        running_max = q.new_full((num_tokens, num_kv_heads, group), torch.finfo(torch.float32).min)
        denominator = q.new_zeros((num_tokens, num_kv_heads, group))
        acc = q.new_zeros((num_tokens, num_kv_heads, group, head_dim))
        offsets = torch.arange(split, device=device)
        kv_shape = (num_tokens, split, num_kv_heads, head_dim)
        for i in range(first_split, num_splits):
            ids = pages[:, i * pages_per_split : (i + 1) * pages_per_split].reshape(-1)
            # Contiguous operands: on a strided (permuted) one, matmul picks a different kernel for a
            # batch of 1 than for a larger batch (measured: last-bit different rows), breaking invariance.
            k = gather_blocks(k_cache, ids).view(kv_shape).float().permute(0, 2, 3, 1).contiguous()  # [N, Hkv, D, S]
            v = gather_blocks(v_cache, ids).view(kv_shape).float().transpose(1, 2).contiguous()  # [N, Hkv, S, D]
            scores = torch.matmul(q, k)  # [N, Hkv, G, S]
            k_pos = (i * split + offsets)[None, :]
            hidden = k_pos > positions[:, None]  # [N, S]
            if sliding_window is not None:
                hidden |= k_pos <= positions[:, None] - sliding_window
            scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
            new_max = torch.maximum(running_max, scores.amax(dim=-1))
            correction = torch.exp(running_max - new_max)
            probs = torch.exp(scores - new_max.unsqueeze(-1))
            denominator = denominator * correction + probs.sum(dim=-1)
            acc = acc * correction.unsqueeze(-1) + torch.matmul(probs, v)
            running_max = new_max
        out = acc / denominator.unsqueeze(-1)
        return out.view(num_tokens, num_heads, head_dim).to(query.dtype)
