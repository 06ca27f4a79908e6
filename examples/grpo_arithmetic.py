"""GRPO on small arithmetic with pinfer as the rollout engine and transformers as the trainer.

    .venv/bin/python examples/grpo_arithmetic.py            # ~10 steps, a few minutes on 2 CPU cores
    .venv/bin/python examples/grpo_arithmetic.py --steps 2 --json-out log.json

Each step:
  1. sample arithmetic questions (chat template, assistant turn started with "a op b ="); the engine
     draws `group_size` answers per question (temperature 1, raw float32 logprobs come back with them);
  2. reward 1 if the first integer in the answer is right, +0.1 if the answer is a bare number;
     advantage = reward normalised within its group (GRPO: no value network);
  3. the trainer (transformers LlamaForCausalLM, float32, same weights) recomputes the logprobs
     (each group packed into one row: the prompt once, then its completions),
     ratio = exp(new - old) with old = the engine's logprobs, clipped surrogate, one AdamW step;
  4. engine.update_weights(policy.state_dict()): the next rollouts come from the new weights.

The ratio before the gradient step is the parity check between the engine and the trainer:
they hold the same weights, so it must be 1 up to float32 rounding (|ratio - 1| ~ 1e-5).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pinfer import SamplingParams
from pinfer.loading.resolve import DEFAULT_MODEL, resolve_model
from pinfer.rl import Rollout, RolloutEngine
from pinfer.rl.hf_policy import cached_hf_folder

FORMAT_BONUS = 0.1  # added when the completion is a bare number (right or wrong): rewards stopping


@dataclass
class Config:
    steps: int = 10
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 24
    lr: float = 3e-6
    clip: float = 0.2
    max_grad_norm: float = 1.0
    groups_per_forward: int = 8  # prompt groups packed into one trainer forward (bounds activation memory)
    seed: int = 0
    model: str = DEFAULT_MODEL
    hf_dir: str | None = None  # default: converted from the engine's GGUF by transformers, cached
    json_out: str | None = None
    quiet: bool = False


@dataclass
class StepLog:
    step: int
    mean_reward: float
    accuracy: float  # fraction of completions with the right number
    ratio_dev_max: float  # max |exp(new - old) - 1| over completion tokens, before the update
    ratio_dev_mean: float
    loss: float
    rollout_tokens: int
    rollout_seconds: float
    rollout_tok_s: float
    trainer_seconds: float
    update_seconds: float
    weight_version: int  # the engine's version after this step's update


@dataclass
class RunResult:
    config: Config
    logs: list[StepLog] = field(default_factory=list)
    engine: RolloutEngine | None = None
    policy: torch.nn.Module | None = None
    tokenizer: object | None = None


# ---- the task ---------------------------------------------------------------------------


@dataclass
class Problem:
    question: str  # the user message
    answer_prefix: str  # the assistant turn starts with it
    answer: int


def make_problem(rng: random.Random) -> Problem:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a = rng.randint(10, 99)
        b = rng.randint(1, a if op == "-" else 99)  # no negative answers
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    # A 135M model at temperature 1 tends to restate the question before answering;
    # starting its turn with "a op b =" makes the first integer it writes its answer.
    return Problem(f"What is {a} {op} {b}? Answer with just the number.", f"{a} {op} {b} =", answer)


def reward(completion: str, answer: int) -> float:
    """1 if the first integer is the answer, +FORMAT_BONUS if nothing but a number was written."""
    match = re.search(r"-?\d+", completion)
    correct = match is not None and int(match.group()) == answer
    bare = match is not None and completion.strip().rstrip(".") == match.group()
    return float(correct) + (FORMAT_BONUS if bare else 0.0)


def prompt_ids(tokenizer, problem: Problem) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": problem.question}],
                                        add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return list(ids) + tokenizer.encode(problem.answer_prefix, add_special_tokens=False)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[prompts, group] rewards -> advantages normalised within each group (0 when the group agrees)."""
    mean, std = rewards.mean(dim=1, keepdim=True), rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + 1e-4)


# ---- the trainer ------------------------------------------------------------------------


def default_hf_dir(model: str) -> Path:
    """The engine's own folder if it is a transformers checkpoint, else a cached conversion of its GGUF."""
    path = resolve_model(model)
    return path if path.is_dir() else cached_hf_folder(path)


def load_policy(hf_dir: str | Path) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    # eval(): no dropout, so the trainer's forward is the engine's forward (gradients still flow).
    return policy.eval(), AutoTokenizer.from_pretrained(hf_dir)


@dataclass
class Packed:
    """Groups (one prompt, its completions) packed into one row for the trainer's forward."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    mask: torch.Tensor  # [1, 1, T, T] bool, True where a token may attend
    predictors: torch.Tensor  # [N]: the position whose output predicts each completion token
    targets: torch.Tensor  # [N]: the completion tokens
    lengths: list[int]  # tokens per completion, in order


def pack(groups: list[tuple[list[int], list[list[int]]]]) -> Packed:
    """Each prompt once, then its completions; a completion sees its prompt and itself and sits at
    positions right after the prompt. Same math as one forward per sequence, but the prompt
    (most of the tokens) is computed once per group, the way the engine shares its KV blocks."""
    ids: list[int] = []
    positions: list[int] = []
    predictors: list[int] = []
    spans: list[tuple[int, int, int, int]] = []  # (start, end) of a piece, (start, end) of its prompt
    for prompt, completions in groups:
        p0, p1 = len(ids), len(ids) + len(prompt)
        ids += prompt
        positions += range(len(prompt))
        spans.append((p0, p1, p0, p1))
        for c in completions:
            c0 = len(ids)
            ids += c
            positions += range(len(prompt), len(prompt) + len(c))
            spans.append((c0, c0 + len(c), p0, p1))
            predictors += [p1 - 1, *range(c0, c0 + len(c) - 1)]
    allowed = torch.zeros(len(ids), len(ids), dtype=torch.bool)
    for start, end, prompt_start, prompt_end in spans:
        allowed[start:end, prompt_start:prompt_end] = True
        allowed[start:end, start:end] = True
    allowed &= torch.ones_like(allowed).tril()  # causal inside each piece
    completions = [c for _, cs in groups for c in cs]
    return Packed(torch.tensor([ids]), torch.tensor([positions]), allowed[None, None], torch.tensor(predictors),
                  torch.tensor([t for c in completions for t in c]), [len(c) for c in completions])


def completion_logprobs(policy, groups: list[tuple[list[int], list[list[int]]]]) -> list[torch.Tensor]:
    """Teacher-forced float32 log_softmax at each completion token, one tensor per completion (keeps grad).
    The LM head only runs where a completion token is predicted (the vocabulary is 49k wide)."""
    batch = pack(groups)
    hidden = policy.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                          attention_mask=batch.mask).last_hidden_state[0]
    logprobs = torch.log_softmax(policy.lm_head(hidden[batch.predictors]).float(), dim=-1)
    return list(logprobs.gather(1, batch.targets[:, None]).squeeze(1).split(batch.lengths))


def grpo_step(policy, optimizer, cfg: Config, groups: list[list[Rollout]], advantages: torch.Tensor
              ) -> tuple[float, float, float]:
    """One clipped-surrogate step over all rollouts; returns (loss, max and mean |ratio - 1| before it).
    advantages: [prompts, group_size]."""
    total_tokens = sum(len(r.token_ids) for g in groups for r in g)
    devs, loss_sum = [], 0.0
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, len(groups), cfg.groups_per_forward):  # gradient accumulation, one optimizer step
        chunk = groups[start : start + cfg.groups_per_forward]
        rollouts = [r for g in chunk for r in g]
        new = torch.cat(completion_logprobs(policy, [(g[0].prompt_token_ids, [r.token_ids for r in g])
                                                     for g in chunk]))
        old = torch.cat([r.logprobs for r in rollouts])  # the engine's, from sampling
        chunk_adv = advantages[start : start + len(chunk)].flatten()  # one per rollout, same order
        adv = torch.cat([a.expand(len(r.token_ids)) for a, r in zip(chunk_adv, rollouts)])
        ratio = torch.exp(new - old)
        devs.append((ratio.detach() - 1).abs())
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
        loss = -surrogate.sum() / total_tokens  # token-level mean over the whole step
        loss.backward()
        loss_sum += loss.item()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    optimizer.step()
    dev = torch.cat(devs)
    return loss_sum, dev.max().item(), dev.mean().item()


# ---- the loop ---------------------------------------------------------------------------


def train(cfg: Config) -> RunResult:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    engine = RolloutEngine(cfg.model, dtype="float32", seed=cfg.seed)
    hf_dir = cfg.hf_dir or default_hf_dir(cfg.model)
    policy, tokenizer = load_policy(hf_dir)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    sampling = SamplingParams(temperature=1.0, max_tokens=cfg.max_tokens, logprobs=0)  # raw logprobs
    result = RunResult(cfg, engine=engine, policy=policy, tokenizer=tokenizer)
    if not cfg.quiet:
        print(f"trainer weights: {hf_dir}")
        print(f"{'step':>4} {'reward':>6} {'acc':>5} {'|r-1| max':>9} {'mean':>8} {'loss':>7} "
              f"{'tok/s':>6} {'rollout s':>9} {'train s':>7} {'update s':>8}")

    for step in range(cfg.steps):
        problems = [make_problem(rng) for _ in range(cfg.prompts_per_step)]
        prompts = [prompt_ids(tokenizer, p) for p in problems]

        start = time.perf_counter()
        groups = engine.generate(prompts, sampling, n=cfg.group_size)
        rollout_seconds = time.perf_counter() - start

        rewards = torch.tensor([[reward(tokenizer.decode(r.token_ids, skip_special_tokens=True), problem.answer)
                                 for r in group] for group, problem in zip(groups, problems)])
        advantages = group_advantages(rewards)
        rollouts = [r for group in groups for r in group]

        start = time.perf_counter()
        loss, dev_max, dev_mean = grpo_step(policy, optimizer, cfg, groups, advantages)
        trainer_seconds = time.perf_counter() - start

        version = engine.update_weights(policy.state_dict())
        tokens = sum(len(r.token_ids) for r in rollouts)
        log = StepLog(step, rewards.mean().item(), (rewards >= 1).float().mean().item(), dev_max, dev_mean, loss,
                      tokens, rollout_seconds, tokens / rollout_seconds, trainer_seconds,
                      engine.last_update_seconds, version)
        result.logs.append(log)
        if not cfg.quiet:
            print(f"{step:>4} {log.mean_reward:>6.3f} {log.accuracy:>5.2f} {dev_max:>9.2e} {dev_mean:>8.1e} "
                  f"{loss:>7.4f} {log.rollout_tok_s:>6.0f} {rollout_seconds:>9.1f} {trainer_seconds:>7.1f} "
                  f"{log.update_seconds:>8.3f}")

    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps({"config": asdict(cfg), "steps": [asdict(l) for l in result.logs]},
                                                 indent=2))
    return result


def summarize(logs: list[StepLog]) -> str:
    if not logs:
        return "no steps run"
    tokens, seconds = sum(l.rollout_tokens for l in logs), sum(l.rollout_seconds for l in logs)
    k = min(3, len(logs))  # one step's batch is noisy: also compare the first and last k steps
    return "\n".join([
        f"reward: first step {logs[0].mean_reward:.3f} -> last step {logs[-1].mean_reward:.3f} "
        f"(accuracy {logs[0].accuracy:.2f} -> {logs[-1].accuracy:.2f}); mean of the first {k} steps "
        f"{statistics.mean(l.mean_reward for l in logs[:k]):.3f} -> last {k} "
        f"{statistics.mean(l.mean_reward for l in logs[-k:]):.3f}",
        f"engine vs trainer: max |exp(new - old) - 1| over all steps {max(l.ratio_dev_max for l in logs):.2e}, "
        f"mean {statistics.mean(l.ratio_dev_mean for l in logs):.1e}",
        f"update_weights: median {statistics.median(l.update_seconds for l in logs):.3f} s; "
        f"rollout: {tokens / seconds:.0f} tok/s overall; "
        f"trainer step: median {statistics.median(l.trainer_seconds for l in logs):.1f} s",
    ])


def parse_args(argv: list[str] | None = None) -> Config:
    defaults = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--prompts-per-step", type=int, default=defaults.prompts_per_step)
    p.add_argument("--group-size", type=int, default=defaults.group_size)
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--groups-per-forward", type=int, default=defaults.groups_per_forward)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--model", default=defaults.model, help="the engine's model (alias or .gguf)")
    p.add_argument("--hf-dir", default=None, help="transformers folder with the same weights as --model")
    p.add_argument("--json-out", default=None, help="write the per-step log here")
    p.add_argument("--quiet", action="store_true")
    return Config(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> RunResult:
    cfg = parse_args(argv)
    start = time.perf_counter()
    result = train(cfg)
    if not cfg.quiet:
        print(summarize(result.logs))
        print(f"total wall time {time.perf_counter() - start:.0f} s")
    return result


if __name__ == "__main__":
    main()
