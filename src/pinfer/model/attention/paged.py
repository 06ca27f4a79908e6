"""Paged attention, the default backend: fast on CPU, reading K/V from the paged pool.

The batch is split into decode rows (query_len == 1) and prefill rows.

Decode: one vectorised call for all decode rows. Their pages are gathered with
one index_select each for K and V into [B, L_max, Hkv, D] (L_max: the longest
context, rounded up to whole blocks), and torch's SDPA computes attention with
a boolean mask hiding positions >= context_len. GQA: the G query heads of a kv
head are laid out as G query rows against its keys, so K/V are never repeated.

Prefill: SDPA per prefill sequence, with is_causal when it has no cached prefix
and an explicit bottom-right causal mask otherwise; or, for batches of short,
similar prompts, one SDPA call over the prompts padded to the longest one
(see use_padded_prefill).

Sliding window W: one more condition in the boolean masks (key > position - W).
Decode then gathers only the ceil(W / block_size) + 1 pages around each
sequence's window, and per-sequence prefill skips the pages before its first
query's window, so the cost no longer grows with the context.

On the CPU, decode runs pinfer's own kernel when it is loaded (kernels/cpu_ops.cpp): it reads
the pages in place through the block table, so there is no gather and no mask, and computes
in float32. Likewise bf16 prefill without a sliding window runs the kernel's flash-style
prefill, every prefill sequence of the step in one call per layer (whole sequences per thread
when there are enough, else each spread over the threads), so short prompts are not padded
into one SDPA call either; on a CPU with AMX, prompts of SDPA_FROM_TOKENS or more go to SDPA,
whose flash kernel runs on oneDNN's tiles there. examples/kernel_microbench.py times both
against the SDPA path below, which is the fallback and the reference.

int8 pools (Int8KV): decode runs the kernel's int8 path (the rows read in place, the query
quantized per row), else the gather dequantizes; prefill reads dequantized pages (the prefill
kernel gets the step's prefill pages dequantized into a pool of their own).

Why SDPA: on CPU it is torch's flash-attention kernel, which accumulates and
does the softmax in float32 for bf16 too, and it is the fastest option measured
(2 Xeon cores, torch 2.13; decode of B=64, contexts 100-300, H=9, Hkv=3, D=64,
gather included): bf16 ~2.6-3.4 ms vs 5.6-7.3 ms for torch.matmul / einsum with
a float32 softmax; fp32 ~5-6 ms vs 10-11 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from pinfer import kernels
from pinfer.model.attention.base import AttentionBackend, AttentionMetadata, Int8KV, KVPool, gather_blocks, values_dtype

# Prefill sequences this long run SDPA instead of the kernel: on AMX CPUs (measured crossover
# ~64-96), and on AVX2-only ones, whose kernel reads every key row once per new token (a Zen 3,
# SmolLM2's heads, bf16, one sequence: the kernel 2.2x SDPA at 64 tokens, 1.3x at 512, even at
# 768-1,002, 0.65x at 2,048)
SDPA_FROM_TOKENS = 96
AVX2_SDPA_FROM_TOKENS = 512


def decode_blocks(max_context_len: int, block_size: int, sliding_window: int | None) -> int:
    """Pages gathered per decode sequence: the whole longest context, or with a window
    just enough pages to hold any W consecutive keys (ceil(W / block_size) + 1)."""
    num_blocks = -(-max_context_len // block_size)
    if sliding_window is not None:
        num_blocks = min(num_blocks, -(-sliding_window // block_size) + 1)
    return num_blocks


@dataclass
class DecodePlan:
    """Which pages a batched decode gathers and which gathered keys each row sees.

    The same for every layer of a step (per sliding window), so PagedAttention builds it
    once per step instead of once per layer: ~10 small tensor ops fewer per layer."""

    block_ids: torch.Tensor  # [B * num_blocks] pool pages to gather, num_blocks per sequence
    visible: torch.Tensor  # [B, 1, 1, num_blocks * block_size] bool: key is attended to
    num_blocks: int


def decode_plan(
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    max_context_len: int,
    block_size: int,
    sliding_window: int | None = None,
) -> DecodePlan:
    num_blocks = decode_blocks(max_context_len, block_size, sliding_window)
    device = block_tables.device
    # Gather num_blocks pages per sequence starting at first_block: 0, or with a window the page
    # holding its first visible key, moved back if needed so the run stays inside the context's pages.
    first_block = torch.zeros_like(context_lens)
    if num_blocks < -(-max_context_len // block_size):
        last_start = (context_lens - 1) // block_size - (num_blocks - 1)
        first_block = ((context_lens - sliding_window) // block_size).clamp(min=0).minimum(last_start.clamp(min=0))
    page = first_block[:, None] + torch.arange(num_blocks, device=device)  # [B, num_blocks]
    # index_select on the block dim is ~4x faster than advanced indexing k_cache[block_tables].
    block_ids = block_tables.gather(1, page).reshape(-1)
    k_pos = first_block[:, None] * block_size + torch.arange(num_blocks * block_size, device=device)  # [B, L]
    visible = k_pos < context_lens[:, None]
    if sliding_window is not None:  # the new token sits at context_len - 1
        visible &= k_pos >= context_lens[:, None] - sliding_window
    return DecodePlan(block_ids, visible[:, None, None, :], num_blocks)


def paged_decode(
    query: torch.Tensor,  # [B, num_heads, head_dim], one new token per sequence
    k_cache: KVPool,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: KVPool,
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    max_context_len: int,
    scale: float,
    workspace: torch.Tensor | None = None,  # flat scratch for the gathered K/V, see PagedAttention
    sliding_window: int | None = None,
    plan: DecodePlan | None = None,  # decode_plan(...) of these arguments, if already made
) -> torch.Tensor:  # [B, num_heads, head_dim]
    """Attention of one new token per sequence over its whole context (or its last
    sliding_window keys), batched."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if plan is None:
        plan = decode_plan(block_tables, context_lens, max_context_len, block_size, sliding_window)
    max_len = plan.num_blocks * block_size
    shape = (num_seqs * plan.num_blocks, *k_cache.shape[1:])
    if workspace is None:
        k = gather_blocks(k_cache, plan.block_ids)
        v = gather_blocks(v_cache, plan.block_ids)
    else:
        k_buf, v_buf = workspace[: 2 * k_cache[0].numel() * shape[0]].view(2, *shape)
        k = torch.index_select(k_cache, 0, plan.block_ids, out=k_buf)
        v = torch.index_select(v_cache, 0, plan.block_ids, out=v_buf)
    k = k.view(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, L, D]
    v = v.view(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)
    # The G query heads of kv head h (h*G .. h*G+G-1) as G query rows against h's keys, rather
    # than enable_gqa: measured (AMD EPYC, 1 thread, B=64, contexts ~100-190, H=9, Hkv=3, D=64,
    # gather included) bf16 3.7 ms vs 18.6 ms; float32 the same (5.8 vs 5.9 ms).
    q = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.visible, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def prefill_one(
    query: torch.Tensor,  # [query_len, num_heads, head_dim]
    k_cache: KVPool,
    v_cache: KVPool,
    block_table: torch.Tensor,  # [max_blocks]
    context_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [query_len, num_heads, head_dim]
    """One sequence's new tokens against its context (cached prefix + themselves)."""
    query_len = query.shape[0]
    block_size = k_cache.shape[1]
    if sliding_window is not None and sliding_window >= context_len:
        sliding_window = None  # the window hides nothing
    # With a window, keys before the first query's window are never read.
    k_start = 0 if sliding_window is None else max(0, context_len - query_len - sliding_window + 1)
    first_block = k_start // block_size
    block_ids = block_table[first_block : -(-context_len // block_size)]
    rows = slice(k_start - first_block * block_size, context_len - first_block * block_size)
    k = gather_blocks(k_cache, block_ids).flatten(0, 1)[rows].transpose(0, 1)[None]  # [1, Hkv, L, D]
    v = gather_blocks(v_cache, block_ids).flatten(0, 1)[rows].transpose(0, 1)[None]
    q = query.transpose(0, 1)[None]  # [1, H, Lq, D]
    if query_len == context_len and sliding_window is None:
        # No prefix: SDPA's top-left causal mask is the right one, and is_causal lets the
        # kernel skip fully masked tiles (1000-token prompt: ~2x faster than an explicit mask).
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # New token j sits at position context_len - query_len + j: causal mask aligned bottom-right.
        q_pos = torch.arange(query_len, device=query.device) + (context_len - query_len)
        k_pos = torch.arange(k_start, context_len, device=query.device)
        visible = k_pos <= q_pos[:, None]  # [Lq, L]
        if sliding_window is not None:
            visible &= k_pos > q_pos[:, None] - sliding_window
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def prefill_padded(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], all tokens of the step
    k_cache: KVPool,
    v_cache: KVPool,
    query_start: torch.Tensor,  # [B] first token row of each prefill sequence
    query_lens: torch.Tensor,  # [B]
    context_lens: torch.Tensor,  # [B]
    block_tables: torch.Tensor,  # [B, max_blocks]
    max_query_len: int,
    max_context_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [B, max_query_len, num_heads, head_dim], padding rows included
    """Several prefill sequences in one SDPA call, padded to the longest; the mask
    encodes both causality (with each sequence's prefix offset) and padding."""
    num_seqs = query_start.shape[0]
    head_dim = query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-max_context_len // block_size)
    max_len = num_blocks * block_size
    device = query.device

    t = torch.arange(max_query_len, device=device)
    rows = (query_start[:, None] + t).clamp(max=query.shape[0] - 1)  # padding rows repeat a real token
    q = query[rows].transpose(1, 2)  # [B, H, Lq, D]
    block_ids = block_tables[:, :num_blocks].reshape(-1)
    k = gather_blocks(k_cache, block_ids).view(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)
    v = gather_blocks(v_cache, block_ids).view(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)
    q_pos = (context_lens - query_lens)[:, None] + t  # [B, Lq]
    # Padding rows take the last real position, so that even with a window no row is fully masked.
    q_pos = torch.minimum(q_pos, context_lens[:, None] - 1)
    k_pos = torch.arange(max_len, device=device)
    visible = (k_pos <= q_pos[:, :, None]) & (k_pos < context_lens[:, None, None])  # [B, Lq, L]
    if sliding_window is not None:
        visible &= k_pos > q_pos[:, :, None] - sliding_window
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def own_pages(block_tables: torch.Tensor, seqs: list[int], context_lens: list[int],
              block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, tables): the pool pages of sequences seqs, in order, and block tables renumbered
    into that list (the other rows of the tables left as they are). The same for every layer
    of a step, so PagedAttention makes it once per step."""
    counts = [-(-context_lens[i] // block_size) for i in seqs]
    ids = torch.cat([block_tables[i, :n] for i, n in zip(seqs, counts)])
    tables = block_tables.clone()
    for i, n, first in zip(seqs, counts, accumulate([0, *counts[:-1]])):
        tables[i, :n] = torch.arange(first, first + n, device=tables.device)
    return ids, tables


def use_padded_prefill(query_lens: list[int], context_lens: list[int]) -> bool:
    """One padded SDPA call, or one call per sequence?

    Measured (2 cores, ms, loop vs padded): 32 prompts of 20-40 tokens 13.2 vs 6.3
    (fp32) and 6.7 vs 5.7 (bf16): for short prompts the per-call overhead dominates.
    But a 1000-token prompt with three 20-token ones: 10 vs 56 (bf16), and 16
    prompts of 10-200 tokens: 15 vs 24 (fp32): padding wastes work on ragged
    batches, and long prompts gain from is_causal's tile skipping, which an
    explicit mask doesn't get (4 prompts of ~500: 27 vs 34). So: pad only short
    prompts (<= 256 new tokens) whose padded area is at most twice the real one.
    """
    if len(query_lens) < 2 or max(query_lens) > 256:
        return False
    real_area = sum(q * c for q, c in zip(query_lens, context_lens))
    return len(query_lens) * max(query_lens) * max(context_lens) <= 2 * real_area


class PagedAttention(AttentionBackend):
    """Batched decode and SDPA prefill over the paged pool.

    Keeps one scratch buffer for the decode gather, reused across layers and steps (so one
    instance must not run two forwards at once). Two fresh multi-MB K/V tensors per call
    make glibc hand the memory back to the OS and fault it in again every time (fp32,
    B=64, L=304: ~6,500 page faults per call; the decode call takes 19 ms instead of 6).
    """

    name = "paged"

    def __init__(self, prefill_mode: str = "auto") -> None:
        assert prefill_mode in ("auto", "loop", "padded"), prefill_mode  # loop/padded: for tests and benchmarks
        self.prefill_mode = prefill_mode
        self._workspace: torch.Tensor | None = None

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: KVPool,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: KVPool,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        window = sliding_window
        if meta.is_pure_decode:
            return self._decode(
                query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.max_context_len, scale, window,
                meta.step_cache, "all rows",
            )

        out = torch.empty_like(query)
        query_lens, context_lens = meta.query_lens_cpu, meta.context_lens_cpu
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        prefill = [i for i, n in enumerate(query_lens) if n > 1]
        if decode:
            seqs = torch.tensor(decode, device=query.device)
            rows = meta.query_start_loc[seqs]
            max_context_len = max(context_lens[i] for i in decode)
            out[rows] = self._decode(
                query[rows], k_cache, v_cache, meta.block_tables[seqs], meta.context_lens[seqs], max_context_len, scale,
                window, meta.step_cache, "decode rows",
            )
        if not prefill:
            return out

        prefill_query_lens = [query_lens[i] for i in prefill]
        prefill_context_lens = [context_lens[i] for i in prefill]
        # pinfer's prefill kernel (bf16, full attention): every prefill sequence in one call, unpadded.
        kernel = (self.prefill_mode == "auto" and window is None and kernels.usable(query)
                  and query.dtype == values_dtype(k_cache) == torch.bfloat16 and query.shape[-1] in (64, 128, 256)
                  and kernels.has("paged_prefill_attention_batch"))  # an AVX512-BF16 or AVX2 build
        padded = self.prefill_mode == "padded" or (
            self.prefill_mode == "auto" and not kernel and use_padded_prefill(prefill_query_lens, prefill_context_lens)
        )
        if padded:
            seqs = torch.tensor(prefill, device=query.device)
            starts = meta.query_start_loc[seqs]
            lens = meta.query_lens[seqs]
            result = prefill_padded(
                query,
                k_cache,
                v_cache,
                starts,
                lens,
                meta.context_lens[seqs],
                meta.block_tables[seqs],
                max(prefill_query_lens),
                max(prefill_context_lens),
                scale,
                window,
            )
            t = torch.arange(result.shape[1], device=query.device)
            is_real = t < lens[:, None]
            out[(starts[:, None] + t)[is_real]] = result[is_real]
        else:
            starts = [0, *accumulate(query_lens)]
            # Where the CPU has AMX, SDPA's flash kernel (oneDNN's tiles) beats pinfer's on longer
            # prompts (examples/kernel_microbench.py: 64 tokens even, 128 1.7x, 1,002 3.4x); on
            # AVX2-only CPUs SDPA's blocked kernel beats the AVX2 one's token-by-token reads.
            kernel_below = (SDPA_FROM_TOKENS if kernels.uses_amx() else AVX2_SDPA_FROM_TOKENS if kernels.avx2_only()
                            else float("inf"))
            by_kernel = [i for i in prefill if kernel and query_lens[i] < kernel_below]
            if by_kernel:  # every such sequence in one call: (table row, first row, new tokens, context)
                tables, k_pages, v_pages = meta.block_tables, k_cache, v_cache
                if isinstance(k_cache, Int8KV):
                    # The kernel reads bf16 pages: the sequences' pages dequantized in one gather per
                    # pool, and their tables renumbered into it.
                    key = ("int8_prefill_pages", tuple(by_kernel))
                    if key not in meta.step_cache:
                        meta.step_cache[key] = own_pages(tables, by_kernel, context_lens, k_cache.shape[1])
                    ids, tables = meta.step_cache[key]
                    k_pages, v_pages = gather_blocks(k_cache, ids), gather_blocks(v_cache, ids)
                key = ("prefill_seqs", tuple(by_kernel))
                if key not in meta.step_cache:
                    meta.step_cache[key] = torch.tensor(
                        [(i, starts[i], query_lens[i], context_lens[i]) for i in by_kernel], dtype=torch.long)
                torch.ops.pinfer.paged_prefill_attention_batch(query, k_pages, v_pages, tables, meta.step_cache[key],
                                                               scale, out)
            for i in sorted(set(prefill) - set(by_kernel)):
                start, end = starts[i], starts[i + 1]
                out[start:end] = prefill_one(
                    query[start:end], k_cache, v_cache, meta.block_tables[i], context_lens[i], scale, window
                )
        return out

    def _decode(
        self,
        query: torch.Tensor,
        k_cache: KVPool,
        v_cache: KVPool,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        max_context_len: int,
        scale: float,
        sliding_window: int | None,
        step_cache: dict,  # the step's AttentionMetadata.step_cache: the plan is made once for every layer
        rows: str,  # which rows of the step these are ("all rows", "decode rows"): part of the cache key
    ) -> torch.Tensor:
        if isinstance(k_cache, Int8KV):
            if kernels.usable(query) and query.shape[-1] % 64 == 0 and kernels.has("paged_decode_attention_int8"):
                return torch.ops.pinfer.paged_decode_attention_int8(
                    query, k_cache.data, v_cache.data, k_cache.scale, v_cache.scale, block_tables, context_lens, scale,
                    sliding_window or 0)
        elif (kernels.usable(query) and kernels.has("paged_decode_attention") and query.dtype == k_cache.dtype
              and query.shape[-1] % 16 == 0 and query.shape[-1] <= 256):
            # Reads the pages in place through the block table: no gather, no mask (kernels/cpu_ops.cpp).
            return torch.ops.pinfer.paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale,
                                                           sliding_window or 0)
        key = ("paged_decode_plan", rows, sliding_window)
        plan = step_cache.get(key)
        if plan is None:
            plan = step_cache[key] = decode_plan(block_tables, context_lens, max_context_len, k_cache.shape[1],
                                                 sliding_window)
        if isinstance(k_cache, Int8KV):  # dequantized pages: a fresh gather, no workspace
            return paged_decode(query, k_cache, v_cache, block_tables, context_lens, max_context_len, scale,
                                sliding_window=sliding_window, plan=plan)
        needed = 2 * query.shape[0] * plan.num_blocks * k_cache[0].numel()
        ws = self._workspace
        if ws is None or ws.numel() < needed or ws.dtype != k_cache.dtype or ws.device != k_cache.device:
            # Grow with headroom: contexts grow by a block every block_size decode steps.
            size = max(needed, int(1.25 * ws.numel()) if ws is not None and ws.dtype == k_cache.dtype else 0)
            self._workspace = ws = torch.empty(size, dtype=k_cache.dtype, device=k_cache.device)
        return paged_decode(query, k_cache, v_cache, block_tables, context_lens, max_context_len, scale, ws,
                            sliding_window, plan)
