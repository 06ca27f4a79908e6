"""The benchmark's workloads: what is asked of an engine, independent of any engine.

- latency: one chat prompt (~60 tokens with the chat template), 128 new tokens,
  greedy. Measures decode tok/s, time to first token, time per output token.
- rollout: 64 chat prompts (arithmetic word problems, ~50-70 tokens with the
  template, the same list for the same seed on every run and machine), 128 new
  tokens each, temperature 1.0, per-token logprobs returned. Measures total
  generated tok/s.

EOS is ignored in both, so every run generates exactly prompts x max_tokens tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

Message = dict[str, str]

LATENCY_PROMPT = (
    "Explain in a short paragraph how a paged key-value cache lets an inference engine serve "
    "many chat requests at once without running out of memory."
)


@dataclass(frozen=True)
class Workload:
    name: str
    conversations: tuple[tuple[Message, ...], ...]  # one chat per request; the runner applies its template
    max_tokens: int
    temperature: float  # 0 = greedy
    logprobs: bool  # return the chosen token's logprob at every step
    ignore_eos: bool
    seed: int  # request i samples with seed + i
    # The headline tok/s: "decode" = (tokens - 1) / (last token - first token) of each
    # request (batch 1), "total" = all generated tokens / wall time of the batch.
    metric: Literal["decode", "total"]

    @property
    def num_prompts(self) -> int:
        return len(self.conversations)

    def with_max_tokens(self, max_tokens: int) -> "Workload":
        return replace(self, max_tokens=max_tokens)


WORKLOAD_NAMES = ("latency", "rollout")


def make_workload(name: str, max_tokens: int | None = None, num_prompts: int = 64, seed: int = 0) -> Workload:
    """A workload by name; max_tokens None keeps its default (128)."""
    if name == "latency":
        return Workload("latency", (({"role": "user", "content": LATENCY_PROMPT},),),
                        max_tokens or 128, temperature=0.0, logprobs=False, ignore_eos=True, seed=seed,
                        metric="decode")
    if name == "rollout":
        conversations = tuple(({"role": "user", "content": p},) for p in arithmetic_prompts(num_prompts, seed))
        return Workload("rollout", conversations, max_tokens or 128, temperature=1.0, logprobs=True,
                        ignore_eos=True, seed=seed, metric="total")
    raise ValueError(f"unknown workload {name!r}; choose from: {', '.join(WORKLOAD_NAMES)}")


NAMES = ("Maria", "Tom", "Aisha", "Kenji", "Lucia", "Omar", "Priya", "Sven", "Chen", "Amara", "Diego", "Noor")
_TEMPLATES = (
    "{a} has {x} apples, buys {y} bags of {z} apples and gives {w} to {b}. How many apples does {a} "
    "have now?",
    "A bakery bakes {x} loaves each morning. It sells {y} before noon and {z} after. How many loaves "
    "are left?",
    "{a} reads {x} pages a day for {y} days. The book has {z} hundred pages. How many pages are left?",
    "A train leaves with {x} passengers. {y} get off at the first stop and {z} get on. How many are "
    "on it now?",
    "{a} and {b} share {x} marbles, and {a} gets {y} more than {b}. How many marbles does each get?",
    "Pencils cost {y} cents and notebooks {z} cents. {a} buys {x} pencils and {w} notebooks. What "
    "does {a} pay?",
)


def arithmetic_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` varied arithmetic word problems, a pure function of (count, seed)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        a, b = rng.sample(NAMES, 2)
        template = rng.choice(_TEMPLATES)
        prompts.append(template.format(a=a, b=b, x=rng.randint(20, 400), y=rng.randint(2, 19),
                                       z=rng.randint(2, 19), w=rng.randint(2, 19)))
    return prompts
