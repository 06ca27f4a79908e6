"""The rough speed numbers in the README's "Measured here" table.

    .venv/bin/python examples/quick_speed.py                  # default mode, bfloat16 and float32
    .venv/bin/python examples/quick_speed.py --deterministic  # the same in batch-invariant mode

Load time (first engine in the process, imports included), batch-1 greedy
decode, and 64 prompts x 128 sampled tokens with logprobs, per dtype. One run
on a shared machine is noisy; the side-by-side benchmark with transformers and
llama.cpp is `pinfer bench`'s job (not built yet).
"""

import argparse
import time

from pinfer import LLM, SamplingParams


def measure(dtype: str, deterministic: bool, num_prompts: int, max_tokens: int) -> str:
    start = time.perf_counter()
    llm = LLM("smollm2-135m", dtype=dtype, deterministic=deterministic)
    load = time.perf_counter() - start
    ids = llm.apply_chat_template([{"role": "user", "content": "Write a story about a dragon."}])
    llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)  # warm-up

    start = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
    batch1 = max_tokens / (time.perf_counter() - start)

    prompts = [ids + [i + 100] for i in range(num_prompts)]  # distinct prompts
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, logprobs=0, seed=0)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    batched = num_prompts * max_tokens / (time.perf_counter() - start)
    mode = "deterministic" if deterministic else "default"
    return (f"{dtype} {mode}: load {load:.1f} s | batch 1 greedy {batch1:.1f} tok/s | "
            f"{num_prompts} x {max_tokens} sampled {batched:.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float32"],
                        help="repeatable (default: both)")
    parser.add_argument("--deterministic", action="store_true", help="batch-invariant mode")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    for dtype in args.dtype or ["bfloat16", "float32"]:
        print(measure(dtype, args.deterministic, args.num_prompts, args.max_tokens), flush=True)


if __name__ == "__main__":
    main()
