"""The benchmark's workloads: what is asked of an engine, independent of any engine.

- latency: one chat prompt (~60 tokens with the chat template), 128 new tokens,
  greedy. Measures decode tok/s, time to first token, time per output token.
- rollout: 64 chat prompts (arithmetic word problems, ~50-70 tokens with the
  template, the same list for the same seed on every run and machine), 128 new
  tokens each, temperature 1.0, per-token logprobs returned. Measures total
  generated tok/s.
- serve: the rollout prompts sent to a running OpenAI-compatible server by 16
  concurrent streaming clients (closed loop: a client sends its next prompt when
  its previous one finishes), 128 new tokens each, temperature 1.0, a seed per
  request. Measures total generated tok/s and TTFT / TPOT percentiles.
- long_prompt: one ~1,000-token chat prompt (a survey log built from fixed
  sentence templates, the same text on every run), 16 new tokens, greedy.
  Measures time to first token, i.e. the prefill of a long prompt.

EOS is ignored in all of them, so every run generates exactly prompts x max_tokens tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

from pinfer.sampling_params import SamplingParams

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
    # The headline number: "decode" = (tokens - 1) / (last token - first token) of each
    # request (batch 1), "total" = all generated tokens / wall time of the batch,
    # "ttft" = mean time to first token in seconds (lower is better).
    metric: Literal["decode", "total", "ttft"]
    # None: every request is handed to the engine at once (offline). N: N streaming clients
    # against a server, each sending its next request when the previous one finished.
    concurrency: int | None = None

    @property
    def num_prompts(self) -> int:
        return len(self.conversations)

    def with_max_tokens(self, max_tokens: int) -> "Workload":
        return replace(self, max_tokens=max_tokens)

    def sampling_params(self, max_tokens: int | None = None) -> list[SamplingParams]:
        """pinfer's SamplingParams for each request (max_tokens: the workload's unless given)."""
        return [SamplingParams(max_tokens=max_tokens or self.max_tokens, temperature=self.temperature,
                               ignore_eos=self.ignore_eos, seed=self.seed + i, logprobs=0 if self.logprobs else None)
                for i in range(self.num_prompts)]


WORKLOAD_NAMES = ("latency", "rollout", "serve", "long_prompt")


def make_workload(name: str, max_tokens: int | None = None, num_prompts: int = 64, seed: int = 0,
                  concurrency: int = 16) -> Workload:
    """A workload by name; max_tokens None keeps its default (128; long_prompt: 16).
    num_prompts is for rollout and serve, concurrency for serve only."""
    if name == "latency":
        return Workload("latency", (({"role": "user", "content": LATENCY_PROMPT},),),
                        max_tokens or 128, temperature=0.0, logprobs=False, ignore_eos=True, seed=seed,
                        metric="decode")
    if name == "rollout":
        return Workload("rollout", _user_turns(arithmetic_prompts(num_prompts, seed)), max_tokens or 128,
                        temperature=1.0, logprobs=True, ignore_eos=True, seed=seed, metric="total")
    if name == "serve":
        return Workload("serve", _user_turns(arithmetic_prompts(num_prompts, seed)), max_tokens or 128,
                        temperature=1.0, logprobs=False, ignore_eos=True, seed=seed, metric="total",
                        concurrency=concurrency)
    if name == "long_prompt":
        return Workload("long_prompt", _user_turns([long_prompt()]), max_tokens or 16, temperature=0.0,
                        logprobs=False, ignore_eos=True, seed=seed, metric="ttft")
    raise ValueError(f"unknown workload {name!r}; choose from: {', '.join(WORKLOAD_NAMES)}")


def _user_turns(prompts: list[str]) -> tuple[tuple[Message, ...], ...]:
    return tuple(({"role": "user", "content": p},) for p in prompts)


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


_PLACES = ("North Ridge", "Willow Creek", "Stone Harbour", "Elm Hollow", "Cedar Point", "Red Mill")
_WINDS = ("north", "north-east", "east", "south", "south-west", "west")
_NOTES = (
    "On day {d} the {p} station logged {x} millimetres of rain, a high of {t} degrees and a wind from the {w}.",
    "{a} checked the gauges at {p} on day {d}, replaced a cracked sensor and counted {x} walkers on the trail.",
    "The ferry at {p} made {y} crossings on day {d}; {a} counted {x} passengers and {z} bicycles on board.",
    "A delivery of {x} seedlings reached {p} on day {d}, and {a} planted {y} rows of them before dusk.",
    "On day {d} {a} and {b} mended {x} metres of fence near {p} and found {z} nests in the hedge beside it.",
    "The school at {p} took {y} classes to the river on day {d}, where {a} showed them {z} kinds of fish.",
)
# 29 daily notes: 1,002 tokens with SmolLM2's chat template (~33 a line; other English
# tokenizers land within a few percent). Real text, not random ids, so it tokenizes alike
# everywhere and no engine sees an out-of-distribution prompt.
LONG_PROMPT_DAYS = 29


def long_prompt(days: int = LONG_PROMPT_DAYS) -> str:
    """A long document plus a question about it: the same text every time (a fixed seed)."""
    rng = random.Random(0)
    notes = []
    for day in range(1, days + 1):
        a, b = rng.sample(NAMES, 2)
        notes.append(rng.choice(_NOTES).format(
            d=day, p=rng.choice(_PLACES), w=rng.choice(_WINDS), a=a, b=b, x=rng.randint(20, 400),
            y=rng.randint(2, 19), z=rng.randint(2, 19), t=rng.randint(8, 31)))
    return ("These are the field notes of a river valley survey, one line per day:\n\n" + "\n".join(notes)
            + "\n\nWhich station logged the most rain, on which day, and who worked near it that week? "
              "Answer in two sentences.")
