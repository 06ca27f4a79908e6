"""Where an engine step's time goes: cProfile over one benchmark workload, top functions by
own time (aten/oneDNN ops and pinfer's kernels show up as the builtins that call them).

    .venv/bin/python examples/profile_step.py rollout            # 64 prompts x 128 tokens, sampled, logprobs
    .venv/bin/python examples/profile_step.py latency            # batch 1, greedy
    .venv/bin/python examples/profile_step.py rollout --quantization int8

The workloads are `pinfer bench`'s (tools/workloads.py); a warm-up run first, then the
profiled one. Divide a row's time by the steps printed to get ms per step.
"""

import argparse
import cProfile
import pstats
import time

from pinfer import LLM, SamplingParams
from pinfer.tools.workloads import make_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["rollout", "latency", "long_prompt"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumtime"], help="own time, or with callees")
    args = parser.parse_args()

    llm = LLM(dtype=args.dtype, quantization=args.quantization)
    workload = make_workload(args.workload)
    prompts = [llm.apply_chat_template(list(c)) for c in workload.conversations]
    params = [SamplingParams(max_tokens=workload.max_tokens, temperature=workload.temperature,
                             ignore_eos=workload.ignore_eos, seed=workload.seed + i,
                             logprobs=0 if workload.logprobs else None) for i in range(len(prompts))]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    llm.engine.block_manager.reset_prefix_cache()
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    profile.disable()
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = workload.max_tokens + 1  # one prefill step, then one step per further token (all batched together)
    print(f"{args.workload}: {tokens} tokens in {seconds:.2f} s under cProfile ({tokens / seconds:.0f} tok/s), "
          f"~{steps} steps, {seconds / steps * 1e3:.1f} ms a step")
    pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
