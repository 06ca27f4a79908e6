"""On the CPU the KV pool is resident only where blocks have been used: a fresh process
with a 2 GiB pool stays far below 2 GiB of RSS after generating."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from pinfer import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="bfloat16", kv_cache_memory="2GiB")
llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
runner = llm.engine.runner
status = open("/proc/self/status").read()
print(int(status.split("VmRSS:")[1].split()[0]) * 1024, runner.blocks_zeroed, runner.num_blocks)
"""


def test_a_fresh_pool_costs_only_the_blocks_used(smollm2_gguf):
    # A fresh process: in this one, freed memory of earlier tests could back the pool's pages.
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(smollm2_gguf)], capture_output=True, text=True,
                         check=True, timeout=300)
    rss, zeroed, num_blocks = map(int, out.stdout.split()[-3:])
    assert 0 < zeroed < 10 < num_blocks  # a short prompt: a few blocks of thousands
    assert rss < 1.5 * 2**30, rss  # weights, torch and the used blocks, not the 2 GiB pool
