"""The int8 KV cache against the model dtype's, the figures the README quotes.

    .venv/bin/python examples/kv_cache_study.py [--rollouts 3]

1. Accuracy: teacher-forced logprobs of a fixed text (tests/model/test_int8_kv_cache.py's,
   first 160 tokens), SmolLM2 with bf16 weights and a bf16 or int8 cache, through the prefill
   path and through decode steps (a token budget of 1), against the float32 engine's: mean
   |difference| and perplexity.
2. Speed: the bench's rollout workload (64 prompts x 128 tokens, temperature 1, logprobs) on
   int8 weights with either cache, two engines in one process, runs alternated so that both
   see the same host.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))

from pinfer import LLM, SamplingParams  # noqa: E402
from pinfer.loading.resolve import DEFAULT_MODEL  # noqa: E402
from pinfer.tools.workloads import make_workload  # noqa: E402
from test_int8_kv_cache import SCORING_TEXT, teacher_forced_logprobs  # noqa: E402


def accuracy() -> None:
    runs = {"float32 engine": dict(dtype="float32")}
    for cache in ("auto", "int8"):
        runs[f"bf16, {cache} cache, prefill"] = dict(dtype="bfloat16", kv_cache_dtype=cache)
        runs[f"bf16, {cache} cache, decode steps"] = dict(dtype="bfloat16", kv_cache_dtype=cache,
                                                          max_num_batched_tokens=1)
    logprobs = {}
    for name, settings in runs.items():
        llm = LLM(DEFAULT_MODEL, kv_cache_memory="32MiB", **settings)
        logprobs[name] = teacher_forced_logprobs(llm, llm.engine.tokenizer.encode(SCORING_TEXT)[:160])
        del llm
    reference = logprobs["float32 engine"]
    print("| run | perplexity | mean abs logprob difference vs float32 |\n|---|---|---|")
    for name, lp in logprobs.items():
        diff = sum(abs(a - b) for a, b in zip(lp, reference)) / len(reference)
        print(f"| {name} | {math.exp(-sum(lp) / len(lp)):.3f} | {diff:.4f} |")


def rollout_speed(rollouts: int) -> None:
    llms = {cache: LLM(DEFAULT_MODEL, quantization="int8", kv_cache_dtype=cache) for cache in ("auto", "int8")}
    conversations = make_workload("rollout", num_prompts=64).conversations
    prompts = [llms["auto"].apply_chat_template(list(c)) for c in conversations]

    def params(tokens: int) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, logprobs=0, ignore_eos=True)
                for i in range(len(prompts))]

    for llm in llms.values():  # warm-up
        llm.generate(prompts, params(16), use_tqdm=False)
    rates = {cache: [] for cache in llms}
    for _ in range(rollouts):
        for cache, llm in llms.items():
            llm.engine.block_manager.reset_prefix_cache()
            start = time.perf_counter()
            llm.generate(prompts, params(128), use_tqdm=False)
            rates[cache].append(len(prompts) * 128 / (time.perf_counter() - start))
    for cache, r in rates.items():
        print(f"rollout, int8 weights, {cache} cache: " + " ".join(f"{x:.0f}" for x in r) + " tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=3, help="alternated rollout runs per cache (default: 3)")
    args = parser.parse_args()
    accuracy()
    rollout_speed(args.rollouts)


if __name__ == "__main__":
    main()
