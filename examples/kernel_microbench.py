"""The per-call figures the README quotes for pinfer's CPU kernels, against the PyTorch path.

    .venv/bin/python examples/kernel_microbench.py

Each line: the minimum over repeated calls, ms, on SmolLM2-135M's shapes (9 query heads,
3 kv heads, head_dim 64, block size 16, vocabulary 49,152), random inputs, bf16, torch's
default threads. Run it with nothing else on the machine.
"""

import time

import torch

from pinfer import kernels
from pinfer.model.attention.base import Int8KV
from pinfer.model.attention.paged import paged_decode, prefill_one
from pinfer.model.quantization import Int4Linear
from pinfer.sampling.random import row_keys
from pinfer.sampling.sampler import _plain_random_sample

H, HKV, D, BS, VOCAB = 9, 3, 64, 16, 49152
DTYPE = torch.bfloat16
# SmolLM2's 121 matrices (qkv, o, gate_up, down x 30 layers, the head), [N, K]; cycled
# through, they come from memory as in a decode step
MATRIX_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(VOCAB, 576)]


def best_ms(fn, repeats: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def paged_pool(num_seqs: int, max_len: int):
    blocks = num_seqs * (max_len // BS + 1) + 8
    k = torch.randn(blocks, BS, HKV, D).to(DTYPE)
    v = torch.randn(blocks, BS, HKV, D).to(DTYPE)
    tables = torch.randperm(blocks)[: num_seqs * (max_len // BS + 1)].view(num_seqs, -1)
    return k, v, tables


def decode(num_seqs: int, lo: int, hi: int) -> str:
    k, v, tables = paged_pool(num_seqs, hi)
    lens = torch.randint(lo, hi + 1, (num_seqs,))
    q = torch.randn(num_seqs, H, D).to(DTYPE)
    scale = D**-0.5
    ref = best_ms(lambda: paged_decode(q, k, v, tables, lens, int(lens.max()), scale))
    own = best_ms(lambda: torch.ops.pinfer.paged_decode_attention(q, k, v, tables, lens, scale, 0))
    k8, v8 = Int8KV.from_values(k), Int8KV.from_values(v)
    int8 = best_ms(lambda: torch.ops.pinfer.paged_decode_attention_int8(q, k8.data, v8.data, k8.scale, v8.scale,
                                                                        tables, lens, scale, 0))
    return (f"decode attention, {num_seqs} seqs, contexts {lo}-{hi}: SDPA + gather {ref:.3f}, kernel {own:.3f}, "
            f"int8 pools {int8:.3f}")


def decode_from_memory(num_seqs: int, lo: int, hi: int, layers: int = 30) -> str:
    """As in a decode step: each layer's pool comes from memory (the layers' pools and weights
    went through the caches since), and a sequence's blocks are scattered, allocated in turns
    with the other sequences' as they grow. bf16 pools, then int8 ones."""
    per_seq = hi // BS + 1
    blocks = 4 * num_seqs * per_seq  # the engine's pool is larger than the blocks in use
    pools = [(torch.randn(blocks, BS, HKV, D).to(DTYPE), torch.randn(blocks, BS, HKV, D).to(DTYPE))
             for _ in range(layers)]
    tables = torch.randperm(blocks)[: num_seqs * per_seq].view(per_seq, num_seqs).t().contiguous()
    lens = torch.randint(lo, hi + 1, (num_seqs,))
    q = torch.randn(num_seqs, H, D).to(DTYPE)

    def all_layers():
        for k, v in pools:
            torch.ops.pinfer.paged_decode_attention(q, k, v, tables, lens, D**-0.5, 0)

    bf16 = best_ms(all_layers, 10) / layers
    pools = [(Int8KV.from_values(k), Int8KV.from_values(v)) for k, v in pools]  # kv_cache_dtype="int8"

    def all_layers_int8():
        for k, v in pools:
            torch.ops.pinfer.paged_decode_attention_int8(q, k.data, v.data, k.scale, v.scale, tables, lens, D**-0.5, 0)

    return (f"decode attention from memory, {num_seqs} seqs, contexts {lo}-{hi}, {layers} layers' pools: "
            f"kernel {bf16:.3f} a layer, int8 pools {best_ms(all_layers_int8, 10) / layers:.3f}")


def prefill(length: int) -> str:
    k, v, tables = paged_pool(1, length)
    q = torch.randn(length, H, D).to(DTYPE)
    scale = D**-0.5
    ref = best_ms(lambda: prefill_one(q, k, v, tables[0], length, scale), 10)
    own = best_ms(lambda: torch.ops.pinfer.paged_prefill_attention(q, k, v, tables[0], length, scale), 10)
    return f"prefill attention, {length} tokens: SDPA (is_causal) {ref:.3f}, kernel {own:.3f}"


def swiglu(rows: int) -> str:
    gate_up = torch.randn(rows, 2 * 1536).to(DTYPE)  # SmolLM2's gate_up output
    ref = best_ms(lambda: torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:], 50)
    own = best_ms(lambda: torch.ops.pinfer.silu_mul(gate_up), 50)
    return f"SwiGLU silu(gate) * up, {rows} x 1536: PyTorch {ref:.3f}, kernel {own:.3f}"


def sampler(rows: int) -> str:
    # a long lower tail, as SmolLM2's logits have: ~40% of the tokens within reach of the top
    # (19.5 at T=1), the ones the kernel gives noise
    logits = (torch.randn(rows, VOCAB) * 3 - torch.rand(rows, VOCAB) * 25).to(DTYPE)
    temperature = torch.ones(rows)
    seeds, steps = torch.arange(rows), torch.zeros(rows, dtype=torch.long)
    ref = best_ms(lambda: _plain_random_sample(logits, temperature, seeds, steps, False), 10)
    own = best_ms(lambda: torch.ops.pinfer.gumbel_sample(logits, temperature, row_keys(seeds, steps), False), 10)
    return f"sampling {rows} x {VOCAB} logits (temperature, logprob, rank): PyTorch {ref:.2f}, kernel {own:.2f}"


def smollm2_int8_matrices():
    """The matrices in int8, as Int8Linear holds them."""
    matrices = []
    for n, k in MATRIX_SHAPES:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        matrices.append((w, kernels.pack_for_gemm(w).contiguous(), w.sum(1, dtype=torch.int32), torch.rand(n)))
    return matrices


def int8_batch1(matrices) -> str:
    x = {k: torch.randn(1, k).to(DTYPE) for k in (576, 1536)}
    as_bf16 = [w.view(DTYPE) for w, *_ in matrices]  # the same bytes, for a plain read
    total = sum(w.numel() for w, *_ in matrices)

    def matmuls():
        for w, packed, s, sc in matrices:
            torch.ops.pinfer.int8_gemm(x[w.shape[1]], packed, s, sc)

    def read():
        for w in as_bf16:
            w.sum()

    own, plain = best_ms(matmuls, 10), best_ms(read, 10)
    return (f"int8 batch-1 matmuls, 121 matrices: kernel {own:.2f} ({total / own / 1e6:.1f} GB/s); "
            f"a sum over the same bytes {plain:.2f} ({total / plain / 1e6:.1f} GB/s)")


def int8_batch64(matrices) -> str:
    x = {k: torch.randn(64, k).to(DTYPE) for k in (576, 1536)}
    ops = 2 * 64 * sum(w.numel() for w, *_ in matrices)

    def pytorch_path():  # what Int8Linear runs without the GEMM: quantize -> _int_mm -> rescale
        for w, _, _, sc in matrices:
            xq, x_scale = torch.ops.pinfer.quantize_rows(x[w.shape[1]])
            torch.ops.pinfer.dequantize_rows(torch._int_mm(xq, w.t()), x_scale, sc, DTYPE)

    def gemm():
        for w, packed, s, sc in matrices:
            torch.ops.pinfer.int8_gemm(x[w.shape[1]], packed, s, sc)

    ref, (own, amx) = best_ms(pytorch_path, 5), with_and_without_amx(gemm)
    return (f"int8 batch-64 matmuls, 121 matrices: quantize + _int_mm + rescale {ref:.2f} ({ops / ref / 1e6:.0f} "
            f"GOPS), VNNI GEMM {own:.2f} ({ops / own / 1e6:.0f} GOPS){amx_figure(amx, ops)}")


def int4_matmuls(rows: int) -> str:
    """The matrices in int4 groups of 32: torch's int4 matmul (bf16 activations; what Int4Linear
    runs without the kernels) vs pinfer's W4A8 GEMM (int8 activations)."""
    matrices = []
    for n, k in MATRIX_SHAPES:  # Int4Linear holds both layouts
        linear = Int4Linear(k, n)
        linear.set_weight(torch.randn(n, k) * 0.05)
        matrices.append((k, linear))
    x = {k: torch.randn(rows, k).to(DTYPE) for k in (576, 1536)}
    total = sum(linear.qweight_w4a8.numel() for _, linear in matrices)

    def pytorch_path():
        for k, linear in matrices:
            linear._int4_mm(x[k])

    def gemm():
        for k, linear in matrices:
            torch.ops.pinfer.int4_gemm(x[k], linear.qweight_w4a8)

    ref, own = best_ms(pytorch_path, 5), best_ms(gemm, 5)
    rate = f"{total / own / 1e6:.1f} GB/s" if rows == 1 else f"{2 * rows * total / 0.625 / own / 1e6:.0f} GOPS"
    return f"int4 batch-{rows} matmuls, 121 matrices: torch's int4 matmul {ref:.2f}, W4A8 GEMM {own:.2f} ({rate})"


def bf16_matmuls(rows: int) -> str:
    """The matrices in bf16: oneDNN on its packed weights (what PackedLinear runs without the
    kernels) vs pinfer's GEMM on its own packing."""
    matrices = []
    for n, k in MATRIX_SHAPES:
        w = (torch.randn(n, k) * 0.05).to(DTYPE)
        matrices.append((k, torch.ops.mkldnn._reorder_linear_weight(w, 64), kernels.pack_for_gemm(w).contiguous()))
    x = {k: torch.randn(rows, k).to(DTYPE) for k in (576, 1536)}

    def onednn():
        for k, packed, _ in matrices:
            torch.ops.mkldnn._linear_pointwise(x[k], packed, None, "none", [], "")

    def gemm():
        for k, _, own in matrices:
            torch.ops.pinfer.bf16_gemm(x[k], own, None)

    ref, (own, amx) = best_ms(onednn, 5), with_and_without_amx(gemm)
    ops = 2 * rows * sum(n * k for n, k in MATRIX_SHAPES)
    amx_part = amx_figure(amx if rows >= 8 else None, ops)
    return f"bf16 batch-{rows} matmuls, 121 matrices: oneDNN (packed) {ref:.2f}, pinfer GEMM {own:.2f}{amx_part}"


def with_and_without_amx(gemm) -> tuple[float, float | None]:
    """The GEMMs' time on AVX-512 only and (where the CPU has it) on AMX tiles, which they use
    from 16 rows (int8) or 8 (bf16)."""
    torch.ops.pinfer.use_amx(False)
    avx512 = best_ms(gemm, 5)
    amx = best_ms(gemm, 5) if torch.ops.pinfer.use_amx(True) else None
    torch.ops.pinfer.use_amx(kernels.uses_amx())
    return avx512, amx


def amx_figure(ms: float | None, ops: int) -> str:
    return "" if ms is None else f", on AMX tiles {ms:.2f} ({ops / ms / 1e6:.0f} GOPS)"


def main() -> None:
    assert kernels.load(), kernels.status()
    torch.manual_seed(0)
    print(f"ms per call, minimum of repeats, {torch.get_num_threads()} threads, {DTYPE}")
    matrices = smollm2_int8_matrices()
    for line in (decode(64, 60, 190), decode_from_memory(64, 60, 190), decode(1, 100, 100), prefill(1002), prefill(37),
                 swiglu(64), swiglu(2048), sampler(64),
                 int8_batch1(matrices), int8_batch64(matrices), int4_matmuls(1), int4_matmuls(64), bf16_matmuls(1),
                 bf16_matmuls(64), bf16_matmuls(1002)):
        print(" ", line)


if __name__ == "__main__":
    main()
