"""pinfer's CPU kernels (src/pinfer/kernels) against the PyTorch path they replace.

Norms, residual adds and RoPE round to the dtype where the PyTorch path does, so they agree
bit for bit or to the last bf16 bit (float32 sums in another order); attention agrees to
float rounding. Engine-level agreement with transformers is in the other model tests, which
run the engine with the kernels on.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pinfer import kernels
from pinfer.config import RopeConfig
from pinfer.model.attention.paged import paged_decode
from pinfer.model.layers.norm import RMSNorm
from pinfer.model.layers.rotary import RotaryEmbedding


def _cpu_flags() -> set[str]:
    try:
        return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def _cpu_has_avx512() -> bool:
    return {"avx512f", "avx512bw"} <= _cpu_flags()


@pytest.fixture(scope="module", autouse=True)
def built():
    if os.environ.get("PINFER_CPU_KERNELS") == "0" or not (_cpu_has_avx512() or {"avx2", "fma"} <= _cpu_flags()):
        pytest.skip("no AVX-512 or AVX2 on this CPU (or PINFER_CPU_KERNELS=0): the engine uses the PyTorch path")
    # On a machine that can run them, failing to build them is a failure, not a skip.
    assert kernels.load(), kernels.status()


# What kernels/cpu_ops_avx2.cpp (and cpu_ops.cpp's store_kv and row_keys) build on CPUs with AVX2 but no AVX-512.
AVX2_OPS = {"bf16_gemm", "paged_decode_attention", "rms_norm", "add_rms_norm", "rotary_", "silu_mul", "store_kv",
            "row_keys", "gumbel_sample", "argmax", "quantize_rows", "dequantize_rows", "int8_gemm",
            "paged_prefill_attention_batch"}


def needs(*ops: str) -> None:
    """Skip a test of ops this CPU's build leaves out by design (the AVX-512 set on an AVX2 CPU);
    an op missing where the CPU could run it fails."""
    for op in ops:
        if _cpu_has_avx512() or op in AVX2_OPS:
            assert kernels.has(op), f"{op} missing from this build ({kernels.status()})"
        else:
            pytest.skip(f"{op} needs AVX-512; this CPU has AVX2 only")


DTYPES = [torch.bfloat16, torch.float32]


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place (bf16 or float32 bit patterns of finite values)."""
    int_type = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return int((a.view(int_type).long() - b.view(int_type).long()).abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [576, 100])  # 100: a partial last vector
def test_rms_norm_and_fused_residual_add(dtype, dim):
    needs("rms_norm", "add_rms_norm")
    torch.manual_seed(0)
    norm = RMSNorm(dim, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim) + 0.5)
    x = (torch.randn(37, dim) * 3).to(dtype)
    residual = torch.randn(37, dim).to(dtype)
    ref_sum = x + residual
    ref = norm(ref_sum)  # outside kernels.active(): the PyTorch path
    with kernels.active():
        plain = norm(ref_sum)
        fused, new_residual = norm.add_and_norm(x, residual.clone())
    assert torch.equal(new_residual, ref_sum)  # the add rounds exactly as aten's
    # The float32 mean is summed in another order: a few float32 ulps, which in bf16 rarely
    # moves a result, and then by one step.
    ulps = 1 if dtype == torch.bfloat16 else 8
    assert _ulps_apart(plain, ref) <= ulps and _ulps_apart(fused, ref) <= ulps
    if dtype == torch.bfloat16:
        assert (plain != ref).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 256])
def test_rotary_in_place_matches_pytorch(dtype, head_dim):
    needs("rotary_")
    torch.manual_seed(0)
    heads, kv_heads, tokens = 6, 2, 19
    rotary = RotaryEmbedding(head_dim, 4096, RopeConfig(theta=10000.0))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)  # strided views, as in the model
    positions = torch.randint(0, 4096, (tokens,))
    ref_q, ref_k = rotary(positions, q.clone(), k.clone())
    with kernels.active():
        out_q, out_k = rotary(positions, q, k)
    assert out_q.data_ptr() == q.data_ptr()  # rotated in place
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


def _paged_pool(dtype, num_seqs, max_len, kv_heads, head_dim, block_size=16):
    blocks_per_seq = -(-max_len // block_size)
    num_blocks = num_seqs * blocks_per_seq + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    # each sequence's pages scattered over the pool
    tables = torch.randperm(num_blocks)[: num_seqs * blocks_per_seq].view(num_seqs, blocks_per_seq)
    return k_cache, v_cache, tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,window",
    # groups of 3, 1, 8 (3 + 3 + 2 rows at a time on AVX2) and 2; head_dim 80: 10 vectors of 8
    [(9, 3, 64, None), (4, 4, 128, None), (8, 1, 256, 40), (6, 2, 64, 17), (4, 2, 80, None)],
)
@pytest.mark.parametrize("num_seqs", [7, 2])  # 2: fewer sequences than 2 x threads, one kv head per work item
def test_paged_decode_attention_matches_sdpa(dtype, heads, kv_heads, head_dim, window, num_seqs):
    needs("paged_decode_attention")
    torch.manual_seed(0)
    max_len = 130
    k_cache, v_cache, tables = _paged_pool(dtype, num_seqs, max_len, kv_heads, head_dim)
    # one key, block edges, longer than the window
    context_lens = torch.tensor([1, 2, 15, 16, 17, 64, 130][-num_seqs:])
    query = torch.randn(num_seqs, heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    ref = paged_decode(query, k_cache, v_cache, tables, context_lens, max_len, scale, sliding_window=window)
    out = torch.ops.pinfer.paged_decode_attention(query, k_cache, v_cache, tables, context_lens, scale, window or 0)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, **tol)


def test_paged_decode_attention_names_an_unsupported_head_size():
    needs("paged_decode_attention")
    pool = torch.zeros(2, 16, 1, 24)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.pinfer.paged_decode_attention(torch.zeros(1, 1, 24), pool, pool, torch.zeros(1, 1, dtype=torch.long),
                                                torch.ones(1, dtype=torch.long), 1.0, 0)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 64, 131])  # 1: the batch-1 tile; 6: one AVX2 tile; 7, 131: partial tiles
@pytest.mark.parametrize("k_dim,n_dim", [(576, 960), (1536, 576), (64, 48), (576, 80)])  # 48, 80: odd block counts
def test_bf16_gemm_sums_in_float32_and_rounds_once(rows, k_dim, n_dim):
    needs("bf16_gemm")
    torch.manual_seed(rows)
    weight = torch.randn(n_dim, k_dim).to(torch.bfloat16)
    x = torch.randn(rows, k_dim).to(torch.bfloat16)
    bias = torch.randn(n_dim).to(torch.bfloat16)
    out = torch.ops.pinfer.bf16_gemm(x, kernels.pack_for_gemm(weight).contiguous(), bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n_dim)
    exact = x.double() @ weight.double().t() + bias.double()
    # float32 sums of k_dim products, then one rounding to bf16: within a bf16 ulp of the exact
    # value plus the float32 sum's error
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs()
    float_error = k_dim * torch.finfo(torch.float32).eps * (x.double().abs() @ weight.double().abs().t())
    assert ((out.double() - exact).abs() <= ulp + float_error).all()
    without_bias = torch.ops.pinfer.bf16_gemm(x, kernels.pack_for_gemm(weight).contiguous(), None)
    torch.testing.assert_close(without_bias.double(), exact - bias.double(), atol=0.1, rtol=0.02)


def test_bf16_gemm_refuses_a_weight_packed_for_another_k():
    needs("bf16_gemm")
    x = torch.randn(2, 64).to(torch.bfloat16)
    packed = kernels.pack_for_gemm(torch.randn(16, 32).to(torch.bfloat16)).contiguous()
    with pytest.raises(RuntimeError, match="packed for K = 32, input has K = 64"):
        torch.ops.pinfer.bf16_gemm(x, packed, None)


def test_kernel_rejects_a_dtype_it_does_not_handle():
    needs("rms_norm")
    x = torch.randn(2, 64, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 only"):
        torch.ops.pinfer.rms_norm(x, torch.ones(64, dtype=torch.float64), 1e-6)


def test_kernels_are_used_only_inside_active():
    x = torch.randn(2, 64)
    assert not kernels.usable(x)
    with kernels.active():
        assert kernels.usable(x) and not kernels.usable(x.double())
        with kernels.active(False):
            assert not kernels.usable(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_has_the_bits_of_silu_times_up(dtype):
    needs("silu_mul")
    from pinfer.model.llama import silu_and_mul

    torch.manual_seed(0)
    gate_up = (torch.randn(5, 2 * 1540) * 4).to(dtype)  # 1540: a partial last vector
    ref = silu_and_mul(gate_up)  # the PyTorch path: F.silu(gate) * up
    with kernels.active():
        out = silu_and_mul(gate_up)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_strided_rows_into_their_slots(dtype):
    needs("store_kv")
    from pinfer.model.attention.base import store_kv

    torch.manual_seed(0)
    kv_heads, head_dim, tokens = 3, 64, 9
    qkv = torch.randn(tokens, 4 * kv_heads * head_dim).to(dtype)
    _, key, value = qkv.split([2 * kv_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    key, value = key.view(tokens, kv_heads, head_dim), value.view(tokens, kv_heads, head_dim)
    slots = torch.randperm(4 * 16)[:tokens]
    caches = [torch.zeros(4, 16, kv_heads, head_dim, dtype=dtype) for _ in range(4)]
    store_kv(key, value, caches[0], caches[1], slots)
    with kernels.active():
        store_kv(key, value, caches[2], caches[3], slots)
        with pytest.raises(RuntimeError, match="outside the pool"):
            store_kv(key, value, caches[2], caches[3], slots + 4 * 16)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    assert torch.equal(caches[0].flatten(0, 1)[slots], key)


@pytest.mark.parametrize("dtype", DTYPES)
# The int8 GEMM on the packed copy (N % 16 == 0), else (964) quantize -> _int_mm -> rescale.
# 1..7 rows: partial register tiles; 200: full tiles (6 rows with VNNI, 4 on AVX2) and a partial
# one; 1,500 inputs: K not a multiple of 64 (nor of 8: AVX2's quantization tail); 944 outputs:
# an odd number of 16-column blocks (AVX2's batch 1 takes them two at a time).
@pytest.mark.parametrize("rows,in_features,out_features",
                         [(1, 576, 964), (3, 576, 964), (4, 576, 960), (7, 576, 964), (7, 576, 960),
                          (1, 1500, 944), (64, 576, 3072), (200, 1500, 944)])
def test_int8_linear_has_the_bits_of_the_pytorch_path(dtype, rows, in_features, out_features):
    needs("quantize_rows")
    from pinfer.model.quantization import Int8Linear

    torch.manual_seed(0)
    linear = Int8Linear(in_features, out_features)
    linear.set_weight(torch.randn(out_features, in_features) * 0.05)
    x = torch.randn(rows, in_features).to(dtype)
    x[0, 5] = 9.0  # a large value sets the row's scale
    ref = linear(x)
    with kernels.active():
        out = linear(x)
    assert out.dtype == dtype and torch.equal(out, ref)
    if "avx512_vnni" in _cpu_flags() or not _cpu_has_avx512():  # the int8 GEMM ran, not the fallback
        assert kernels.has("int8_gemm")
        assert linear.qweight_vnni.numel() == (in_features * out_features if out_features % 16 == 0 else 0)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int8_gemm_is_exact_at_the_int8_extremes(rows):
    """-128 weights (a GGUF Q8_0 block may hold them) and +-127 inputs of either sign: the sums
    stay exact (AVX2 multiplies |w| by sign(w) x on vpmaddubsw, whose int16 pair sums saturate
    past 32,767)."""
    needs("int8_gemm")
    torch.manual_seed(0)
    w = torch.randint(-128, 128, (48, 576), dtype=torch.int8)
    w[:, ::3] = -128
    w[::2, 1::3] = 127
    x = (torch.rand(rows, 576) * 2 - 1) * 100  # scale 100 / 127: the inputs quantize across [-127, 127]
    x[:, 0], x[:, 3] = 100.0, -100.0  # +-127 against 127 and -128 weights
    w_scale = torch.rand(48)
    out = torch.ops.pinfer.int8_gemm(x, kernels.pack_for_gemm(w).contiguous(), w.sum(1, dtype=torch.int32), w_scale)
    x_scale = x.abs().amax(dim=1, keepdim=True) / 127
    xq = torch.round(x / x_scale).to(torch.int8)
    assert xq.min() == -127 and xq.max() == 127
    assert torch.equal(out, torch._int_mm(xq, w.t()) * x_scale * w_scale)


@pytest.fixture
def amx():
    """The GEMMs' AMX path (int8 16+ rows, bf16 8+, K in 64-byte chunks), as it was after the test."""
    if not {"amx_int8", "amx_bf16", "amx_tile"} <= _cpu_flags():
        pytest.skip("no AMX on this CPU: the GEMMs run on AVX-512 only (tested above)")
    assert torch.ops.pinfer.use_amx(True), "the CPU has AMX but Linux did not grant its tile state"
    yield
    torch.ops.pinfer.use_amx(kernels.uses_amx())


# 8: bf16's first AMX size; 16: one row tile; 17, 33: padded row tiles; 64: decode's one pass
# over K; 130, 200: panels of 64 rows (the last partial), bf16's K in passes of 6 chunks with the
# sums stored between them (K 704: 22 chunks, the last pass of 4), int8's in one pass where a
# panel's rows fit L1 (K 576, 704) and in passes at K 1536; 48 outputs: a thread's odd block;
# 3,088 outputs: a thread's columns in groups of 42 blocks, the last partial and odd; K 64: one chunk
@pytest.mark.parametrize("rows", [8, 16, 17, 33, 64, 130, 200])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576), (64, 48), (576, 3088), (704, 96)])
def test_amx_gemms_are_the_avx512_gemms(amx, rows, in_features, out_features):
    """int8: the same exact int32 sums, so the same bits; bf16: float32 sums in another order,
    so at most one bf16 rounding apart, and as close to the exact product."""
    torch.manual_seed(0)
    w8 = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    packed8 = kernels.pack_for_gemm(w8).contiguous()
    sums, w_scale = w8.sum(1, dtype=torch.int32), torch.rand(out_features)
    w16 = (torch.randn(out_features, in_features) * 0.05).to(torch.bfloat16)
    packed16 = kernels.pack_for_gemm(w16).contiguous()
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    bias = torch.randn(out_features)
    outputs = {}
    for on in (True, False):
        torch.ops.pinfer.use_amx(on)
        outputs[on] = (torch.ops.pinfer.int8_gemm(x, packed8, sums, w_scale),
                       torch.ops.pinfer.bf16_gemm(x, packed16, bias))
    assert torch.equal(outputs[True][0], outputs[False][0])
    amx_out, avx_out = outputs[True][1].float(), outputs[False][1].float()
    ulp = torch.finfo(torch.bfloat16).eps * avx_out.abs().clamp(min=1e-3)
    assert ((amx_out - avx_out).abs() <= ulp).all()
    exact = x.double() @ w16.double().t() + bias.double()
    assert (amx_out.double() - exact).abs().max() <= (avx_out.double() - exact).abs().max() * 1.01 + 1e-6


def test_int8_packed_copy_follows_partial_row_updates():
    """A weight update of some rows (a TP shard, a fused qkv part) repacks the blocks it touches."""
    from pinfer.model.quantization import Int8Linear

    torch.manual_seed(0)
    linear = Int8Linear(64, 48)
    linear.set_weight(torch.randn(48, 64))
    linear.set_rows(10, torch.randn(20, 64))  # rows 10..29: parts of blocks 0 and 1
    packed = linear.qweight.view(3, 16, 16, 4).permute(0, 2, 1, 3)
    assert torch.equal(linear.qweight_vnni, packed)
    x = torch.randn(9, 64)
    ref = linear(x)
    with kernels.active():
        assert torch.equal(linear(x), ref)


def test_the_build_finds_the_ninja_dependency_off_path(monkeypatch):
    """A venv used without activating it has `ninja` (a dependency) next to python, not on PATH."""
    import ninja

    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    kernels._put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert (Path(ninja.BIN_DIR) / "ninja").exists()


@pytest.mark.parametrize(
    "q_len,context_len,heads,kv_heads,head_dim",
    [(70, 70, 9, 3, 64), (20, 90, 9, 3, 64), (1, 33, 4, 4, 128), (33, 33, 8, 1, 256)],  # 20 of 90: a cached prefix
)
def test_paged_prefill_attention_matches_sdpa(q_len, context_len, heads, kv_heads, head_dim):
    needs("paged_prefill_attention")
    from pinfer.model.attention.paged import prefill_one

    if "avx512_bf16" not in _cpu_flags():
        pytest.skip("the prefill kernel needs AVX512-BF16; the engine uses SDPA here")
    torch.manual_seed(0)
    k_cache, v_cache, tables = _paged_pool(torch.bfloat16, 1, context_len, kv_heads, head_dim)
    query = torch.randn(q_len, heads, head_dim).to(torch.bfloat16)
    scale = head_dim**-0.5
    ref = prefill_one(query, k_cache, v_cache, tables[0], context_len, scale)
    out = torch.ops.pinfer.paged_prefill_attention(query, k_cache, v_cache, tables[0], context_len, scale)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_seqs", [8, 3])  # 8: whole sequences per thread; 3: each spread over the threads
def test_batched_prefill_attention_matches_sdpa_per_sequence(num_seqs):
    """One call for a step's prefill sequences (rows strided in a qkv view, cached prefixes,
    decode rows between them) writes each sequence's causal attention (SDPA's to bf16 rounding;
    with AVX-512, exactly what the per-sequence kernel gives), and nothing else."""
    if _cpu_has_avx512() and "avx512_bf16" not in _cpu_flags():
        pytest.skip("the AVX-512 prefill kernel needs AVX512-BF16; the engine uses SDPA here")
    needs("paged_prefill_attention_batch")
    from pinfer.model.attention.paged import prefill_one

    torch.manual_seed(0)
    heads, kv_heads, head_dim = 9, 3, 64
    q_lens = [44, 1, 60, 17, 33, 1, 48, 2][:num_seqs]
    context_lens = [60, 30, 60, 40, 33, 100, 48, 70][:num_seqs]
    k_cache, v_cache, tables = _paged_pool(torch.bfloat16, num_seqs, max(context_lens), kv_heads, head_dim)
    tokens = sum(q_lens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(torch.bfloat16)
    query = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    starts = [sum(q_lens[:i]) for i in range(num_seqs)]
    prefill = [i for i in range(num_seqs) if q_lens[i] > 1]
    seqs = torch.tensor([(i, starts[i], q_lens[i], context_lens[i]) for i in prefill])
    out = torch.full((tokens, heads, head_dim), 7.0, dtype=torch.bfloat16)
    torch.ops.pinfer.paged_prefill_attention_batch(query, k_cache, v_cache, tables, seqs, 0.125, out)
    for i in range(num_seqs):
        rows = out[starts[i] : starts[i] + q_lens[i]]
        if i not in prefill:
            assert (rows == 7).all()  # a decode row: not the prefill kernel's
            continue
        q_i = query[starts[i] : starts[i] + q_lens[i]]
        ref = prefill_one(q_i, k_cache, v_cache, tables[i], context_lens[i], 0.125)
        torch.testing.assert_close(rows, ref, atol=2e-2, rtol=2e-2)
        if kernels.has("paged_prefill_attention"):
            one = torch.ops.pinfer.paged_prefill_attention(q_i, k_cache, v_cache, tables[i], context_lens[i], 0.125)
            assert torch.equal(rows, one)
    bad = seqs.clone()
    bad[0, 3] = 10**6  # a context longer than the table
    with pytest.raises(RuntimeError, match="sequence 0 .* out of range"):
        torch.ops.pinfer.paged_prefill_attention_batch(query, k_cache, v_cache, tables, bad, 0.125, out)


def test_row_keys_kernel_matches_the_pytorch_hash():
    """The sampler's per-row keys from the kernel: the bits of sampling/random.py's row_keys,
    for seeds and steps anywhere in int64 (negative, past 2**32, the extremes)."""
    needs("row_keys")
    from pinfer.sampling.random import row_keys

    gen = torch.Generator().manual_seed(11)
    edges = torch.tensor([0, 1, -1, 2**31 - 1, 2**31, 2**32, -(2**32) - 7, 2**63 - 1, -(2**63)])
    seeds = torch.cat([edges, torch.randint(-(2**62), 2**62, (200,), generator=gen)])
    steps = torch.cat([edges.flip(0), torch.randint(0, 2**40, (200,), generator=gen)])
    assert torch.equal(torch.ops.pinfer.row_keys(seeds, steps), row_keys(seeds, steps))
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.pinfer.row_keys(seeds.int(), steps.int())


@pytest.mark.parametrize("processed", [False, True])
@pytest.mark.parametrize("shape", ["normal", "one_top"])
def test_gumbel_sample_kernel_matches_the_pytorch_path(processed, shape):
    """The kernel gives noise only to tokens that can still win; the skipped ones never could.
    one_top: one token 13 above the rest, so some rows (more at T > 1) sample a token far below the
    top, inside the kernel's bound (19.5 at T=1; a tighter bound would skip them)."""
    needs("gumbel_sample")
    from pinfer.sampling.random import row_keys
    from pinfer.sampling.sampler import _plain_random_sample

    gen = torch.Generator().manual_seed(3)
    rows, vocab = 64, 49157  # not a multiple of 16
    if shape == "normal":
        logits = torch.randn(rows, vocab, generator=gen) * 3
    else:
        logits = torch.randn(rows, vocab, generator=gen) * 0.1 - 13
        logits[:, 7] = 0.0
    logits = logits.to(torch.bfloat16)
    logits[3, 100:116] = logits[3].max()  # tied top logits: the noise decides, the first maximum wins ties
    logits[4] = logits[4].clamp(max=0)
    logits[4, -1] = float("inf")  # an infinite logit always wins
    temperature = torch.tensor([1.0, 1.0, 1.0, 0.7, 1.3, 1.0, 2.0, 0.5] * 8)
    seeds, steps = torch.arange(rows) * 7919, torch.arange(rows) % 5
    tokens, logprobs, ranks = torch.ops.pinfer.gumbel_sample(logits, temperature, row_keys(seeds, steps), processed)
    want_tokens, want_logprobs, want_ranks = _plain_random_sample(logits, temperature, seeds, steps, processed)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(ranks, want_ranks)
    # float32 sums of 49k terms in another order: a few 1e-5 apart near logprob 0
    torch.testing.assert_close(logprobs, want_logprobs, rtol=2e-6, atol=5e-5, equal_nan=True)
    assert tokens[4].item() == vocab - 1
    if shape == "one_top":
        assert 3 <= (tokens != 7).sum().item() <= 40  # rows that sampled far below the top


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gemm_is_the_w4a8_arithmetic(rows, dtype):
    """int4 weights x int8 activations: per group of 32, x_scale * (s * sum xq q + z * sum xq)
    with the integer sums exact; against that computed in float64 (only the float32 sums over
    groups and the output rounding differ), and near the float matmul by the dequantized weight."""
    needs("int4_gemm")
    from pinfer.model.quantization import dequantize, quantize_int4

    gen = torch.Generator().manual_seed(5)
    n, k = 80, 96  # 5 blocks of 16 columns: tiles of 4 and 2 blocks with a remainder; 3 groups
    weight = torch.randn(n, k, generator=gen) * 0.05
    q = quantize_int4(weight)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    out = torch.ops.pinfer.int4_gemm(x, kernels.pack_int4(q.qweight, q.scale, q.zero))
    assert out.dtype == dtype and out.shape == (rows, n)

    xq, x_scale = torch.ops.pinfer.quantize_rows(x)  # the per-row int8 quantization Int8Linear uses
    xq = xq.double().view(rows, 1, k // 32, 32)
    qw = q.qweight.double().view(1, n, k // 32, 32)
    s = q.scale.to(torch.bfloat16).double().unsqueeze(0)  # the kernel keeps scales and zeros in bf16
    z = q.zero.to(torch.bfloat16).double().unsqueeze(0)
    per_group = s * (xq * qw).sum(-1) + z * xq.sum(-1)  # [rows, n, groups]
    want = (per_group.sum(-1) * x_scale.double().view(rows, 1)).to(dtype)
    torch.testing.assert_close(out.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)

    reference = x.float() @ dequantize(q).t()  # the activations' int8 rounding is the rest
    assert (out.float() - reference).abs().max() < 0.02 * reference.abs().max()


def test_int4_gemm_rejects_a_weight_packed_for_another_k():
    needs("int4_gemm")
    q = torch.zeros(16, 64, dtype=torch.int32)
    packed = kernels.pack_int4(q, torch.ones(16, 2), torch.zeros(16, 2))
    with pytest.raises(RuntimeError, match="packed for K = 64, input has K = 96"):
        torch.ops.pinfer.int4_gemm(torch.randn(1, 96), packed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_kernel_is_the_first_maximum(dtype):
    needs("argmax")
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(37, 49157, generator=gen).to(dtype)  # rows over both threads, a ragged tail
    logits[1, 5] = logits[1, 40000] = logits[1, 49156] = 100.0  # ties: the first one
    logits[2, -1] = 100.0  # the maximum in the tail
    logits[3] = float("-inf")
    logits[3, 7] = -1e30
    out = torch.ops.pinfer.argmax(logits)
    assert torch.equal(out, logits.float().max(dim=-1).indices)
    assert out[1].item() == 5 and out[2].item() == 49156 and out[3].item() == 7
