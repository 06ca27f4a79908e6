"""Rollout tok/s of one configuration in a fresh process: for A/B runs of two checkouts.

    .venv/bin/python examples/rollout_tok_s.py [-q int8] [--latency]
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python examples/rollout_tok_s.py -q int8

The bench's rollout workload (64 prompts x 128 tokens, temperature 1, logprobs, EOS ignored)
or, with --latency, its batch-1 greedy prompt (128 tokens: decode tok/s after the first
token), after a warm-up, twice. Alternate the two checkouts' runs so that both see the same host.
"""

from __future__ import annotations

import argparse
import time

from pinfer import LLM
from pinfer.loading.resolve import DEFAULT_MODEL
from pinfer.tools.workloads import make_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", "-q", default=None, choices=["int8", "int4"])
    parser.add_argument("--latency", action="store_true", help="batch-1 decode instead of the rollout")
    args = parser.parse_args()
    llm = LLM(DEFAULT_MODEL, quantization=args.quantization)
    workload = make_workload("latency" if args.latency else "rollout")
    prompts = [llm.apply_chat_template(list(c)) for c in workload.conversations]

    llm.generate(prompts, workload.sampling_params(32), use_tqdm=False)  # warm-up
    rates = []
    for _ in range(2):
        llm.engine.block_manager.reset_prefix_cache()
        start = time.perf_counter()
        out = llm.generate(prompts, workload.sampling_params(), use_tqdm=False)
        seconds = time.perf_counter() - start
        if args.latency:  # decode tok/s: the tokens after the first, over the time after it
            metrics = out[0].metrics
            rates.append(127 / (metrics.finished_time - metrics.first_token_time))
        else:
            rates.append(len(prompts) * 128 / seconds)
    name = "batch-1 decode" if args.latency else "rollout"
    print(f"{name}, {args.quantization or 'unquantized'}: " + " ".join(f"{r:.0f}" for r in rates) + " tok/s")


if __name__ == "__main__":
    main()
