"""Every attention backend matches an independent float64 attention on ragged
paged batches: prefill, cached prefix, chunked prefill, decode, and mixes of them,
with GQA, shuffled block tables and block sizes that don't divide the lengths,
with full causal attention and with sliding windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from pinfer.model.attention import (
    ATTENTION_BACKENDS,
    AttentionMetadata,
    PagedAttention,
    get_attention_backend,
    store_kv,
)
from pinfer.model.attention.paged import use_padded_prefill

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M's attention shape
SCALE = 1.0 / math.sqrt(HEAD_DIM)

# Each sequence is (context_len, query_len): the kv length after this step and its new tokens.
BATCHES = {
    "prefill_ragged": [(7, 7), (33, 33), (1, 1), (20, 20), (16, 16)],
    "prefix_cached": [(40, 8), (17, 17), (64, 3), (21, 5)],
    "chunked_prefill": [(48, 16), (37, 13)],  # later chunks: positions 32..47 and 24..36
    "decode": [(1, 1), (37, 1), (100, 1), (16, 1), (17, 1), (5, 1)],
    "mixed": [(30, 30), (45, 1), (60, 12), (1, 1), (5, 1), (23, 23), (80, 1)],
}
BACKEND_VARIANTS = {name: cls for name, cls in ATTENTION_BACKENDS.items()}
# The paged backend's two prefill strategies are both exercised, whatever "auto" picks.
BACKEND_VARIANTS["paged-loop"] = lambda: PagedAttention(prefill_mode="loop")
BACKEND_VARIANTS["paged-padded"] = lambda: PagedAttention(prefill_mode="padded")
# Sliding windows smaller than most contexts above: 1 (itself only), less than a page, odd.
WINDOWS = [1, 5, 37]
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@dataclass
class Batch:
    query: torch.Tensor  # [num_tokens, H, D]
    keys: list[torch.Tensor]  # per sequence, [context_len, Hkv, D], the whole context
    values: list[torch.Tensor]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata


def build_metadata(seqs: list[tuple[int, int]], block_tables: list[list[int]], block_size: int) -> AttentionMetadata:
    """AttentionMetadata for sequences given as (context_len, query_len) with their block tables."""
    context_lens = [c for c, _ in seqs]
    query_lens = [q for _, q in seqs]
    width = max(len(t) for t in block_tables) + 1  # one spare column of padding, as an engine might have
    table = torch.zeros(len(seqs), width, dtype=torch.int64)
    slots = []
    for i, ((context_len, query_len), blocks) in enumerate(zip(seqs, block_tables)):
        table[i, : len(blocks)] = torch.tensor(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(context_len - query_len, context_len)]
    return AttentionMetadata(
        query_start_loc=torch.tensor([0] + query_lens).cumsum(0),
        query_lens=torch.tensor(query_lens),
        context_lens=torch.tensor(context_lens),
        block_tables=table,
        slot_mapping=torch.tensor(slots),
        query_lens_cpu=query_lens,
        context_lens_cpu=context_lens,
        block_size=block_size,
    )


def make_batch(seqs: list[tuple[int, int]], block_size: int, dtype: torch.dtype, seed: int = 0) -> Batch:
    """Random queries and contexts; each context is written into the pool at shuffled block ids."""
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-c // block_size) for c, _ in seqs]
    num_blocks = sum(blocks_needed) + 4
    # Unused slots hold large finite garbage: a backend that reads past a context or skips the mask fails.
    k_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, generator=g).mul(30).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, generator=g).mul(30).to(dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = []
    for n in blocks_needed:
        block_tables.append(free[:n])
        free = free[n:]

    keys, values = [], []
    for (context_len, _), blocks in zip(seqs, block_tables):
        k = torch.randn(context_len, NUM_KV_HEADS, HEAD_DIM, generator=g).to(dtype)
        v = torch.randn(context_len, NUM_KV_HEADS, HEAD_DIM, generator=g).to(dtype)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(context_len)])
        store_kv(k, v, k_cache, v_cache, slots)
        keys.append(k)
        values.append(v)
    num_tokens = sum(q for _, q in seqs)
    # Scaled up so that softmaxes are peaked, not near-uniform.
    query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, generator=g).mul(3).to(dtype)
    return Batch(query, keys, values, k_cache, v_cache, build_metadata(seqs, block_tables, block_size))


def naive_attention(batch: Batch, scale: float = SCALE, sliding_window: int | None = None) -> torch.Tensor:
    """Float64, per sequence, K/V repeated to every query head, causal softmax
    (over the last sliding_window keys only, if given)."""
    group = NUM_HEADS // NUM_KV_HEADS
    outs = []
    start = 0
    for (context_len, query_len), k, v in zip(zip(batch.meta.context_lens_cpu, batch.meta.query_lens_cpu), batch.keys, batch.values):
        q = batch.query[start : start + query_len].double()
        k = k.double().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        for j in range(query_len):
            position = context_len - query_len + j
            scores[:, j, position + 1 :] = float("-inf")
            if sliding_window is not None:
                scores[:, j, : max(0, position - sliding_window + 1)] = float("-inf")
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v))
        start += query_len
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("case", list(BATCHES))
@pytest.mark.parametrize("backend", list(BACKEND_VARIANTS))
def test_backend_matches_naive_attention(backend: str, case: str, block_size: int, dtype: torch.dtype) -> None:
    batch = make_batch(BATCHES[case], block_size, dtype)
    out = BACKEND_VARIANTS[backend]().forward(batch.query, batch.k_cache, batch.v_cache, batch.meta, SCALE)
    assert out.shape == batch.query.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), naive_attention(batch), **TOLERANCE[dtype])


# float32 only: masking does not depend on the dtype, which the full-attention test covers.
@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("case", list(BATCHES))
@pytest.mark.parametrize("backend", list(BACKEND_VARIANTS))
def test_backend_matches_naive_attention_with_sliding_window(
    backend: str, case: str, window: int, block_size: int, dtype: torch.dtype
) -> None:
    batch = make_batch(BATCHES[case], block_size, dtype)
    out = BACKEND_VARIANTS[backend]().forward(
        batch.query, batch.k_cache, batch.v_cache, batch.meta, SCALE, sliding_window=window
    )
    assert out.shape == batch.query.shape and out.dtype == dtype
    expected = naive_attention(batch, sliding_window=window)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])
    if dtype == torch.float32 and window < max(BATCHES[case])[0]:
        # The window really changes the result (so the comparison above can fail).
        assert not torch.allclose(out.double(), naive_attention(batch), atol=1e-3)


def test_naive_window_hides_exactly_the_old_keys() -> None:
    """The float64 reference itself: a key W positions back is hidden, W - 1 back is visible.
    Setting the values of hidden keys to garbage must not change the output."""
    batch = make_batch([(20, 1)], block_size=16, dtype=torch.float32, seed=5)
    out = naive_attention(batch, sliding_window=4)  # the query at position 19 sees keys 16..19
    batch.values[0][:16] = 1e6
    torch.testing.assert_close(naive_attention(batch, sliding_window=4), out)
    batch.values[0][16] = 1e6
    assert not torch.allclose(naive_attention(batch, sliding_window=4), out)


@pytest.mark.parametrize("backend", list(BACKEND_VARIANTS))
def test_backend_matches_sdpa_on_one_prompt(backend: str) -> None:
    """Sanity check against torch itself: one prompt, no prefix, plain causal SDPA."""
    batch = make_batch([(50, 50)], block_size=16, dtype=torch.float32, seed=1)
    q = batch.query.transpose(0, 1)[None]  # [1, H, L, D]
    k = batch.keys[0].transpose(0, 1)[None]
    v = batch.values[0].transpose(0, 1)[None]
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)[0].transpose(0, 1)
    out = BACKEND_VARIANTS[backend]().forward(batch.query, batch.k_cache, batch.v_cache, batch.meta, SCALE)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 37], ids=["full", "window37"])
@pytest.mark.parametrize("backend", list(BACKEND_VARIANTS))
def test_large_decode_batch(backend: str, window: int | None) -> None:
    """A serving-sized decode batch: 64 sequences with contexts of 100-300 tokens
    (with a window, the paged backend gathers only the pages the window touches)."""
    lens = torch.randint(100, 300, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    batch = make_batch([(n, 1) for n in lens], block_size=16, dtype=torch.float32, seed=2)
    out = BACKEND_VARIANTS[backend]().forward(
        batch.query, batch.k_cache, batch.v_cache, batch.meta, SCALE, sliding_window=window
    )
    torch.testing.assert_close(out.double(), naive_attention(batch, sliding_window=window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
def test_decode_equals_last_row_of_prefill(window: int | None) -> None:
    """Decoding token L against a cached context gives what a full prefill gives for its last row."""
    full = make_batch([(29, 29)], block_size=5, dtype=torch.float32, seed=3)
    last = Batch(
        full.query[-1:],
        full.keys,
        full.values,
        full.k_cache,
        full.v_cache,
        build_metadata([(29, 1)], [full.meta.block_tables[0, :6].tolist()], 5),
    )
    for name in ATTENTION_BACKENDS:
        backend = get_attention_backend(name)
        prefill = backend.forward(full.query, full.k_cache, full.v_cache, full.meta, SCALE, sliding_window=window)
        decode = backend.forward(last.query, last.k_cache, last.v_cache, last.meta, SCALE, sliding_window=window)
        torch.testing.assert_close(decode, prefill[-1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", list(BACKEND_VARIANTS))
def test_non_contiguous_query(backend: str) -> None:
    """Queries sliced out of a fused QKV projection are strided views; backends must not assume otherwise."""
    batch = make_batch(BATCHES["mixed"], block_size=5, dtype=torch.float32, seed=4)
    fused = torch.cat([batch.query, torch.randn(batch.query.shape[0], 2 * NUM_KV_HEADS, HEAD_DIM)], dim=1)
    query = fused[:, :NUM_HEADS]
    assert not query.is_contiguous()
    out = BACKEND_VARIANTS[backend]().forward(query, batch.k_cache, batch.v_cache, batch.meta, SCALE)
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=1e-5, rtol=1e-5)


def test_paged_reuses_its_workspace_across_shapes_and_dtypes() -> None:
    """The paged backend keeps one decode scratch buffer; growing, shrinking and
    changing dtype between calls must not change results."""
    backend = PagedAttention()
    for seqs, dtype in [
        ([(200, 1)] * 8, torch.float32),
        ([(30, 1), (7, 1)], torch.float32),
        ([(300, 1)] * 12, torch.float32),
        (BATCHES["mixed"], torch.float32),
        ([(90, 1)] * 5, torch.bfloat16),
        (BATCHES["decode"], torch.float32),
    ]:
        batch = make_batch(seqs, block_size=16, dtype=dtype, seed=len(seqs))
        out = backend.forward(batch.query, batch.k_cache, batch.v_cache, batch.meta, SCALE)
        torch.testing.assert_close(out.double(), naive_attention(batch), **TOLERANCE[dtype])


def test_kernel_prefill_with_long_prompts_on_sdpa_matches_naive_attention(monkeypatch) -> None:
    """With the CPU kernels on, a step's short prompts run the prefill kernel; on AMX and AVX2-only
    CPUs its long ones (SDPA_FROM_TOKENS / AVX2_SDPA_FROM_TOKENS and more, with or without a cached
    prefix) run SDPA in the same step, and every row still matches the float64 reference."""
    from pinfer import kernels
    from pinfer.model.attention import paged

    if not (kernels.load() and kernels.has("paged_prefill_attention_batch")):
        pytest.skip(f"no prefill kernel here ({kernels.status()})")
    long = paged.AVX2_SDPA_FROM_TOKENS if kernels.avx2_only() else paged.SDPA_FROM_TOKENS
    batch = make_batch([(20, 20), (long, long), (37, 1), (long + 40, long), (9, 9)], 16, torch.bfloat16, seed=3)
    on_sdpa, real_prefill_one = [], paged.prefill_one

    def counted_prefill_one(query, *args, **kwargs):
        on_sdpa.append(query.shape[0])
        return real_prefill_one(query, *args, **kwargs)

    monkeypatch.setattr(paged, "prefill_one", counted_prefill_one)
    with kernels.active():
        out = PagedAttention().forward(batch.query, batch.k_cache, batch.v_cache, batch.meta, SCALE)
    torch.testing.assert_close(out.double(), naive_attention(batch), **TOLERANCE[torch.bfloat16])
    assert on_sdpa == ([long, long] if kernels.uses_amx() or kernels.avx2_only() else [])


def test_padded_prefill_only_for_short_similar_prompts() -> None:
    assert use_padded_prefill([60, 55, 64, 58], [60, 55, 64, 58])
    assert use_padded_prefill([64, 64], [300, 280])  # later chunks of equal size
    assert not use_padded_prefill([60], [60])  # a single prompt: is_causal, no padding
    assert not use_padded_prefill([1000, 20, 20], [1000, 20, 20])  # long and ragged
    assert not use_padded_prefill([200, 10, 10, 10], [200, 10, 10, 10])  # mostly padding


@pytest.mark.parametrize("window", [None, 5, 37], ids=["full", "window5", "window37"])
def test_batch_invariant_rows_do_not_depend_on_the_batch(window: int | None) -> None:
    """A token's output is bitwise the same alone, in a mixed batch, as a chunk or as a decode step
    (with a window too: then the first splits of a long context are fully masked, or skipped)."""
    backend = get_attention_backend("batch_invariant")
    mixed = make_batch(BATCHES["mixed"], block_size=16, dtype=torch.float32, seed=3)
    full = backend.forward(mixed.query, mixed.k_cache, mixed.v_cache, mixed.meta, SCALE, sliding_window=window)
    assert torch.isfinite(full).all()
    starts = mixed.meta.query_start_loc.tolist()
    for i, (context_len, query_len) in enumerate(BATCHES["mixed"]):
        # Sequence i alone, then each of its tokens as a one-token step over the same pages.
        rows = slice(starts[i], starts[i + 1])
        alone = build_metadata([(context_len, query_len)], [mixed.meta.block_tables[i].tolist()], 16)
        out = backend.forward(mixed.query[rows], mixed.k_cache, mixed.v_cache, alone, SCALE, sliding_window=window)
        assert torch.equal(out, full[rows])
        for j in range(query_len):
            one = build_metadata([(context_len - query_len + j + 1, 1)], [mixed.meta.block_tables[i].tolist()], 16)
            token = mixed.query[starts[i] + j : starts[i] + j + 1]
            out = backend.forward(token, mixed.k_cache, mixed.v_cache, one, SCALE, sliding_window=window)
            assert torch.equal(out, full[starts[i] + j][None])


def test_registry() -> None:
    assert set(ATTENTION_BACKENDS) == {"reference", "blocked", "paged", "batch_invariant"}
    assert get_attention_backend().name == "paged"
    for name in ATTENTION_BACKENDS:
        assert get_attention_backend(name).name == name
    with pytest.raises(ValueError, match="reference, blocked, paged, batch_invariant"):
        get_attention_backend("flash")
