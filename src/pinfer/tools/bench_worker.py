"""One benchmark configuration, in its own process (so its peak RSS is its own):

    python -m pinfer.tools.bench_worker SPEC.json RESULT.json

Loads the runner once, then for each workload: a warm-up run (the same prompts,
at most `warmup_max_tokens` new tokens; none when 0), then `repeats` measured runs, each
inside an EnergyMeter (CPU time of this process; RAPL joules when readable).
Writes every raw number to RESULT.json; progress goes to stderr.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pinfer.tools.bench_runners import RUNNERS, Runner, RunResult
from pinfer.tools.energy import EnergyMeter, probe_rapl
from pinfer.tools.workloads import Workload, make_workload


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (ru_maxrss: KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def run_record(result: RunResult, meter: EnergyMeter | None = None) -> dict[str, Any]:
    """One run's raw numbers plus the rates derived from them."""
    tokens = result.generated_tokens
    timed = [r for r in result.requests if r.tpot_s is not None]
    decode_tokens = sum(r.generated_tokens - 1 for r in timed)
    decode_seconds = sum((r.generated_tokens - 1) * r.tpot_s for r in timed)
    ttfts = [r.ttft_s for r in result.requests if r.ttft_s is not None]
    record: dict[str, Any] = {
        "seconds": result.seconds,
        "generated_tokens": tokens,
        "tok_s": tokens / result.seconds if result.seconds > 0 else None,
        "decode_tok_s": decode_tokens / decode_seconds if decode_seconds > 0 else None,
        "ttft_s_mean": sum(ttfts) / len(ttfts) if ttfts else None,
        "tpot_s_mean": decode_seconds / decode_tokens if decode_tokens else None,
        "requests": [asdict(r) for r in result.requests],
    }
    if meter is not None:
        m = meter.result
        record.update(cpu_seconds=m.cpu_seconds, cpu_seconds_per_token=m.cpu_seconds / tokens if tokens else None,
                      joules=m.joules, zone_joules=m.zone_joules,
                      joules_per_token=m.joules / tokens if m.joules is not None and tokens else None)
    return record


def bench_workload(runner: Runner, workload: Workload, repeats: int, warmup_max_tokens: int,
                   zones: tuple = ()) -> dict[str, Any]:
    def log(message: str) -> None:
        print(f"  {workload.name}: {message}", file=sys.stderr, flush=True)

    warmup = None
    if warmup_max_tokens > 0:
        warmup = runner.run(workload.with_max_tokens(min(workload.max_tokens, warmup_max_tokens)))
        log(f"warm-up {warmup.generated_tokens} tokens in {warmup.seconds:.1f}s")
    runs = []
    for i in range(repeats):
        with EnergyMeter(zones) as meter:
            result = runner.run(workload)
        runs.append(run_record(result, meter))
        rate = runs[-1]["decode_tok_s" if workload.metric == "decode" else "tok_s"]
        log(f"run {i + 1}/{repeats}: {result.generated_tokens} tokens in {result.seconds:.1f}s, "
            f"{rate:.2f} {workload.metric} tok/s")
    return {
        "workload": workload.name, "metric": workload.metric, "num_prompts": workload.num_prompts,
        "max_tokens": workload.max_tokens, "temperature": workload.temperature, "logprobs": workload.logprobs,
        "ignore_eos": workload.ignore_eos, "seed": workload.seed, "warmup": warmup and run_record(warmup), "runs": runs,
        # A high-water mark: after the first workload it covers that one (and loading); later ones
        # report the maximum so far, which is theirs when they are the larger (rollout after latency).
        "peak_rss_bytes": peak_rss_bytes(),
    }


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    probe = probe_rapl(spec.get("powercap_root")) if spec.get("energy") else None
    zones = probe.zones if probe and probe.available else ()
    start = time.perf_counter()
    runner = RUNNERS[spec.get("runner", "pinfer")](spec)
    load_seconds = time.perf_counter() - start
    described = runner.describe()
    print(f"  loaded {described['model']} ({described['dtype']}) in {load_seconds:.1f}s", file=sys.stderr, flush=True)
    workloads = [bench_workload(runner, make_workload(**w), spec["repeats"], spec["warmup_max_tokens"], zones)
                 for w in spec["workloads"]]
    return {"describe": described, "load_seconds": load_seconds, "workloads": workloads,
            "energy_source": None if probe is None else "rapl" if probe.available else "cpu_time",
            "peak_rss_bytes": peak_rss_bytes(), "error": None}


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_spec(spec)
        code = 0
    except Exception as exc:  # report it to the parent, which prints it and carries on with the next config
        traceback.print_exc(file=sys.stderr)
        result = {"error": f"{type(exc).__name__}: {exc}"}
        code = 1
    Path(result_path).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
