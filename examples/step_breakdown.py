"""Where a decode step's time goes: per kernel, per engine phase, and the serial rest.

    .venv/bin/python examples/step_breakdown.py [-q int8] [--kv-cache-dtype int8] [--dtype bfloat16]
    .venv/bin/python examples/step_breakdown.py --latency        # batch 1, greedy
    .venv/bin/python examples/step_breakdown.py -q int8 --prefill  # the prompts' prefill steps instead

Builds a copy of the kernels (kernels/cpu_ops.cpp, cpu_ops_avx2.cpp and their shared header) in
which every at::parallel_for is timed (once per machine and source, ~30 s, in pinfer's kernel
cache): the region's wall time on the calling thread, and each of the two threads' time in its
chunk. A region is named after the function it sits in (the AVX2 GEMMs' after gemm_blocks, the
loop both share). Then runs the bench's rollout workload (64 prompts x 128 tokens, temperature
1, logprobs, EOS ignored), or with --latency its batch-1 greedy prompt, after a warm-up, and
prints, in ms per decode step (the steps after every prompt's prefill):
  - each kernel's parallel regions, with how busy each thread was in them;
  - the engine's phases (Python, with the ops they call);
  - the serial rest: the step's wall time minus the regions' (Python, op dispatch and
    allocation, the code between a fused stack's kernels), while the second thread waits.
Run it with nothing else on the machine. The timers add two clock reads per thread and region
(~1,000 regions a batch-64 step), so the step runs a little slower than without them.
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import time
from pathlib import Path

import torch

from pinfer import kernels

# The timers, in a header of their own that every instrumented file includes: inline variables,
# so the kernel files share one set. A region's id is its file's base + its line.
_HOOK = r"""
#pragma once
#include <ATen/Parallel.h>
#include <chrono>
namespace region_timing {  // examples/step_breakdown.py: every parallel region, timed
inline double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
constexpr int kLines = %(lines)d;
inline double work[kLines][2], wall[kLines];
inline int64_t calls[kLines];
template <class F> void timed(int line, int64_t begin, int64_t end, int64_t grain, const F& f) {
  const double start = now();
  at::parallel_for (begin, end, grain, [&](int64_t b, int64_t e) {
    const double s = now();
    f(b, e);
    work[line][at::get_thread_num() & 1] += now() - s;
  });
  wall[line] += now() - start;
  calls[line]++;
}
inline at::Tensor region_times() {  // [lines, 4]: calls, wall s, thread 0 s, thread 1 s; then resets
  auto t = at::zeros({kLines, 4}, at::kDouble);
  auto a = t.accessor<double, 2>();
  for (int i = 0; i < kLines; ++i) {
    a[i][0] = calls[i], a[i][1] = wall[i], a[i][2] = work[i][0], a[i][3] = work[i][1];
    calls[i] = 0, wall[i] = work[i][0] = work[i][1] = 0;
  }
  return t;
}
}  // namespace region_timing
"""
_FILE_LINES = 8192  # region ids: file i's lines at i * _FILE_LINES
_FUNCTION = re.compile(r"^\s*(?:inline\s+)?(?:void|at::Tensor|float|int64_t|std::tuple<.*>)\s+(\w+)\s*\(")


def instrumented_sources(directory: Path) -> tuple[list[Path], list[tuple[str, list[str]]]]:
    """Timed copies of the kernel sources in `directory`: the .cpp files to build, and each
    instrumented file's (name, lines), indexed as its region ids are."""
    directory.mkdir(parents=True, exist_ok=True)
    files = [*kernels.SOURCES, kernels.HEADER]
    (directory / "region_timing.h").write_text(_HOOK % {"lines": len(files) * _FILE_LINES})
    listing = []
    for index, original in enumerate(files):
        source = original.read_text()
        assert "at::parallel_for (" not in source and len(source.splitlines()) < _FILE_LINES
        source = source.replace("#include <torch/library.h>\n", '#include <torch/library.h>\n#include "region_timing.h"\n', 1)
        source = source.replace("at::parallel_for(", f"region_timing::timed({index * _FILE_LINES} + __LINE__, ")
        source = source.replace('m.def("available() -> bool", &available);',
                                'm.def("available() -> bool", &available);\n'
                                '  m.def("region_times() -> Tensor", &region_timing::region_times);')
        (directory / original.name).write_text(source)  # the header keeps its name: the sources include it
        listing.append((original.name, source.splitlines()))
    return [directory / path.name for path in kernels.SOURCES], listing


def enclosing_function(listing: list[tuple[str, list[str]]], region: int) -> str:
    """The kernel function a parallel region (its file's base + line, 1-based) sits in."""
    name, lines = listing[region // _FILE_LINES]
    line = region % _FILE_LINES
    for text in reversed(lines[: line - 1]):
        if match := _FUNCTION.match(text):
            return match.group(1)
    return f"{name}:{line}"


class PhaseTimes:
    """Wall time spent in chosen methods, accumulated by name."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()

    def wrap(self, owner, name: str, label: str) -> None:
        original = owner.__dict__[name]
        is_static = isinstance(original, staticmethod)
        function = original.__func__ if is_static else original

        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, name, staticmethod(timed) if is_static else timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", "-q", default=None, choices=["int8", "int4"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--latency", action="store_true", help="batch 1, greedy, instead of the rollout")
    parser.add_argument("--prefill", action="store_true", help="break down the prompts' prefill steps instead")
    args = parser.parse_args()

    sources, listing = instrumented_sources(kernels.cache_dir() / "step_breakdown")
    kernels.SOURCES = sources  # the kernels, timed; set before anything loads the kernels
    if not kernels.load():
        raise SystemExit(f"the kernels did not load: {kernels.status()}")

    from pinfer import LLM
    from pinfer.engine.llm_engine import LLMEngine
    from pinfer.engine.model_runner import ModelRunner
    from pinfer.engine.scheduler import Scheduler
    from pinfer.sampling.sampler import Sampler
    from pinfer.tools.workloads import make_workload

    llm = LLM(dtype=args.dtype, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.engine
    phases = PhaseTimes()
    model_class = type(engine.runner.model)
    for owner, name, label in [
        (Scheduler, "schedule", "schedule"), (ModelRunner, "_prepare", "prepare inputs"),
        (ModelRunner, "zero_new_blocks", "zero new KV blocks"), (model_class, "forward", "model forward"),
        (model_class, "compute_logits", "logits (the head)"), (ModelRunner, "_sampling_batch", "sampling batch"),
        (Sampler, "__call__", "sampler"), (ModelRunner, "_unpack_samples", "unpack samples"),
        (LLMEngine, "_process", "postprocess (tokens, text, outputs)"),
    ]:
        phases.wrap(owner, name, label)

    workload = make_workload("latency" if args.latency else "rollout")
    prompts = [llm.apply_chat_template(list(c)) for c in workload.conversations]

    llm.generate(prompts, workload.sampling_params(16), use_tqdm=False)  # warm-up
    engine.block_manager.reset_prefix_cache()
    for prompt, p in zip(prompts, workload.sampling_params()):
        engine.add_request(prompt, p, final_only=True)
    torch.ops.pinfer.region_times()
    phases.seconds.clear()
    prefill_start, prefill_steps = time.perf_counter(), 0
    while any(seq.num_output_tokens == 0 for r in engine.requests.values() for seq in r.seqs):
        engine.step()  # the prompts' prefill
        prefill_steps += 1
    prefill = time.perf_counter() - prefill_start
    prefill_regions, prefill_phases = torch.ops.pinfer.region_times(), phases.seconds.copy()
    phases.seconds.clear()
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    wall = (time.perf_counter() - start) / steps
    regions = torch.ops.pinfer.region_times()

    name = f"{args.dtype}{', ' + args.quantization if args.quantization else ''}, KV cache {args.kv_cache_dtype}"
    batch = len(prompts)
    print(f"{workload.name} {batch} x {workload.max_tokens}, {name}: {steps} decode steps, {1000 * wall:.2f} ms a step "
          f"({batch / wall:.0f} tok/s); before them, the prompts' prefill: {prefill:.2f} s in {prefill_steps} steps")
    if args.prefill:
        regions, phases.seconds, steps, wall = prefill_regions, prefill_phases, prefill_steps, prefill / prefill_steps
        print(f"\nthe prefill steps instead of the decode steps: {1000 * wall:.1f} ms a step")
    report(listing, regions, phases, steps, wall)


def report(listing: list[tuple[str, list[str]]], regions: torch.Tensor, phases: PhaseTimes, steps: int, wall: float) -> None:
    per_function: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for line in regions[:, 0].nonzero().flatten().tolist():
        totals = per_function[enclosing_function(listing, line)]
        for i, value in enumerate(regions[line].tolist()):
            totals[i] += value
    in_regions = sum(t[1] for t in per_function.values()) / steps
    print("\nkernel parallel regions, ms a step (calls a step; each thread's share of the region's time busy):")
    for function, (calls, seconds, main_thread, worker) in sorted(per_function.items(), key=lambda kv: -kv[1][1]):
        print(f"  {function:28s} {1000 * seconds / steps:7.2f}  ({calls / steps:5.1f})  "
              f"threads {100 * main_thread / seconds:3.0f}% / {100 * worker / seconds:3.0f}%")
    print(f"  {'all regions':28s} {1000 * in_regions:7.2f}")
    print(f"\nserial (outside the regions; the second thread waits): {1000 * (wall - in_regions):.2f} ms a step")
    print("\nengine phases, ms a step (with the ops they call):")
    for label, seconds in phases.seconds.most_common():
        print(f"  {label:36s} {1000 * seconds / steps:7.2f}")


if __name__ == "__main__":
    main()
