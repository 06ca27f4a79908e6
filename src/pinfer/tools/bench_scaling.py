"""Prefill/decode scaling of one attention layer, per backend and KV-cache layout:
why paging and blocked attention matter.

    pinfer bench-attention --dtype bfloat16 --json scaling.json --plot scaling.png

One attention layer of the model's shape (default SmolLM2-135M's: 9 query heads, 3 kv heads,
head_dim 64, block size 16) on random q/k/v, for each length L in --lengths:

- prefill: one sequence, a prompt of L tokens, no cached prefix;
- decode: --batch sequences with a context of L tokens each, one new token each.

A measured call is the layer's step: write the new tokens' K/V into the cache, then attention.
For the backends ("reference", "blocked", "paged", "batch_invariant") that is `store_kv` plus
`AttentionBackend.forward`, reading the paged pool through shuffled block tables.
"contiguous" is the KV layout of HF's static cache and gpt-fast instead: one
[Hkv, max_model_len, D] buffer per sequence, attended in place by the same SDPA calls "paged"
makes, but over a slice of the buffer rather than over pages gathered first. (A static cache
as HF and gpt-fast use it attends over all max_model_len slots with a mask; reading only the
first L is this layout's best case.) So paged minus contiguous is the cost of the page gather.
"paged_kernels" is "paged" as the engine runs it on a CPU with pinfer's kernels: the K/V store
and the decode attention are kernels that read the pages in place (no gather); prefill is the
same SDPA call. "paged_int8" is paged_kernels on int8 pools (kv_cache_dtype="int8"): the store
quantizes, decode reads the int8 rows in place, prefill reads dequantized pages; its KV table row
counts 64 + 4 bytes a head row. Scratch memory inside a kernel is not a tensor, so LiveBytes counts only its output.

Latency: the median over --repeats samples, each the mean of enough back-to-back calls to
last >= 20 ms, after one warm-up call. The process CPU time per call is recorded too: on a
machine other work shares, wall time includes the waits for a core; with --threads 1 the
CPU time is close to what the call costs on a quiet machine (with more threads it also
counts OpenMP's spin-waiting).

Peak memory (LiveBytes, a TorchDispatchMode like alloc_counter.AllocationCounter): the most
bytes alive at once of the tensor storages that aten ops create during the call, the output
included. A storage counts from the op that creates it until it is freed (a finalizer on the
storage, which outlives the views of it), so views, in-place and out= ops add nothing.
It includes the score matrices, gathers, float32 upcasts, masks, and the paged backend's
decode workspace (each memory measurement uses a fresh backend, so the workspace, which the
engine keeps from step to step, is counted). It excludes what exists before the call (the KV
cache itself, which the KV table reports, and the inputs) and scratch a kernel allocates
inside itself, out of the dispatcher's sight: checked against torch.profiler's allocator
events (profile_memory=True), the two agree to the byte for reference and blocked, and
SDPA's flash kernel adds 0.3-1.3 MiB of per-thread tiles (prefill, L 512-4096) that this
misses. The memory is measured in its own call, as the mode slows every op down.

KV reserved: for --mixed-seqs sequences of lengths drawn uniformly from [min, max] of
--lengths, the cache bytes each layout holds. Contiguous reserves max_model_len slots per
sequence, as a static cache must not knowing how long a sequence will grow; "exact" is the
sum of the lengths, the lower bound (what a DynamicCache holds, reached by a torch.cat per
step); paged holds ceil(L / block_size) blocks per sequence.

Combinations predicted to exceed --budget-seconds or --budget-memory (extrapolated from the
previous length of the same backend and phase as L^2 for prefill, L for decode) are skipped,
and the table and JSON say so.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pinfer import kernels
from pinfer.config import parse_dtype, parse_memory_size
from pinfer.errors import PinferError
from pinfer.model.attention import ATTENTION_BACKENDS, AttentionMetadata, get_attention_backend, store_kv
from pinfer.model.attention.base import Int8KV
from pinfer.tools.alloc_counter import FRESH_OPS, storage_ptr

CONTIGUOUS = "contiguous"  # the non-paged KV layout, measured like a backend
PAGED_KERNELS = "paged_kernels"  # "paged" with pinfer's CPU kernels on (src/pinfer/kernels), as the engine runs it
PAGED_INT8 = "paged_int8"  # paged_kernels on int8 pools (kv_cache_dtype="int8")
BACKENDS = (*ATTENTION_BACKENDS, PAGED_KERNELS, PAGED_INT8, CONTIGUOUS)
PHASES = ("prefill", "decode")
MIN_SAMPLE_SECONDS = 0.02
MAX_CALLS_PER_SAMPLE = 100
GROWTH = {"prefill": 2, "decode": 1}  # exponent of L used to extrapolate cost for the budget


@dataclass(frozen=True)
class Shape:
    """One attention layer's shape; num_layers only scales the model-wide KV numbers."""

    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    block_size: int = 16
    num_layers: int = 30

    def __str__(self) -> str:
        return (f"heads={self.num_heads},kv_heads={self.num_kv_heads},head_dim={self.head_dim},"
                f"block_size={self.block_size},layers={self.num_layers}")


SHAPE_KEYS = {"heads": "num_heads", "kv_heads": "num_kv_heads", "head_dim": "head_dim",
              "block_size": "block_size", "layers": "num_layers"}


def parse_shape(text: str) -> Shape:
    """'heads=9,kv_heads=3,head_dim=64,block_size=16,layers=30'; keys left out keep SmolLM2-135M's value."""
    values = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key not in SHAPE_KEYS or not value.isdigit() or int(value) < 1:
            raise PinferError(f"bad --model-shape item {item!r}; expected KEY=N with KEY in {', '.join(SHAPE_KEYS)}")
        values[SHAPE_KEYS[key]] = int(value)
    shape = Shape(**values)
    if shape.num_heads % shape.num_kv_heads:
        raise PinferError(f"heads ({shape.num_heads}) must be a multiple of kv_heads ({shape.num_kv_heads})")
    return shape


def add_scaling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="128,256,512,1024,2048,4096",
                        help="prompt lengths (prefill) and context lengths (decode) (default: 128,...,4096)")
    parser.add_argument("--backends", default="reference,blocked,paged,paged_kernels,paged_int8,contiguous",
                        help=f"from {', '.join(BACKENDS)}; contiguous: SDPA over a per-sequence contiguous "
                             "cache; paged_kernels: paged with pinfer's CPU kernels; paged_int8: those on int8 pools "
                             "(default: reference,blocked,paged,paged_kernels,paged_int8,contiguous)")
    parser.add_argument("--phases", default="prefill,decode", help="prefill, decode or both (default: both)")
    parser.add_argument("--batch", type=int, default=16, help="decode batch: sequences per step (default: 16)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--repeats", "-r", type=int, default=5, help="timed samples per point (default: 5)")
    parser.add_argument("--model-shape", default=str(Shape()),
                        help=f"attention shape as KEY=N items (default, SmolLM2-135M: {Shape()})")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="slots a contiguous cache reserves per sequence (default: the longest of --lengths)")
    parser.add_argument("--mixed-seqs", type=int, default=64,
                        help="sequences of random lengths for the KV-reserved comparison (default: 64)")
    parser.add_argument("--budget-seconds", type=float, default=60.0,
                        help="skip a point whose predicted warm-up + timed calls exceed this (default: 60)")
    parser.add_argument("--budget-memory", default="4GiB",
                        help="skip a point whose predicted peak memory exceeds this (default: 4GiB)")
    parser.add_argument("--threads", "-t", type=int, default=None,
                        help="torch intra-op threads (default: torch's own, one per usable core)")
    parser.add_argument("--seed", type=int, default=0, help="random q/k/v and mixed lengths (default: 0)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="write every number and the machine description to FILE (stdout without FILE)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="latency and peak memory vs length, and the KV-reserved bars")


@dataclass
class Settings:
    lengths: list[int]
    backends: list[str]
    phases: list[str]
    batch: int
    dtype: torch.dtype
    repeats: int
    shape: Shape
    max_model_len: int
    mixed_seqs: int
    budget_seconds: float
    budget_bytes: int
    threads: int | None
    seed: int


def settings_from_args(args: argparse.Namespace) -> Settings:
    def int_list(flag: str, text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise PinferError(f"{flag} takes comma-separated integers, got {text!r}") from exc
        if not values or min(values) < 2:
            raise PinferError(f"{flag} needs lengths >= 2, got {text!r}")
        return sorted(set(values))

    def names(flag: str, text: str, choices: tuple[str, ...]) -> list[str]:
        chosen = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in chosen if v not in choices]
        if unknown or not chosen:
            raise PinferError(f"unknown {flag} value {', '.join(unknown) or '(none)'}; "
                              f"choose from {', '.join(choices)}")
        return list(dict.fromkeys(chosen))

    lengths = int_list("--lengths", args.lengths)
    for flag, value in (("--batch", args.batch), ("--repeats", args.repeats), ("--mixed-seqs", args.mixed_seqs),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise PinferError(f"{flag} must be >= 1, got {value}")
    max_model_len = args.max_model_len or max(lengths)
    if max_model_len < max(lengths):
        raise PinferError(f"--max-model-len {max_model_len} is shorter than the longest length {max(lengths)}")
    return Settings(
        lengths=lengths, backends=names("--backends", args.backends, BACKENDS),
        phases=names("--phases", args.phases, PHASES), batch=args.batch, dtype=parse_dtype(args.dtype),
        repeats=args.repeats, shape=parse_shape(args.model_shape), max_model_len=max_model_len,
        mixed_seqs=args.mixed_seqs, budget_seconds=args.budget_seconds,
        budget_bytes=parse_memory_size(args.budget_memory), threads=args.threads, seed=args.seed,
    )


# ---------------------------------------------------------------- peak memory


class LiveBytes(TorchDispatchMode):
    """Peak bytes alive at once of the storages aten ops create while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        fresh = func._schema.name in FRESH_OPS
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage_ptr(t), storage.nbytes()
            if nbytes and key not in self._tracked and (fresh or key not in inputs):
                self._tracked.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                # The storage's Python object lives as long as the storage does, views included.
                weakref.finalize(storage, self._free, key, nbytes)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


def peak_bytes(call: Callable[[], Any]) -> int:
    """Peak live bytes created by one call; its result is dropped before returning."""
    gc.collect()
    with LiveBytes() as mode:
        result = call()
        del result
    return mode.peak


# ---------------------------------------------------------------- one measured step


@dataclass
class Step:
    """Inputs of one layer step: new tokens' q/k/v, the paged pool and, if asked, contiguous caches."""

    query: torch.Tensor  # [num_tokens, H, D]
    key: torch.Tensor  # [num_tokens, Hkv, D]
    value: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D], the paged pool
    v_cache: torch.Tensor
    meta: AttentionMetadata
    phase: str
    length: int
    contiguous_k: torch.Tensor | None = None  # [B, Hkv, max_model_len, D]
    contiguous_v: torch.Tensor | None = None


def make_step(phase: str, length: int, batch: int, shape: Shape, dtype: torch.dtype, max_model_len: int,
              contiguous: bool, seed: int = 0) -> Step:
    """Random inputs for prefill (one prompt of `length`) or decode (`batch` contexts of `length`,
    one new token each). Pages are handed out in random order, as in a pool after some churn;
    the contiguous caches hold the same context."""
    g = torch.Generator().manual_seed(seed)
    H, Hkv, D, bs = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.block_size
    num_seqs, query_len = (1, length) if phase == "prefill" else (batch, 1)
    blocks_per_seq = -(-length // bs)
    num_blocks = num_seqs * blocks_per_seq
    table = torch.randperm(num_blocks, generator=g).view(num_seqs, blocks_per_seq)
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    positions = torch.arange(length - query_len, length)
    slots = (table[:, positions // bs] * bs + positions % bs).reshape(-1)
    num_tokens = num_seqs * query_len
    meta = AttentionMetadata(
        query_start_loc=torch.arange(num_seqs + 1) * query_len,
        query_lens=torch.full((num_seqs,), query_len),
        context_lens=torch.full((num_seqs,), length),
        block_tables=table,
        slot_mapping=slots,
        query_lens_cpu=[query_len] * num_seqs,
        context_lens_cpu=[length] * num_seqs,
        block_size=bs,
    )
    step = Step(
        query=torch.randn(num_tokens, H, D, generator=g).mul(2).to(dtype),  # x2: softmaxes not near-uniform
        key=torch.randn(num_tokens, Hkv, D, generator=g).to(dtype),
        value=torch.randn(num_tokens, Hkv, D, generator=g).to(dtype),
        k_cache=k_cache, v_cache=v_cache, meta=meta, phase=phase, length=length,
    )
    if contiguous:
        step.contiguous_k = torch.zeros(num_seqs, Hkv, max_model_len, D, dtype=dtype)
        step.contiguous_v = torch.zeros_like(step.contiguous_k)
        cached = length - query_len  # the context already in the cache: copy it from the pool's pages
        for cache, pool in ((step.contiguous_k, k_cache), (step.contiguous_v, v_cache)):
            cache[:, :, :cached] = pool[table].flatten(1, 2)[:, :cached].transpose(1, 2)
    return step


def step_call(backend: str, step: Step) -> Callable[[], torch.Tensor]:
    """The measured call: write the new K/V, then attention; returns [num_tokens, H, D].
    Each call of step_call makes a fresh backend instance (no workspace yet)."""
    scale = 1.0 / math.sqrt(step.query.shape[-1])
    if backend == CONTIGUOUS:
        return lambda: contiguous_attention(step, scale)
    use_kernels = backend in (PAGED_KERNELS, PAGED_INT8)
    if use_kernels and not kernels.load():
        raise PinferError(f"{backend}: pinfer's CPU kernels are not available here ({kernels.status()})")
    attention = get_attention_backend("paged" if use_kernels else backend)
    k_cache, v_cache = step.k_cache, step.v_cache
    if backend == PAGED_INT8:
        k_cache, v_cache = Int8KV.from_values(k_cache), Int8KV.from_values(v_cache)

    def call() -> torch.Tensor:
        with kernels.active(use_kernels):
            store_kv(step.key, step.value, k_cache, v_cache, step.meta.slot_mapping)
            return attention.forward(step.query, k_cache, v_cache, step.meta, scale)

    return call


def contiguous_attention(step: Step, scale: float) -> torch.Tensor:
    """The static-cache layout: the new K/V go into each sequence's own buffer, SDPA reads
    the first `length` slots in place. The same SDPA calls as the paged backend makes."""
    kc, vc, L = step.contiguous_k, step.contiguous_v, step.length
    assert kc is not None and vc is not None, "make_step(contiguous=True) builds the contiguous caches"
    num_heads, head_dim = step.query.shape[1:]
    if step.phase == "prefill":
        kc[0, :, :L].copy_(step.key.transpose(0, 1))
        vc[0, :, :L].copy_(step.value.transpose(0, 1))
        q = step.query.transpose(0, 1)[None]  # [1, H, L, D]
        out = F.scaled_dot_product_attention(q, kc[:, :, :L], vc[:, :, :L], is_causal=True, scale=scale,
                                             enable_gqa=True)
        return out[0].transpose(0, 1)
    kc[:, :, L - 1].copy_(step.key)
    vc[:, :, L - 1].copy_(step.value)
    k, v = kc[:, :, :L], vc[:, :, :L]  # all contexts have length L: no mask needed
    num_seqs, num_kv_heads = kc.shape[:2]
    q = step.query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # as paged_decode
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def time_call(call: Callable[[], Any], repeats: int) -> tuple[list[float], list[float], int]:
    """Per-call wall seconds and process CPU seconds (all threads) for each of `repeats`
    samples, and the calls per sample."""
    start = time.perf_counter()
    call()  # warm-up; sizes the samples
    first = time.perf_counter() - start
    calls = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_SECONDS / max(first, 1e-9))))
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            call()
        wall.append((time.perf_counter() - start) / calls)
        cpu.append((time.process_time() - start_cpu) / calls)
    return wall, cpu, calls


# ---------------------------------------------------------------- the study


@dataclass
class Point:
    """One (phase, backend, length): latency and peak memory, or why it was skipped."""

    phase: str
    backend: str
    length: int
    num_seqs: int
    dtype: str
    latency_ms: float | None = None  # median over samples
    latency_ms_std: float | None = None
    latency_ms_min: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    cpu_ms: float | None = None  # median process CPU time per call, all threads (spinning included)
    cpu_samples_ms: list[float] = field(default_factory=list)
    calls_per_sample: int | None = None
    peak_bytes: int | None = None
    skipped: str | None = None


def predict(previous: Point | None, phase: str, length: int, repeats: int) -> tuple[float, float] | None:
    """(seconds for a warm-up plus `repeats` calls, peak bytes) at `length`, from the previous point."""
    if previous is None or previous.latency_ms is None:
        return None
    growth = (length / previous.length) ** GROWTH[phase]
    return previous.latency_ms / 1e3 * growth * (1 + repeats), previous.peak_bytes * growth


def measure(settings: Settings, log=lambda msg: print(msg, file=sys.stderr)) -> list[Point]:
    points: list[Point] = []
    dtype_name = str(settings.dtype).removeprefix("torch.")
    for phase in settings.phases:
        last: dict[str, Point] = {}
        for length in settings.lengths:
            step = make_step(phase, length, settings.batch, settings.shape, settings.dtype, settings.max_model_len,
                             contiguous=CONTIGUOUS in settings.backends, seed=settings.seed)
            for backend in settings.backends:
                point = Point(phase, backend, length, step.meta.num_seqs, dtype_name)
                points.append(point)
                if backend in last and last[backend].skipped:
                    point.skipped = f"a shorter length was skipped ({last[backend].skipped})"
                elif (guess := predict(last.get(backend), phase, length, settings.repeats)) is not None and (
                        guess[0] > settings.budget_seconds or guess[1] > settings.budget_bytes):
                    point.skipped = (f"predicted {guess[0]:.0f} s, {guess[1] / 2**20:.0f} MiB; budget "
                                     f"{settings.budget_seconds:g} s, {settings.budget_bytes / 2**20:.0f} MiB")
                last[backend] = point
                if point.skipped:
                    log(f"  {phase:7} L={length:5} {backend:10} skipped: {point.skipped}")
                    continue
                with torch.inference_mode():
                    point.peak_bytes = peak_bytes(step_call(backend, step))
                    wall, cpu, point.calls_per_sample = time_call(step_call(backend, step), settings.repeats)
                point.samples_ms, point.cpu_samples_ms = [s * 1e3 for s in wall], [s * 1e3 for s in cpu]
                point.cpu_ms = statistics.median(point.cpu_samples_ms)
                point.latency_ms = statistics.median(point.samples_ms)
                point.latency_ms_min = min(point.samples_ms)
                point.latency_ms_std = statistics.stdev(point.samples_ms) if len(wall) > 1 else 0.0
                log(f"  {phase:7} L={length:5} {backend:10} {point.latency_ms:9.2f} ms (cpu {point.cpu_ms:9.2f} ms)"
                    f"  peak {point.peak_bytes / 2**20:8.1f} MiB")
            del step
    return points


def kv_reserved(settings: Settings) -> dict[str, Any]:
    """KV bytes held for --mixed-seqs sequences of random lengths, per layout, one layer and whole model."""
    shape = settings.shape
    rng = random.Random(settings.seed)
    lengths = [rng.randint(min(settings.lengths), max(settings.lengths)) for _ in range(settings.mixed_seqs)]
    per_token = 2 * shape.num_kv_heads * shape.head_dim * torch.empty(0, dtype=settings.dtype).element_size()
    bs = shape.block_size
    paged = sum(-(-n // bs) * bs for n in lengths)
    slots = {CONTIGUOUS: len(lengths) * settings.max_model_len, "exact": sum(lengths), "paged": paged}
    layouts = {name: {"slots": n, "bytes_per_layer": n * per_token, "bytes_model": n * per_token * shape.num_layers}
               for name, n in slots.items()}
    int8_per_token = 2 * shape.num_kv_heads * (shape.head_dim + 4)  # int8 values and a float32 scale per head row
    layouts[PAGED_INT8] = {"slots": paged, "bytes_per_layer": paged * int8_per_token,
                           "bytes_model": paged * int8_per_token * shape.num_layers}
    return {
        "num_seqs": len(lengths), "lengths": lengths, "max_model_len": settings.max_model_len,
        "block_size": bs, "bytes_per_token_per_layer": per_token, "num_layers": shape.num_layers,
        "layouts": layouts,
    }


def run_scaling(args: argparse.Namespace) -> int:
    from pinfer.tools.bench_report import describe_machine

    settings = settings_from_args(args)
    machine = describe_machine()
    default_threads = torch.get_num_threads()
    threads = settings.threads or default_threads
    torch.set_num_threads(threads)
    print(f"attention scaling: {settings.shape}, {settings.dtype}, decode batch {settings.batch}, "
          f"torch threads: {threads}", file=sys.stderr)
    try:
        points = measure(settings)
    finally:
        torch.set_num_threads(default_threads)
    machine["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    kv = kv_reserved(settings)

    out = sys.stderr if args.json == "-" else sys.stdout
    print(format_report(points, kv, settings), file=out)
    vm = ", virtual machine" if machine["virtual_machine"] else ""
    load = ""
    if machine["load_average"] and machine["load_average_after"]:
        before, after = machine["load_average"][0], machine["load_average_after"][0]
        load = f"; load average {before:.2f} at start, {after:.2f} at end"
    print(f"{machine['cpu_model']}, {machine['usable_cpus']} usable CPUs{vm}; torch {machine['torch']}, "
          f"torch threads: {threads}{load}", file=out)
    document = {
        "settings": {**{k: v for k, v in vars(args).items() if k != "func"},
                     "lengths": settings.lengths, "backends": settings.backends, "dtype": str(settings.dtype),
                     "shape": asdict(settings.shape), "max_model_len": settings.max_model_len,
                     "budget_bytes": settings.budget_bytes, "threads": threads},
        "machine": machine,
        "points": [asdict(p) for p in points],
        "kv_reserved": kv,
    }
    if args.json == "-":
        json.dump(document, sys.stdout, indent=1)
        print()
    elif args.json:
        Path(args.json).write_text(json.dumps(document, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        title = (f"one attention layer ({settings.shape}), {settings.dtype}, decode batch {settings.batch}; "
                 f"{machine['cpu_model']} ({machine['usable_cpus']} CPUs{vm}, torch threads: {threads})")
        plot(points, kv, args.plot, title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- report


def markdown_table(headers: list[str], rows: list[list[str]], align: str) -> str:
    """A Markdown table in bench_report.format_table's look; align: one '<' or '>' per column."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + (":" if a == ">" else "-") for a, w in zip(align, widths)) + " |"
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def format_report(points: list[Point], kv: dict[str, Any], settings: Settings) -> str:
    """Latency and peak-memory tables (a row per phase and length, a column per backend),
    the skipped points, and the KV-reserved table."""
    backends = list(dict.fromkeys(p.backend for p in points))
    by_key = {(p.phase, p.length, p.backend): p for p in points}
    rows_keys = list(dict.fromkeys((p.phase, p.length, p.num_seqs) for p in points))

    def cell(phase: str, length: int, backend: str, fmt: Callable[[Point], str]) -> str:
        p = by_key[(phase, length, backend)]
        return "skipped" if p.skipped else fmt(p)

    latency = [[phase, str(n), str(L)] + [cell(phase, L, b, lambda p: f"{p.latency_ms:.2f} ± {p.latency_ms_std:.2f}")
                                          for b in backends] for phase, L, n in rows_keys]
    cpu = [[phase, str(n), str(L)] + [cell(phase, L, b, lambda p: f"{p.cpu_ms:.2f}") for b in backends]
           for phase, L, n in rows_keys]
    memory = [[phase, str(n), str(L)] + [cell(phase, L, b, lambda p: f"{p.peak_bytes / 2**20:.2f}") for b in backends]
              for phase, L, n in rows_keys]
    align = "<>>" + ">" * len(backends)
    parts = [
        "latency, ms per call (median ± stddev over samples)",
        markdown_table(["phase", "seqs", "length", *backends], latency, align),
        "",
        "process CPU time, ms per call (median; all threads)",
        markdown_table(["phase", "seqs", "length", *backends], cpu, align),
        "",
        "peak memory of the call, MiB (tensors created during it; the KV cache is not included)",
        markdown_table(["phase", "seqs", "length", *backends], memory, align),
    ]
    skipped = [p for p in points if p.skipped]
    if skipped:
        parts += ["", "skipped:"] + [f"- {p.phase} {p.backend} L={p.length}: {p.skipped}" for p in skipped]
    layouts = kv["layouts"]
    paged = layouts["paged"]["bytes_model"]
    kv_rows = [[name, f"{v['slots']:,}", f"{v['bytes_per_layer'] / 2**20:.1f}", f"{v['bytes_model'] / 2**20:.1f}",
                f"{v['bytes_model'] / paged:.2f}x"] for name, v in layouts.items()]
    lengths = kv["lengths"]
    parts += [
        "",
        (f"KV cache reserved for {kv['num_seqs']} sequences of lengths uniform in {min(settings.lengths)}.."
         f"{max(settings.lengths)} (mean {statistics.fmean(lengths):.0f}); contiguous reserves max_model_len="
         f"{kv['max_model_len']} per sequence, paged whole blocks of {kv['block_size']}"),
        markdown_table(["layout", "token slots", "MiB / layer", f"MiB / {kv['num_layers']} layers", "vs paged"],
                       kv_rows, "<>>>>"),
    ]
    return "\n".join(parts)


COLORS = {"reference": "tab:red", "blocked": "tab:orange", "paged": "tab:blue", "batch_invariant": "tab:purple",
          PAGED_KERNELS: "tab:cyan", PAGED_INT8: "tab:olive", CONTIGUOUS: "tab:green"}


def plot(points: list[Point], kv: dict[str, Any], path: str | Path, title: str) -> None:
    """Four panels: prefill latency, decode latency, peak memory (log-log vs length), KV reserved bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(p.backend for p in points))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    panels = {"prefill": axes[0][0], "decode": axes[0][1]}
    for phase, ax in panels.items():
        for backend in backends:
            done = [p for p in points if p.phase == phase and p.backend == backend and p.latency_ms is not None]
            skipped = [p.length for p in points if p.phase == phase and p.backend == backend and p.skipped]
            if not done:
                continue
            label = backend + _slope(done, "cpu_ms")
            label += f" (skipped L={','.join(map(str, skipped))})" if skipped else ""
            lengths = [p.length for p in done]
            ax.errorbar(lengths, [p.latency_ms for p in done], yerr=[p.latency_ms_std for p in done], marker="o",
                        capsize=3, color=COLORS.get(backend), label=label)
            ax.plot(lengths, [p.cpu_ms for p in done], "--", color=COLORS.get(backend), alpha=0.6, linewidth=1)
        seqs = next((p.num_seqs for p in points if p.phase == phase), 1)
        what = "one prompt of L tokens" if phase == "prefill" else f"{seqs} sequences x 1 token, context L"
        ax.set_title(f"{phase}: {what}\n(solid: wall ms ± std, dashed: CPU ms; slope of CPU time)", fontsize=9)
        ax.set_ylabel("ms per call")
        _log_axes(ax, points)
        ax.legend(fontsize=8)

    ax = axes[1][0]
    for backend in backends:
        for phase, style in (("prefill", "-"), ("decode", "--")):
            done = [p for p in points if p.phase == phase and p.backend == backend and p.peak_bytes is not None]
            if done:
                ax.plot([p.length for p in done], [p.peak_bytes / 2**20 for p in done], style, marker="o",
                        color=COLORS.get(backend), label=f"{backend} {phase}{_slope(done, 'peak_bytes')}")
    ax.set_title("peak memory of the call (solid: prefill, dashed: decode)", fontsize=10)
    ax.set_ylabel("MiB created during the call")
    _log_axes(ax, points)
    ax.legend(fontsize=7, ncol=2)

    ax = axes[1][1]
    layouts = kv["layouts"]
    names = list(layouts)
    mib = [layouts[n]["bytes_model"] / 2**20 for n in names]
    labels = {CONTIGUOUS: f"contiguous\n(max_model_len={kv['max_model_len']})", "exact": "exact\n(sum of lengths)",
              "paged": f"paged\n(blocks of {kv['block_size']})"}
    bars = ax.bar(range(len(names)), mib, color=[COLORS.get(n, "tab:gray") for n in names])
    ax.bar_label(bars, [f"{v:.0f} MiB" for v in mib], fontsize=8)
    ax.set_xticks(range(len(names)), [labels.get(n, n) for n in names], fontsize=8)
    lengths = kv["lengths"]
    ax.set_title(f"KV reserved: {kv['num_seqs']} seqs, lengths {min(lengths)}..{max(lengths)}, "
                 f"{kv['num_layers']} layers", fontsize=10)
    ax.set_ylabel("MiB")
    fig.suptitle(title.replace("; ", "\n", 1), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _slope(done: list[Point], attr: str) -> str:
    """' ~L^k', k the log-log slope between the two longest lengths: 2 for a score matrix, 1 for a linear cost."""
    if len(done) < 2 or not getattr(done[-2], attr) or not getattr(done[-1], attr):
        return ""
    a, b = done[-2], done[-1]
    k = math.log(getattr(b, attr) / getattr(a, attr)) / math.log(b.length / a.length)
    return f" ~L^{k:.1f}"


def _log_axes(ax, points: list[Point]) -> None:
    lengths = sorted({p.length for p in points})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("length L (tokens)")
    ax.grid(True, which="both", alpha=0.3)


def add_scaling_parser(subparsers) -> None:
    """Register `bench-attention` on the `pinfer` command's subparsers (its own command: the
    study measures one attention layer, not an engine, so `pinfer bench`'s flags do not apply)."""
    parser = subparsers.add_parser(
        "bench-attention", help="prefill/decode latency and memory vs length, per attention backend and KV layout",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scaling_args(parser)
    parser.set_defaults(func=run_scaling)


def main(argv: list[str] | None = None) -> int:
    """`python -m pinfer.tools.bench_scaling ...` is `pinfer bench-attention ...`."""
    from pinfer.entrypoints.cli import main as pinfer_main

    return pinfer_main(["bench-attention", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
