"""`pinfer bench`: throughput, latency, memory and energy, one table row per
(configuration, workload), like llama.cpp's llama-bench.

    pinfer bench                                           # latency + rollout, default model and dtype
    pinfer bench --dtype float32,bfloat16 --energy --json out.json --plot out.png
    pinfer bench -w rollout --num-prompts 256 --repeats 5
    pinfer bench -w serve --concurrency 16                 # streaming clients against `pinfer serve`
    pinfer bench -e pinfer,llama.cpp -w serve              # ... and against llama.cpp's llama-server
    pinfer bench -e pinfer,transformers -w long_prompt     # TTFT of a ~1,000-token prompt

Workloads (workloads.py): latency (batch 1, decode tok/s), rollout (64 sampled
prompts with logprobs, total tok/s), serve (--concurrency streaming clients of the
openai package against a `pinfer serve` started with the same configuration, or for
the llama.cpp peer its llama-server with one slot per client (`make llama-server`): total
tok/s, TTFT / TPOT / ITL percentiles, the server's peak RSS and CPU time), long_prompt
(TTFT in seconds of one ~1,000-token prompt). EOS is ignored in all of them.

Comma-separated values of --model, --dtype, --quantization, --kv-cache-dtype, --attention-backend,
--max-num-seqs and --threads make one configuration per combination. Each
configuration runs in a fresh process (bench_worker.py), so its peak RSS is its
own; this process only orchestrates, prints and writes the files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pinfer.entrypoints.cli import add_engine_args, engine_config_from_args
from pinfer.errors import PinferError
from pinfer.loading.resolve import DEFAULT_MODEL
from pinfer.tools import energy
from pinfer.tools.bench_runners import RUNNERS
from pinfer.tools.workloads import WORKLOAD_NAMES

# Flags that take comma-separated values, and how to parse one value.
AXES: dict[str, Any] = {
    "engine": str,
    "model": str, "dtype": str, "quantization": lambda v: None if v in ("none", "") else v,
    "kv_cache_dtype": lambda v: v or "auto",
    "attention_backend": lambda v: None if v in ("default", "") else v, "max_num_seqs": int,
    "threads": lambda v: None if v in ("default", "") else int(v),
}


def add_bench_parser(subparsers) -> None:
    """Register `bench` on the `pinfer` command's subparsers."""
    parser = subparsers.add_parser(
        "bench", help="benchmark tok/s, TTFT, TPOT, peak RSS and energy; one table row per configuration",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",  # the configuration flags below replace add_engine_args' single-valued ones
    )
    add_engine_args(parser)
    axes = parser.add_argument_group("configurations (comma-separated values: one row per combination)")
    axes.add_argument("--engine", "-e", default="pinfer",
                      help=f"engines to run side by side, from {', '.join(RUNNERS)} (default: pinfer); peers "
                           "get the same model, dtype, threads and workloads")
    axes.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"models (default: {DEFAULT_MODEL})")
    axes.add_argument("--dtype", default="auto", help="e.g. float32,bfloat16 (default: auto)")
    axes.add_argument("--quantization", "-q", default="none", help="none, int8, int4 (default: none)")
    axes.add_argument("--kv-cache-dtype", default="auto",
                      help="auto, int8 (default: auto); llama.cpp gets q8_0 K and V caches for int8")
    axes.add_argument("--attention-backend", default="default",
                      help="paged, blocked, reference, batch_invariant (default: paged, or batch_invariant "
                           "with --deterministic)")
    axes.add_argument("--max-num-seqs", default="256", help="max sequences per step (default: 256)")
    axes.add_argument("--threads", "-t", default="default",
                      help="torch intra-op threads (default: torch's own, one per usable core)")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--workload", "-w", default="latency,rollout",
                       help=f"comma-separated, from {', '.join(WORKLOAD_NAMES)} (default: latency,rollout); "
                            "serve runs clients against a `pinfer serve` of each configuration, or llama.cpp's "
                            "llama-server (not applicable to the transformers peer), long_prompt reports TTFT "
                            "in seconds")
    bench.add_argument("--num-prompts", type=int, default=64, help="rollout and serve prompts (default: 64)")
    bench.add_argument("--max-tokens", type=int, default=None,
                       help="new tokens per request (default: 128; long_prompt: 16)")
    bench.add_argument("--concurrency", "-c", type=int, default=16,
                       help="serve: streaming clients, each sending its next prompt when its request finished "
                            "(default: 16)")
    bench.add_argument("--repeats", "-r", type=int, default=3, help="measured runs per workload (default: 3)")
    bench.add_argument("--warmup-tokens", type=int, default=32,
                       help="the warm-up run generates at most this many tokens per prompt; 0: no warm-up "
                            "(default: 32)")
    bench.add_argument("--seed", type=int, default=0, help="rollout prompts and sampling seeds (default: 0)")
    bench.add_argument("--energy", action="store_true",
                       help="joules per token from RAPL (/sys/class/powercap) where readable, "
                            "else CPU-seconds per token")
    bench.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                       help="write every raw number and the machine description to FILE (stdout without FILE)")
    bench.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart of tok/s per configuration")
    parser.set_defaults(func=cmd_bench)


def expand_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One spec (engine config + threads) per combination of the comma-separated flags.
    EngineConfig validates each one here, before any model is loaded."""
    try:
        values = {name: [parse(v.strip()) for v in str(getattr(args, name)).split(",")]
                  for name, parse in AXES.items()}
    except ValueError as exc:
        raise PinferError(f"bad configuration value: {exc} (--max-num-seqs and --threads take integers)") from exc
    configs = []
    for combo in itertools.product(*values.values()):
        chosen = dict(zip(values, combo))
        threads, runner = chosen.pop("threads"), chosen.pop("engine")
        if runner not in RUNNERS:
            raise PinferError(f"unknown engine {runner!r}; choose from {', '.join(RUNNERS)}")
        engine_config = engine_config_from_args(argparse.Namespace(**{**vars(args), **chosen}))
        configs.append({"engine": asdict(engine_config), "threads": threads, "runner": runner})
    return configs


def workload_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = [w.strip() for w in args.workload.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOAD_NAMES]
    if unknown or not names:
        raise PinferError(f"unknown workload {', '.join(unknown) or '(none)'}; choose from {', '.join(WORKLOAD_NAMES)}")
    for flag, value, low in (("--repeats", args.repeats, 1), ("--num-prompts", args.num_prompts, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--warmup-tokens", args.warmup_tokens, 0),
                             ("--concurrency", args.concurrency, 1)):
        if value is not None and value < low:
            raise PinferError(f"{flag} must be >= {low}, got {value}")
    return [{"name": w, "max_tokens": args.max_tokens, "num_prompts": args.num_prompts, "seed": args.seed,
             "concurrency": args.concurrency} for w in names]


def run_worker(spec: dict[str, Any], workdir: Path, index: int) -> dict[str, Any]:
    """Run one configuration in a fresh Python process; relay its progress to stderr."""
    spec_path, result_path = workdir / f"spec{index}.json", workdir / f"result{index}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # so the worker imports this pinfer even when not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    load_before = os.getloadavg()
    process = subprocess.Popen([sys.executable, "-m", "pinfer.tools.bench_worker", str(spec_path), str(result_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:
        sys.stderr.write(line)
    code = process.wait()
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = {"error": f"the worker process exited with code {code} without a result"}
    result["load_average_before"], result["load_average_after"] = list(load_before), list(os.getloadavg())
    return result


def cmd_bench(args: argparse.Namespace) -> int:
    from pinfer.tools.bench_report import describe_machine, format_table, plot

    workloads = workload_specs(args)
    configs = expand_configs(args)
    machine = describe_machine()
    probe = energy.probe_rapl() if args.energy else None
    if probe is not None:
        print(f"energy: {probe.message}", file=sys.stderr)
    common = {"workloads": workloads, "repeats": args.repeats,
              "warmup_max_tokens": args.warmup_tokens, "energy": args.energy,
              "powercap_root": str(energy.POWERCAP_ROOT)}
    records, rows = [], []
    with tempfile.TemporaryDirectory(prefix="pinfer-bench-") as tmp:
        for i, config in enumerate(configs):
            spec = {**common, **config}
            e = config["engine"]
            print(f"[{i + 1}/{len(configs)}] {config['runner']}: {e['model']} dtype={e['dtype']} "
                  f"quantization={e['quantization'] or 'none'} kv={e['kv_cache_dtype']} attention={e['attention_backend']} "
                  f"threads={config['threads'] or 'default'}", file=sys.stderr)
            result = run_worker(spec, Path(tmp), i)
            records.append({"spec": spec, "result": result})
            rows += _rows(spec, result)
            if args.json and args.json != "-":  # after every configuration: an interrupted run keeps what finished
                Path(args.json).write_text(json.dumps(_document(args, machine, probe, rows, records), indent=1))

    rapl = bool(probe and probe.available)
    out = sys.stderr if args.json == "-" else sys.stdout
    vm = ", virtual machine" if machine["virtual_machine"] else ""
    print(format_table(rows, energy=args.energy, rapl=rapl), file=out)
    load = f"; load average {machine['load_average'][0]:.2f} at start" if machine["load_average"] else ""
    print(f"{machine['cpu_model']} ({machine['cpu_matrix_isa']}), {machine['usable_cpus']} usable CPUs{vm}; "
          f"torch {machine['torch']}{load}", file=out)
    if args.energy and not rapl:
        print("energy: no readable RAPL, so CPU-s/tok (process CPU time, all threads) instead of joules", file=out)
    if args.json == "-":
        json.dump(_document(args, machine, probe, rows, records), sys.stdout, indent=1)
        print()
    elif args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot, title=f"pinfer bench on {machine['cpu_model']} ({machine['usable_cpus']} CPUs{vm})")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 1 if any(r.error and not r.not_applicable for r in rows) else 0


def _rows(spec: dict[str, Any], result: dict[str, Any]) -> list:
    from pinfer.tools.bench_report import describe_spec, error_row, summarize

    if not result["error"]:
        for w in result["workloads"]:
            if w.get("error") and not w.get("not_applicable"):
                print(f"  {w['workload']} failed: {w['error']}", file=sys.stderr)
        return [summarize(result["describe"], w) for w in result["workloads"]]
    print(f"  failed: {result['error']}", file=sys.stderr)
    return [error_row(describe_spec(spec), w["name"], "", result["error"]) for w in spec["workloads"]]


def _document(args: argparse.Namespace, machine: dict, probe: energy.RaplProbe | None, rows: list,
              records: list) -> dict[str, Any]:
    """The --json output: settings, machine, energy source, summary rows and every raw number."""
    energy_info = None if probe is None else {
        "source": "rapl" if probe.available else "cpu_time", "message": probe.message,
        "zones": [f"{z.zone_id} {z.name}" for z in probe.zones]}
    return {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "machine": machine,
            "energy": energy_info, "rows": [asdict(r) for r in rows], "configurations": records}
