"""The int8 KV cache (kv_cache_dtype="int8", Int8KV in model/attention/base.py).

The pool stores each (token, kv head) row as int8 values and one float32 scale. Every
backend, reading the pool through gather_blocks, matches a float64 attention over the
values the pool holds. The CPU kernels match PyTorch: the store gives the same bits, and
decode attention matches its own arithmetic (the query quantized per row) computed in
float64. On the real SmolLM2 weights, the int8 cache holds ~1.9x the tokens and changes
teacher-forced logprobs only slightly.
"""

from __future__ import annotations

import math

import pytest
import torch

from pinfer import LLM, SamplingParams, kernels
from pinfer.config import EngineConfig
from pinfer.errors import PinferError
from pinfer.model.attention import PagedAttention, get_attention_backend, store_kv
from pinfer.model.attention.base import Int8KV
from test_attention import BACKEND_VARIANTS, BATCHES, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, SCALE, TOLERANCE, Batch, \
    make_batch, naive_attention


def quantize_dequantize(x: torch.Tensor) -> torch.Tensor:
    """Rows of the last dim rounded to 8 bits with scale max|row| / 127 (the format's float32
    ops: in float64 a quotient near .5 can round the other way), as exact float64 values."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).double() * scale.double()


def int8_pools(batch: Batch) -> tuple[Int8KV, Int8KV]:
    """batch's pools (context and garbage alike) copied into int8 pools, slot by slot."""
    return Int8KV.from_values(batch.k_cache), Int8KV.from_values(batch.v_cache)


def stored_values(batch: Batch, rounded_to: torch.dtype = torch.float64) -> Batch:
    """batch with each context's keys and values as an int8 pool holds them; rounded_to: the
    dtype pages are handed out in (gather_blocks gives the model's dtype, the kernel float32)."""
    def stored(x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x).to(rounded_to).double()

    return Batch(batch.query, [stored(k) for k in batch.keys], [stored(v) for v in batch.values],
                 batch.k_cache, batch.v_cache, batch.meta)


def test_store_keeps_each_row_to_half_a_step_and_leaves_other_slots_alone() -> None:
    pool = Int8KV(torch.zeros(4, 8, 2, 64, dtype=torch.int8), torch.zeros(4, 8, 2, 1), torch.float32)
    x = torch.randn(5, 2, 64) * torch.tensor([0.01, 30.0])[None, :, None]  # very different row scales
    x[3, 1] = 0.0  # an all-zero row: scale clamped, values 0
    slots = torch.tensor([3, 17, 8, 30, 0])
    pool.store(slots, x)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    assert torch.equal(pool.scale.view(-1, 2, 1)[slots], scale)
    values = pool.blocks(torch.arange(4)).view(-1, 2, 64)
    assert (values[slots] - x).abs().le(scale / 2 * (1 + 1e-6)).all()
    assert pool.data.view(-1, 2, 64)[slots].abs().max() == 127  # each row's largest value uses the full range
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert not pool.data.view(-1, 2, 64)[untouched].any() and not pool.scale.view(-1, 2, 1)[untouched].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_store_has_the_pytorch_bits(dtype: torch.dtype) -> None:
    if not (kernels.load() and kernels.has("store_kv_int8")):
        pytest.skip(f"no store_kv_int8 kernel in this build ({kernels.status()})")
    pools = [[Int8KV(torch.zeros(6, 16, 3, 64, dtype=torch.int8), torch.zeros(6, 16, 3, 1), dtype) for _ in range(2)]
             for _ in range(2)]
    qkv = torch.randn(37, 15, 64).mul(5).to(dtype)  # k and v as strided views of a fused projection
    key, value = qkv[:, 9:12], qkv[:, 12:15]
    slots = torch.randperm(96)[:37]
    store_kv(key, value, *pools[0], slots)
    with kernels.active():
        store_kv(key, value, *pools[1], slots)
    for torch_pool, kernel_pool in zip(*pools):
        assert torch.equal(torch_pool.data, kernel_pool.data) and torch.equal(torch_pool.scale, kernel_pool.scale)


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["decode", "mixed", "prefix_cached"])
@pytest.mark.parametrize("backend", list(BACKEND_VARIANTS))
def test_backends_on_int8_pools_match_float64_on_the_stored_values(backend, case, dtype, window) -> None:
    """The PyTorch path of every backend (kernels off) attends over exactly the stored values."""
    batch = make_batch(BATCHES[case], block_size=5, dtype=dtype)
    k_pool, v_pool = int8_pools(batch)
    out = BACKEND_VARIANTS[backend]().forward(batch.query, k_pool, v_pool, batch.meta, SCALE, sliding_window=window)
    assert out.shape == batch.query.shape and out.dtype == dtype
    expected = naive_attention(stored_values(batch, rounded_to=dtype), sliding_window=window)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])
    # and the rounding is visible: the stored values are not the originals
    assert not torch.allclose(expected, naive_attention(batch, sliding_window=window), atol=1e-4)


@pytest.mark.parametrize("window", [None, 37], ids=["full", "window37"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_seqs", [6, 64])  # one kv head per work item, then all three
def test_kernel_decode_matches_its_arithmetic_in_float64(num_seqs, dtype, window) -> None:
    """The kernel quantizes each query row (scale max|q| / 127) and reads the int8 rows in
    place: float64 attention of those rounded queries over the stored values is its result."""
    if not (kernels.load() and kernels.has("paged_decode_attention_int8")):
        pytest.skip(f"no paged_decode_attention_int8 kernel in this build ({kernels.status()})")
    lens = torch.randint(1, 200, (num_seqs,), generator=torch.Generator().manual_seed(num_seqs)).tolist()
    batch = make_batch([(n, 1) for n in lens], block_size=16, dtype=dtype, seed=num_seqs)
    k_pool, v_pool = int8_pools(batch)
    with kernels.active():
        out = PagedAttention().forward(batch.query, k_pool, v_pool, batch.meta, SCALE, sliding_window=window)
    assert out.dtype == dtype
    rounded = stored_values(batch)
    rounded.query = quantize_dequantize(batch.query.float())
    expected = naive_attention(rounded, sliding_window=window)
    tolerance = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_pools_through_the_kernels_and_a_strided_query(dtype: torch.dtype) -> None:
    """A mixed batch with the kernels on (decode rows: the int8 decode kernel; bf16 prefill rows:
    the prefill kernel on the step's pages dequantized), on queries sliced from a fused
    projection, against the reference backend on the same pools: they agree to the decode
    kernel's rounding of the queries."""
    batch = make_batch(BATCHES["mixed"], block_size=5, dtype=dtype, seed=9)
    k_pool, v_pool = int8_pools(batch)
    fused = torch.cat([batch.query, torch.randn(batch.query.shape[0], 2 * NUM_KV_HEADS, HEAD_DIM).to(dtype)], dim=1)
    query = fused[:, :NUM_HEADS]
    with kernels.active():
        out = PagedAttention().forward(query, k_pool, v_pool, batch.meta, SCALE)
    reference = get_attention_backend("reference").forward(query, k_pool, v_pool, batch.meta, SCALE)
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0.05)  # the kernel's rounded queries (decode rows)


def test_kv_cache_dtype_is_validated() -> None:
    with pytest.raises(PinferError, match="kv_cache_dtype must be one of 'auto', 'int8', got 'fp8'"):
        EngineConfig(model="x", kv_cache_dtype="fp8")


def teacher_forced_logprobs(llm: LLM, prompt_ids: list[int]) -> list[float]:
    out = llm.generate([prompt_ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return [entry[prompt_ids[i]].logprob for i, entry in enumerate(out.prompt_logprobs) if entry is not None]


SCORING_TEXT = (
    "The river starts high in the mountains, where snow melts in the spring and runs down through "
    "narrow valleys. By the time it reaches the town, it is wide and slow, and children fish from the "
    "old stone bridge on summer evenings. Farmers along its banks grow wheat, apples and grapes, and "
    "every autumn the town holds a market where they sell what they have harvested. Visitors come from "
    "the cities to walk the paths along the water, to eat in the small restaurants near the square, and "
    "to see the church, which was built more than six hundred years ago. In winter the river sometimes "
    "freezes at the edges, and the town becomes quiet again. Most people who grew up there say that "
    "they would not want to live anywhere else, although many of the young leave to study or to work. "
    "Some of them come back when they are older, buy a house near the water, and spend their mornings "
    "reading on the bridge while the fishermen wait for the first bite of the day."
) * 2


@pytest.fixture(scope="module")
def scoring_text_ids(smollm2_gguf) -> list[int]:
    llm = LLM(str(smollm2_gguf), dtype="bfloat16", kv_cache_memory="16MiB")
    return llm.engine.tokenizer.encode(SCORING_TEXT)


@pytest.mark.parametrize("decode_path", [False, True], ids=["prefill", "decode-steps"])
def test_smollm2_int8_kv_cache_holds_twice_the_tokens_and_keeps_the_logprobs(
        smollm2_gguf, smollm2_llm, scoring_text_ids, decode_path) -> None:
    """Teacher-forced logprobs of a text, bf16 weights, with the bf16 and the int8 cache, against
    the float32 engine's: the int8 cache moves them at most twice as far as bf16 rounding alone
    does (measured: 0.045-0.048 vs 0.032 mean |difference|), and perplexity stays within 1.5%.
    decode-steps: a token budget of 1 makes every prompt token a decode step, so the logprobs
    come through the decode kernel and the fused stack."""
    budget = {"max_num_batched_tokens": 1} if decode_path else {}
    bf16 = LLM(str(smollm2_gguf), dtype="bfloat16", kv_cache_memory="32MiB", **budget)
    int8 = LLM(str(smollm2_gguf), dtype="bfloat16", kv_cache_memory="32MiB", kv_cache_dtype="int8", **budget)
    # 64 + 4 bytes a head row instead of 128: the same memory holds 1.88x the tokens
    assert int8.engine.kv_capacity_tokens / bf16.engine.kv_capacity_tokens == pytest.approx(128 / 68, rel=0.01)
    ids = scoring_text_ids[:160] if decode_path else scoring_text_ids
    reference = teacher_forced_logprobs(smollm2_llm, ids)
    with_bf16, with_int8 = teacher_forced_logprobs(bf16, ids), teacher_forced_logprobs(int8, ids)
    assert len(with_int8) == len(reference) == len(ids) - 1
    assert with_int8 != with_bf16  # the rounding reaches the logprobs

    def mean_abs_difference(logprobs: list[float]) -> float:
        return sum(abs(a - b) for a, b in zip(logprobs, reference)) / len(reference)

    assert mean_abs_difference(with_int8) < 2 * mean_abs_difference(with_bf16)
    perplexity = [math.exp(-sum(lp) / len(lp)) for lp in (reference, with_int8)]
    assert perplexity[1] == pytest.approx(perplexity[0], rel=0.015), perplexity


def test_smollm2_int8_kv_cache_generates_and_survives_sleep(smollm2_gguf) -> None:
    llm = LLM(str(smollm2_gguf), dtype="bfloat16", kv_cache_memory="32MiB", kv_cache_dtype="int8")
    # "Answer in one sentence": without it the first token is a near-tie ("The" leads "L'" by 0.08
    # in float32, less than one bf16 step of the logits), which one rounding of the bf16 GEMMs
    # (AMX vs AVX-512) or of the int8 cache flips
    question = "What is the capital of France? Answer in one sentence."
    prompt = llm.apply_chat_template([{"role": "user", "content": question}])
    params = SamplingParams(max_tokens=12, temperature=0)
    first = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert "Paris" in first.text
    llm.engine.sleep(level=1)  # the pool and its scales are freed, then allocated and zeroed again
    llm.engine.wake_up()
    llm.engine.block_manager.reset_prefix_cache()
    again = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert again.token_ids == first.token_ids


def test_deterministic_mode_with_an_int8_kv_cache_stays_batch_invariant(tmp_path, tokenizer_dir) -> None:
    """Rows are quantized one (token, kv head) at a time and the batch-invariant backend reads the
    dequantized pages, so a request's tokens and logprobs are bitwise the same alone, batched
    with other prompts (chunked: a budget of 16 tokens a step) and in a small pool."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tiny_models import save_checkpoint

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=512, max_position_embeddings=256,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)  # head_dim 64
    save_checkpoint(AutoModelForCausalLM.from_config(config, dtype=torch.float32), tmp_path, tokenizer_dir)
    llm = LLM(str(tmp_path), dtype="bfloat16", deterministic=True, kv_cache_dtype="int8", block_size=4,
              kv_cache_memory="2MiB", max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, logprobs=0, ignore_eos=True)
    prompt = [1, 5, 7, 9, 11, 13]
    gen = torch.Generator().manual_seed(1)
    others = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (9, 30, 41)]
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    batched = llm.generate([*others, prompt], params, use_tqdm=False)[-1].outputs[0]
    assert batched.token_ids == alone.token_ids and batched.token_logprobs == alone.token_logprobs
