"""Tensor and data parallelism measured on this machine: the README's scale-out numbers.

    .venv/bin/python examples/scale_out_bench.py --json scale_out.json   # the README's table (~6 min, 2 cores)
    .venv/bin/python examples/scale_out_bench.py --quick                 # a smoke run of every path

Tensor parallel (TP). SmolLM2-135M's 9 query / 3 KV heads do not split in two, so TP runs on
a random-weight Llama of SmolLM2-135M's size whose heads do: hidden 576, 30 layers,
intermediate 1536, 8 query heads of head_dim 72, 4 KV heads, vocab 49152, tied embeddings,
with SmolLM2's tokenizer (pinfer's own, from the GGUF file). It is built once with
transformers and saved as bfloat16 safetensors under $PINFER_CACHE (default ~/.cache/pinfer);
the float32 runs upcast those weights at load. Per dtype, three configurations:
  TP=1            one process, torch's default thread count (the baseline)
  TP=1, 1 thread  one process, torch.set_num_threads(1)
  TP=2            two processes (this one is rank 0); pinfer gives each rank CPUs/2 threads
and two workloads: batch 1 (one chat prompt, 64 greedy tokens; decode tok/s =
(tokens - 1) / (last token time - first token time), i.e. without the prefill) and batch 16
(16 arithmetic chat prompts x 32 greedy tokens; all generated tokens / wall time).

Data parallel (DP). The real SmolLM2-135M: DP=1 (one engine in this process, torch's default
threads) vs DP=2 (two engine replicas as Ray actors, CPUs/2 threads each), in bfloat16
(--dp-dtype), on the rollout shape: 64 arithmetic chat prompts, 64 new tokens at temperature 1
with the chosen token's logprob, a seed per request: all generated tokens / wall time.

Start-up is the wall time of LLM(...) (model load, KV pool, worker processes); for DP=2 it
includes starting the local Ray instance, shown separately. Every measurement is preceded by a
short warm-up of the same shape and is the best of 2 runs. Prefix caching is off, so a repeat
prefills as much as the first run, and EOS is ignored, so every run generates exactly
prompts x max_tokens tokens. The "vs 1 process" column divides by TP=1 (same dtype and
workload) or DP=1. The thread column is what each process really used (read back from the
engine, the TP group's spec and the Ray replicas).

--quick runs every path on a tiny random Llama of the same kind (TP and DP) with a few tokens:
it checks the script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pinfer import LLM, SamplingParams
from pinfer.loading.loader import open_checkpoint
from pinfer.loading.resolve import DEFAULT_MODEL, resolve_model
from pinfer.rl.hf_policy import cache_dir
from pinfer.tools.bench_report import describe_machine
from pinfer.tools.workloads import LATENCY_PROMPT, arithmetic_prompts

# SmolLM2-135M's sizes (and rope / norm / special ids), with heads that TP=2 can split.
TP_MODEL = dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=8,
                head_dim=72, num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=True,
                max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1,
                eos_token_id=2)
# --quick: the same shape of model, tiny (the path is what a smoke run checks, not the speed).
TINY_MODEL = dict(TP_MODEL, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  head_dim=16, num_key_value_heads=2)
TP_CONFIGS = (("TP=1", 1, None), ("TP=1, 1 thread", 1, 1), ("TP=2", 2, None))  # (name, tp, threads)
DP_SIZES = (1, 2)


@dataclass(frozen=True)
class Sizes:
    decode_tokens: int = 64  # batch 1
    batch: int = 16
    batch_tokens: int = 32
    dp_prompts: int = 64
    dp_tokens: int = 64
    warmup_tokens: int = 4  # a warm-up run: the same prompts, this many new tokens
    repeats: int = 2
    tiny_models: bool = False  # TINY_MODEL for TP, and for DP too instead of SmolLM2-135M


FULL = Sizes()
QUICK = Sizes(decode_tokens=8, batch=4, batch_tokens=8, dp_prompts=8, dp_tokens=8, warmup_tokens=2, tiny_models=True)


@dataclass
class Row:
    part: str  # "TP" or "DP"
    config: str  # "TP=2", "DP=1", ...
    dtype: str
    threads: str  # per process, e.g. "2 procs x 1"
    workload: str
    tok_s: float | None = None  # the best run
    runs: list[float] = field(default_factory=list)
    ratio: float | None = None  # tok_s / the 1-process baseline's
    startup_s: float | None = None
    ray_start_s: float | None = None  # DP=2: part of startup_s
    error: str | None = None


# ---- the tensor-parallel checkpoint --------------------------------------------------------


def tp_checkpoint(sizes: dict[str, Any]) -> Path:
    """A random Llama of these sizes with SmolLM2's tokenizer, in bfloat16; built once, then reused."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    key = hashlib.sha256(json.dumps(sizes, sort_keys=True).encode()).hexdigest()[:10]
    out = cache_dir() / f"scale-out-llama-{sizes['num_attention_heads']}h{sizes['num_key_value_heads']}kv-bf16-{key}"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    print(f"building the random TP checkpoint in {out} (once)", flush=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**sizes), dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    open_checkpoint(str(resolve_model(DEFAULT_MODEL))).load_tokenizer().save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- measuring ---------------------------------------------------------------------------


def chat(llm: LLM, text: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def decode_tok_s(llm: LLM, prompt: list[int], max_tokens: int) -> float:
    """Batch 1, greedy: generated tokens after the first / time from the first to the last."""
    out = llm.generate([prompt], greedy(max_tokens), use_tqdm=False)[0]
    m = out.metrics
    return (len(out.outputs[0].token_ids) - 1) / (m.finished_time - m.first_token_time)


def total_tok_s(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    return sum(len(c.token_ids) for o in outputs for c in o.outputs) / wall


def runs_after_warmup(repeats: int, warmup: Callable[[], Any], run: Callable[[], float]) -> list[float]:
    """The tok/s of each run (the caller keeps the best)."""
    warmup()
    return [run() for _ in range(repeats)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def rollout(count: int, max_tokens: int) -> list[SamplingParams]:
    """workloads.py's rollout sampling: temperature 1, the chosen token's logprob, request i seeded i."""
    return [SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, logprobs=0, seed=i)
            for i in range(count)]


def threads_desc(counts: list[int]) -> str:
    if len(set(counts)) == 1:
        return f"{len(counts)} proc{'s' if len(counts) > 1 else ''} x {counts[0]}"
    return " + ".join(map(str, counts))


def measure_tp(path: Path, dtype: str, name: str, tp: int, threads: int | None, sizes: Sizes) -> list[Row]:
    workloads = (f"batch 1, {sizes.decode_tokens} tok (decode)", f"batch {sizes.batch} x {sizes.batch_tokens} tok")
    default_threads = torch.get_num_threads()
    llm = None
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        llm = LLM(str(path), dtype=dtype, tensor_parallel_size=tp, enable_prefix_caching=False)
        startup = time.perf_counter() - start
        group = llm.engine.tp_group  # rank 0 is this process; the workers' threads are in the spec
        used = [torch.get_num_threads()] + ([group.spec.num_threads] * (tp - 1) if group is not None else [])
        one = chat(llm, LATENCY_PROMPT)
        batch = [chat(llm, p) for p in arithmetic_prompts(sizes.batch, seed=0)]
        runs_1 = runs_after_warmup(sizes.repeats, lambda: decode_tok_s(llm, one, sizes.warmup_tokens + 1),
                                   lambda: decode_tok_s(llm, one, sizes.decode_tokens))
        runs_b = runs_after_warmup(sizes.repeats, lambda: total_tok_s(llm, batch, greedy(sizes.warmup_tokens)),
                                   lambda: total_tok_s(llm, batch, greedy(sizes.batch_tokens)))
        return [Row("TP", name, dtype, threads_desc(used), w, max(runs), runs, startup_s=startup)
                for w, runs in zip(workloads, (runs_1, runs_b))]
    except Exception as exc:
        return [Row("TP", name, dtype, "?", w, error=describe_error(exc)) for w in workloads]
    finally:
        if llm is not None:
            llm.engine.close()
        torch.set_num_threads(default_threads)


def measure_dp(model: str, dtype: str, dp: int, sizes: Sizes) -> Row:
    workload = f"rollout {sizes.dp_prompts} x {sizes.dp_tokens} tok"
    llm, ray_start = None, None
    try:
        start = time.perf_counter()
        if dp > 1:  # start Ray here, only to time it apart (LLM would start it the same way)
            from pinfer.distributed.data_parallel import connect_ray

            connect_ray()
            ray_start = time.perf_counter() - start
        llm = LLM(model, dtype=dtype, data_parallel_size=dp, enable_prefix_caching=False)
        startup = time.perf_counter() - start
        used = [r.info.num_threads for r in llm.engine.replicas] if dp > 1 else [torch.get_num_threads()]
        prompts = [chat(llm, p) for p in arithmetic_prompts(sizes.dp_prompts, seed=0)]
        runs = runs_after_warmup(sizes.repeats,
                                 lambda: total_tok_s(llm, prompts, rollout(len(prompts), sizes.warmup_tokens)),
                                 lambda: total_tok_s(llm, prompts, rollout(len(prompts), sizes.dp_tokens)))
        return Row("DP", f"DP={dp}", dtype, threads_desc(used), workload, max(runs), runs, startup_s=startup,
                   ray_start_s=ray_start)
    except Exception as exc:
        return Row("DP", f"DP={dp}", dtype, "?", workload, error=describe_error(exc))
    finally:
        if llm is not None:
            llm.engine.shutdown() if dp > 1 else llm.engine.close()
        if ray_start is not None:
            import ray

            ray.shutdown()


def describe_error(exc: Exception) -> str:
    """One table cell: the first line of the message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".replace("|", "/")


def add_ratios(rows: list[Row]) -> None:
    base = {(r.part, r.dtype, r.workload): r.tok_s for r in rows if r.config in ("TP=1", "DP=1")}
    for r in rows:
        b = base.get((r.part, r.dtype, r.workload))
        if r.tok_s is not None and b:
            r.ratio = r.tok_s / b


# ---- output --------------------------------------------------------------------------------


def format_table(rows: list[Row]) -> str:
    head = ["config", "dtype", "threads / process", "workload", "tok/s (best)", "vs 1 process", "start-up s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r.error:
            cells = [r.config, r.dtype, r.threads, r.workload, f"error: {r.error}", "", ""]
        else:
            startup = f"{r.startup_s:.1f}" + (f" (Ray {r.ray_start_s:.1f})" if r.ray_start_s is not None else "")
            cells = [r.config, r.dtype, r.threads, r.workload, f"{r.tok_s:.1f}",
                     f"{r.ratio:.2f}x" if r.ratio is not None else "", startup]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(machine: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in machine["load_average"] or [])
    return (f"{machine['cpu_model']}, {machine['usable_cpus']} usable CPUs ({machine['physical_cores']} cores), "
            f"{(machine['memory_bytes'] or 0) / 2**30:.0f} GiB, torch {machine['torch']} "
            f"({machine['torch_threads_default']} threads by default), load average {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a tiny random Llama (TP and DP) and a few tokens; numbers mean nothing")
    parser.add_argument("--json", metavar="FILE", help="also write the machine, sizes and rows as JSON")
    parser.add_argument("--dtype", default="float32,bfloat16",
                        help="comma-separated dtypes of the TP runs (default: float32,bfloat16)")
    parser.add_argument("--dp-dtype", default="bfloat16",
                        help="dtype of the DP runs (default: bfloat16, pinfer's default for the GGUF model)")
    parser.add_argument("--only", choices=["tp", "dp"], help="run only one part")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]

    began = time.perf_counter()
    machine = describe_machine()
    print(f"machine: {describe(machine)}", flush=True)
    if machine["load_average"] and machine["load_average"][0] > 0.5:
        print(f"warning: the machine is not idle (1-minute load {machine['load_average'][0]:.2f}); runs that use "
              f"every core (TP=1 on the default threads, TP=2, DP=2) suffer most", flush=True)
    rows: list[Row] = []
    tiny = tp_checkpoint(TINY_MODEL) if sizes.tiny_models else None
    if args.only != "dp":
        path = tiny or tp_checkpoint(TP_MODEL)
        for dtype in dtypes:
            for name, tp, threads in TP_CONFIGS:
                start = time.perf_counter()
                rows += measure_tp(path, dtype, name, tp, threads, sizes)
                gc.collect()  # the closed engine's model and KV pool
                print(f"TP: {name}, {dtype}: {time.perf_counter() - start:.0f} s", flush=True)
    if args.only != "tp":
        for dp in DP_SIZES:
            start = time.perf_counter()
            rows.append(measure_dp(str(tiny or DEFAULT_MODEL), args.dp_dtype, dp, sizes))
            gc.collect()
            print(f"DP: DP={dp}, {args.dp_dtype}: {time.perf_counter() - start:.0f} s", flush=True)
    add_ratios(rows)
    elapsed = time.perf_counter() - began

    print()
    print(f"Machine: {describe(machine)}")
    print(f"Best of {sizes.repeats} runs after a warm-up; prefix caching off; EOS ignored. "
          f"Total time {elapsed:.0f} s.\n")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "quick": args.quick, "sizes": asdict(sizes),
            "tp_model": TINY_MODEL if sizes.tiny_models else TP_MODEL, "tp_checkpoint_dtype": "bfloat16",
            "dp_model": "the tiny random Llama" if sizes.tiny_models else DEFAULT_MODEL, "elapsed_s": elapsed,
            "rows": [asdict(r) for r in rows],
        }, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
