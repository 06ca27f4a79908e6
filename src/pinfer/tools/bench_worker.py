"""One benchmark configuration, in its own process (so its peak RSS is its own):

    python -m pinfer.tools.bench_worker SPEC.json RESULT.json

For each workload: a warm-up run (the same prompts, at most `warmup_max_tokens` new
tokens; none when 0), then `repeats` measured runs, each inside an EnergyMeter (CPU time
of this process; RAPL joules when readable). Offline workloads share one runner, loaded
at the first of them; a served workload (`serve`) starts the engine's server for itself
and measures that process instead (bench_serve.py). A workload the engine cannot run
(serve on a peer without a server) or that fails gets an error entry; the others go on.
Writes every raw number to RESULT.json; progress goes to stderr.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pinfer.tools.bench_report import HEADLINE_KEYS, describe_spec
from pinfer.tools.bench_runners import RUNNERS, Runner, RunResult
from pinfer.tools.bench_serve import NotApplicableError, ServedRunResult, StreamedRequest, start_serve_runner
from pinfer.tools.energy import EnergyMeter, probe_rapl
from pinfer.tools.workloads import Workload, make_workload


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (ru_maxrss: KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, linear between the closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def run_record(result: RunResult, meter: EnergyMeter | None = None) -> dict[str, Any]:
    """One run's raw numbers plus the rates derived from them."""
    tokens = result.generated_tokens
    timed = [r for r in result.requests if r.tpot_s is not None]
    decode_tokens = sum(r.generated_tokens - 1 for r in timed)
    decode_seconds = sum((r.generated_tokens - 1) * r.tpot_s for r in timed)
    ttfts = [r.ttft_s for r in result.requests if r.ttft_s is not None]
    tpots = [r.tpot_s for r in timed]
    record: dict[str, Any] = {
        "seconds": result.seconds,
        "generated_tokens": tokens,
        "tok_s": tokens / result.seconds if result.seconds > 0 else None,
        "decode_tok_s": decode_tokens / decode_seconds if decode_seconds > 0 else None,
        "ttft_s_mean": sum(ttfts) / len(ttfts) if ttfts else None,
        "tpot_s_mean": decode_seconds / decode_tokens if decode_tokens else None,
        "ttft_s_p50": percentile(ttfts, 50), "ttft_s_p99": percentile(ttfts, 99),
        "tpot_s_p50": percentile(tpots, 50), "tpot_s_p99": percentile(tpots, 99),
    }
    streamed = [r for r in result.requests if isinstance(r, StreamedRequest)]
    if streamed:
        gaps = [g for r in streamed for g in r.itl_s]
        record.update(itl_s_p50=percentile(gaps, 50), itl_s_p99=percentile(gaps, 99))
    if isinstance(result, ServedRunResult):
        record["server_peak_rss_bytes"] = result.server_peak_rss_bytes
    record["requests"] = [asdict(r) for r in result.requests]
    if meter is not None:
        m = meter.result
        # A served run: the server's CPU time, not this (client) process's.
        cpu = result.server_cpu_seconds if isinstance(result, ServedRunResult) else m.cpu_seconds
        record.update(cpu_seconds=cpu, cpu_seconds_per_token=cpu / tokens if cpu is not None and tokens else None,
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
    runs, results = [], []
    for i in range(repeats):
        with EnergyMeter(zones) as meter:
            result = runner.run(workload)
        runs.append(run_record(result, meter))
        results.append(result)
        value = runs[-1][HEADLINE_KEYS[workload.metric]]
        shown = "no rate (a single token)" if value is None else f"TTFT {value:.3f}s" if workload.metric == "ttft" \
            else f"{value:.2f} {workload.metric} tok/s"
        log(f"run {i + 1}/{repeats}: {result.generated_tokens} tokens in {result.seconds:.1f}s, {shown}")
    served = [r.server_peak_rss_bytes for r in results if isinstance(r, ServedRunResult)]
    return {
        "workload": workload.name, "metric": workload.metric, "num_prompts": workload.num_prompts,
        "max_tokens": workload.max_tokens, "temperature": workload.temperature, "logprobs": workload.logprobs,
        "ignore_eos": workload.ignore_eos, "seed": workload.seed, "concurrency": workload.concurrency,
        "warmup": warmup and run_record(warmup), "runs": runs,
        # A high-water mark. Offline: this process's; after the first workload it covers that one (and
        # loading), later ones report the maximum so far, which is theirs when they are the larger
        # (rollout after latency). Served: the server process's, which ran this workload only.
        "peak_rss_bytes": max(served, key=lambda b: b or 0) if served else peak_rss_bytes(),
    }


def bench_served_workload(spec: dict[str, Any], workload: Workload, zones: tuple = ()) -> dict[str, Any]:
    """Start the engine's server, run the workload's clients against it, stop it."""
    with tempfile.TemporaryDirectory(prefix="pinfer-bench-serve-") as tmp:
        runner = start_serve_runner(spec, Path(tmp) / "server.log", workload)
        try:
            print(f"  {workload.name}: server ready at {runner.server.base_url} in "
                  f"{runner.server.start_seconds:.1f}s", file=sys.stderr, flush=True)
            record = bench_workload(runner, workload, spec["repeats"], spec["warmup_max_tokens"], zones)
            record.update(server_start_seconds=runner.server.start_seconds, describe=runner.describe())
        except Exception as exc:  # the log goes with the folder: say what the server said (a crash, its reason)
            raise runner.server.failure(f"{type(exc).__name__}: {exc}") from exc
        finally:
            exit_code = runner.close()
    return {**record, "server_exit_code": exit_code}


def _not_applicable(workload: Workload, exc: NotApplicableError) -> dict[str, Any]:
    print(f"  {workload.name}: not applicable: {exc}", file=sys.stderr, flush=True)
    return {"workload": workload.name, "metric": workload.metric, "error": str(exc), "not_applicable": True}


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    probe = probe_rapl(spec.get("powercap_root")) if spec.get("energy") else None
    zones = probe.zones if probe and probe.available else ()
    runner, load_seconds, records = None, None, []
    for w in spec["workloads"]:
        workload = make_workload(**w)
        if workload.concurrency is None and runner is None:  # a model that does not load fails the configuration
            start = time.perf_counter()
            try:
                runner = RUNNERS[spec.get("runner", "pinfer")](spec)
            except NotApplicableError as exc:  # a peer without these settings (transformers and int8)
                records.append(_not_applicable(workload, exc))
                continue
            load_seconds = time.perf_counter() - start
            described = runner.describe()
            print(f"  loaded {described['model']} ({described['dtype']}) in {load_seconds:.1f}s",
                  file=sys.stderr, flush=True)
        try:
            if workload.concurrency is None:
                records.append(bench_workload(runner, workload, spec["repeats"], spec["warmup_max_tokens"], zones))
            else:
                records.append(bench_served_workload(spec, workload, zones))
        except NotApplicableError as exc:
            records.append(_not_applicable(workload, exc))
        except Exception as exc:  # this workload failed; the next ones may still run
            traceback.print_exc(file=sys.stderr)
            records.append({"workload": workload.name, "metric": workload.metric,
                            "error": f"{type(exc).__name__}: {exc}", "not_applicable": False})
    served = [r.pop("describe") for r in records if "describe" in r]
    described = runner.describe() if runner else served[0] if served else describe_spec(spec)
    return {"describe": described, "load_seconds": load_seconds,
            "workloads": records, "energy_source": None if probe is None else "rapl" if probe.available else "cpu_time",
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
