"""What `pinfer bench` shows: the machine description, one summary row per
(configuration, workload), the llama-bench-style table, and the bar chart."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def describe_machine() -> dict[str, Any]:
    import torch

    cpuinfo = _read("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    physical = set(_core_ids(cpuinfo))  # distinct (physical id, core id) pairs
    return {
        "cpu_model": models[0] if models else platform.processor() or platform.machine(),
        "cpu_matrix_isa": _matrix_isa(cpuinfo),
        "logical_cpus": os.cpu_count(),
        "physical_cores": len(physical) or None,
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "virtual_machine": " hypervisor" in cpuinfo,
        "memory_bytes": _mem_total_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "pinfer": _pinfer_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# the instruction sets that decide the GEMMs' speed (the same model name can come with or without AMX)
_MATRIX_FLAGS = {"avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "BF16", "amx_bf16": "AMX-BF16",
                 "amx_int8": "AMX-INT8"}


def _matrix_isa(cpuinfo: str) -> str:
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return " ".join(name for flag, name in _MATRIX_FLAGS.items() if flag in flags) or "none of AVX-512/AMX"


def _core_ids(cpuinfo: str) -> list[str]:
    ids = []
    for block in cpuinfo.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            ids.append(f"{fields.get('physical id', '0')}\n{fields['core id']}")
    return ids


def _mem_total_bytes() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def _pinfer_version() -> str:
    import pinfer

    return pinfer.__version__


# The run record's key (bench_worker.run_record) of each metric's headline number.
HEADLINE_KEYS = {"decode": "decode_tok_s", "total": "tok_s", "ttft": "ttft_s_mean"}


@dataclass
class Row:
    """One (configuration, workload): means and sample stddevs over the measured runs
    (a percentile is the mean of the runs' percentiles)."""

    model: str
    dtype: str
    quantization: str
    threads: int | None
    attention_backend: str
    max_num_seqs: int | None  # None: a peer without a sequence cap
    workload: str
    metric: str  # the headline: "decode" or "total" tok/s, or "ttft" seconds (workloads.Workload.metric)
    repeats: int = 0
    tok_s_mean: float | None = None
    tok_s_std: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    peak_rss_mib: float | None = None  # a served workload's: the server process's
    joules_per_token: float | None = None
    cpu_seconds_per_token: float | None = None
    error: str | None = None
    engine: str = "pinfer"  # which runner (bench_runners.RUNNERS)
    ttft_ms_std: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    tpot_p50_ms: float | None = None
    tpot_p99_ms: float | None = None
    itl_p50_ms: float | None = None  # streamed (served) requests only
    itl_p99_ms: float | None = None
    concurrency: int | None = None  # streaming clients of a served workload; None: offline
    not_applicable: bool = False  # with error: the engine cannot run this workload (not a failure)
    kv_cache_dtype: str = "auto"  # the KV cache's storage: auto (the model's dtype) or int8

    def headline(self) -> tuple[float | None, float | None]:
        """(mean, stddev) of the headline number: tok/s, or seconds for the "ttft" metric."""
        if self.metric == "ttft":
            return _scaled(self.ttft_ms, 1e-3), _scaled(self.ttft_ms_std, 1e-3)
        return self.tok_s_mean, self.tok_s_std


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def describe_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A configuration as it was asked for (nothing resolved), for the rows of what did not run."""
    e = spec["engine"]
    return {"engine": spec.get("runner", "pinfer"), "model": e["model"], "dtype": str(e["dtype"]),
            "quantization": e["quantization"] or "none", "kv_cache_dtype": e.get("kv_cache_dtype", "auto"),
            "threads": spec.get("threads"),
            "attention_backend": e["attention_backend"], "max_num_seqs": e["max_num_seqs"]}


def error_row(config: dict[str, Any], workload: str, metric: str, error: str, not_applicable: bool = False) -> Row:
    """config: a result's "describe" (or describe_spec); a row that says why there are no numbers."""
    return Row(engine=config.get("engine", "pinfer"), model=config["model"], dtype=config["dtype"],
               quantization=config["quantization"], kv_cache_dtype=config.get("kv_cache_dtype", "auto"),
               threads=config["threads"],
               attention_backend=config["attention_backend"], max_num_seqs=config["max_num_seqs"],
               workload=workload, metric=metric, error=error, not_applicable=not_applicable)


def summarize(config: dict[str, Any], workload: dict[str, Any]) -> Row:
    """config: a result's "describe"; workload: one entry of its "workloads"."""
    if workload.get("error"):
        return error_row(config, workload["workload"], workload["metric"], workload["error"],
                         workload.get("not_applicable", False))
    runs = workload["runs"]

    def mean(key: str, scale: float = 1.0) -> float | None:
        return _scaled(_mean_std([r.get(key) for r in runs])[0], scale)

    rate_key = "decode_tok_s" if workload["metric"] == "decode" else "tok_s"  # ttft: its tok/s too, not headline
    tok_s_mean, tok_s_std = _mean_std([r[rate_key] for r in runs])
    ttft, ttft_std = _mean_std([r["ttft_s_mean"] for r in runs])
    peak = workload["peak_rss_bytes"]
    return Row(
        engine=config.get("engine", "pinfer"), model=config["model"], dtype=config["dtype"], quantization=config["quantization"],
        kv_cache_dtype=config.get("kv_cache_dtype", "auto"),
        threads=config["threads"], attention_backend=config["attention_backend"],
        max_num_seqs=config["max_num_seqs"], workload=workload["workload"], metric=workload["metric"],
        repeats=len(runs), tok_s_mean=tok_s_mean, tok_s_std=tok_s_std,
        ttft_ms=_scaled(ttft, 1e3), ttft_ms_std=_scaled(ttft_std, 1e3), tpot_ms=mean("tpot_s_mean", 1e3),
        peak_rss_mib=None if peak is None else peak / 2**20, joules_per_token=mean("joules_per_token"),
        cpu_seconds_per_token=mean("cpu_seconds_per_token"),
        ttft_p50_ms=mean("ttft_s_p50", 1e3), ttft_p99_ms=mean("ttft_s_p99", 1e3),
        tpot_p50_ms=mean("tpot_s_p50", 1e3), tpot_p99_ms=mean("tpot_s_p99", 1e3),
        itl_p50_ms=mean("itl_s_p50", 1e3), itl_p99_ms=mean("itl_s_p99", 1e3),
        concurrency=workload.get("concurrency"),
    )


def format_table(rows: list[Row], energy: bool, rapl: bool) -> str:
    """A Markdown table, one row per (configuration, workload), as llama-bench prints."""
    columns: list[tuple[str, str, Any]] = [  # header, alignment, cell
        ("engine", "<", lambda r: r.engine),
        ("model", "<", lambda r: r.model),
        ("dtype", "<", lambda r: r.dtype),
        ("quant", "<", lambda r: r.quantization),
        ("threads", ">", lambda r: "" if r.threads is None else str(r.threads)),
    ]
    if any(r.kv_cache_dtype != "auto" for r in rows):
        columns.append(("kv cache", "<", lambda r: r.kv_cache_dtype))
    if any(r.attention_backend != "paged" for r in rows):
        columns.append(("attention", "<", lambda r: r.attention_backend))
    if len({r.max_num_seqs for r in rows}) > 1:
        columns.append(("max seqs", ">", lambda r: "" if r.max_num_seqs is None else str(r.max_num_seqs)))
    columns += [
        ("workload", "<", lambda r: f"{r.workload} ({r.concurrency} clients)" if r.concurrency else r.workload),
        ("tok/s", ">", _headline_cell),
        ("TTFT ms", ">", lambda r: _num(r.ttft_ms, 1)),
        ("TPOT ms", ">", lambda r: _num(r.tpot_ms, 1)),
    ]
    if any(r.concurrency for r in rows):  # a served workload: the tails matter
        columns += [
            ("TTFT p50/p99 ms", ">", lambda r: _pair(r.ttft_p50_ms, r.ttft_p99_ms, 0)),
            ("TPOT p50/p99 ms", ">", lambda r: _pair(r.tpot_p50_ms, r.tpot_p99_ms, 1)),
            ("ITL p50/p99 ms", ">", lambda r: _pair(r.itl_p50_ms, r.itl_p99_ms, 1)),
        ]
    columns.append(("peak RSS MiB", ">", lambda r: _num(r.peak_rss_mib, 0)))
    if energy and rapl:
        columns.append(("J/tok", ">", lambda r: _num(r.joules_per_token, 3)))
    if energy:
        columns.append(("CPU-s/tok", ">", lambda r: _num(r.cpu_seconds_per_token, 4)))
    cells = [[cell(r) for _, _, cell in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(f"{v:{a}{w}}" for v, (_, a, _), w in zip(values, columns, widths)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + (":" if a == ">" else "-") for (_, a, _), w in zip(columns, widths)) + " |"
    return "\n".join([line([h for h, _, _ in columns]), rule] + [line(c) for c in cells])


def _headline_cell(r: Row) -> str:
    if r.error:
        return f"{'n/a' if r.not_applicable else 'failed'}: {r.error}"
    mean, std = r.headline()
    if r.metric == "ttft":
        return f"{_num(mean, 3)} ± {_num(std, 3)} s (TTFT)"
    return f"{_num(mean, 2)} ± {_num(std, 2)}" + (" (decode)" if r.metric == "decode" else "")


def _pair(a: float | None, b: float | None, digits: int) -> str:
    return "" if a is None and b is None else f"{_num(a, digits)} / {_num(b, digits)}"


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def plot(rows: list[Row], path: str | Path, title: str) -> None:
    """Bar chart of the headline number (± stddev) per configuration, one panel per workload:
    tok/s, or seconds for a TTFT workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.headline()[0] is not None]
    workloads = list(dict.fromkeys(r.workload for r in rows))
    if not workloads:
        raise ValueError("nothing to plot: every configuration failed")
    varying = _varying_fields(rows)
    if "engine" in varying:  # each engine's own attention and batch limit: its name says them
        varying = [f for f in varying if f not in ("attention_backend", "max_num_seqs")]
    bars = max(sum(r.workload == name for r in rows) for name in workloads)
    fig, axes = plt.subplots(1, len(workloads), figsize=(max(4.5, 1.05 * bars) * len(workloads), 4), squeeze=False)
    for ax, name in zip(axes[0], workloads):
        subset = [r for r in rows if r.workload == name]
        labels = ["\n".join(str(v) for f in varying if (v := getattr(r, f)) is not None) or r.model for r in subset]
        ttft = subset[0].metric == "ttft"
        ax.bar(range(len(subset)), [r.headline()[0] for r in subset], yerr=[r.headline()[1] for r in subset],
               capsize=4, color="tab:orange" if ttft else "tab:blue")
        ax.set_xticks(range(len(subset)), labels, fontsize=8)
        ax.set_title(f"{name} (TTFT s, lower is better)" if ttft else f"{name} ({subset[0].metric} tok/s)")
        ax.set_ylabel("seconds" if ttft else "tokens / s")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _varying_fields(rows: list[Row]) -> list[str]:
    fields = ["engine", "model", "dtype", "quantization", "threads", "attention_backend", "max_num_seqs"]
    return [f for f in fields if len({getattr(r, f) for r in rows}) > 1]
