"""The rough speed numbers in the README's "Measured here" table.

    .venv/bin/python examples/quick_speed.py

Load time (first engine in the process, imports included), batch-1 greedy
decode, and 64 prompts x 128 sampled tokens with logprobs, for bfloat16 and
float32. One run on a shared machine is noisy; the side-by-side benchmark with
transformers and llama.cpp is `pinfer bench`'s job (not built yet).
"""

import time

from pinfer import LLM, SamplingParams


def main() -> None:
    for dtype in ("bfloat16", "float32"):
        start = time.perf_counter()
        llm = LLM("smollm2-135m", dtype=dtype)
        load = time.perf_counter() - start
        ids = llm.apply_chat_template([{"role": "user", "content": "Write a story about a dragon."}])
        llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)  # warm-up

        start = time.perf_counter()
        llm.generate([ids], SamplingParams(max_tokens=128, temperature=0, ignore_eos=True), use_tqdm=False)
        batch1 = 128 / (time.perf_counter() - start)

        prompts = [ids + [i + 100] for i in range(64)]  # 64 distinct prompts
        params = SamplingParams(max_tokens=128, temperature=1.0, ignore_eos=True, logprobs=0, seed=0)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        batch64 = 64 * 128 / (time.perf_counter() - start)
        print(f"{dtype}: load {load:.1f} s | batch 1 greedy {batch1:.1f} tok/s | 64 x 128 sampled {batch64:.1f} tok/s")
        del llm


if __name__ == "__main__":
    main()
