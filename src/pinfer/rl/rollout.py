"""RolloutEngine: what a PPO/GRPO loop asks of an inference engine.

    engine = RolloutEngine("smollm2-135m", dtype="float32")
    groups = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_tokens=64), n=8)
    old_logprobs = groups[0][0].logprobs                 # float32 tensor, one per completion token
    ref_logprobs = engine.score(prompt_ids, completions)  # teacher-forced, same paged engine
    engine.update_weights(policy.state_dict())           # in place, bumps weight_version

Logprobs are the engine's `raw` mode unless the SamplingParams ask for
`processed` (see sampling_params.py for both definitions).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from pinfer.entrypoints.llm import LLM
from pinfer.errors import InvalidRequestError
from pinfer.loading.resolve import DEFAULT_MODEL
from pinfer.sampling_params import SamplingParams


@dataclass
class Rollout:
    prompt_token_ids: list[int]
    token_ids: list[int]  # the completion
    logprobs: torch.Tensor  # float32 [len(token_ids)], logprob of each completion token
    finish_reason: str | None
    weight_version: int  # the weights that produced it


def _as_id_lists(ids: list[list[int]] | torch.Tensor, what: str) -> list[list[int]]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2:
            raise InvalidRequestError(f"{what} as a tensor must be 2-D [batch, length], got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [list(x) for x in ids]


class RolloutEngine:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_options: Any):
        self.llm = LLM(model, **engine_options)
        self.engine = self.llm.engine
        self.last_update_seconds: float | None = None

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def generate(
        self, prompt_token_ids: list[list[int]] | torch.Tensor, sampling: SamplingParams, n: int | None = None
    ) -> list[list[Rollout]]:
        """Sample completions: result[i][j] is sample j of prompt i. The n samples of a prompt share its KV blocks."""
        prompts = _as_id_lists(prompt_token_ids, "prompt_token_ids")
        params = dataclasses.replace(sampling, n=n if n is not None else sampling.n,
                                     logprobs=sampling.logprobs if sampling.logprobs is not None else 0)
        version = self.weight_version
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[Rollout(out.prompt_token_ids, c.token_ids, torch.tensor(c.token_logprobs, dtype=torch.float32),
                         c.finish_reason, version) for c in out.outputs] for out in outputs]

    def score(
        self, prompt_ids: list[list[int]] | torch.Tensor, completion_ids: list[list[int]] | torch.Tensor
    ) -> list[torch.Tensor]:
        """Teacher-forced raw logprobs of each completion given its prompt (float32, one per completion token)."""
        prompts = _as_id_lists(prompt_ids, "prompt_ids")
        completions = _as_id_lists(completion_ids, "completion_ids")
        if len(prompts) != len(completions):
            raise InvalidRequestError(f"got {len(prompts)} prompts and {len(completions)} completions")
        if any(not c for c in completions):
            raise InvalidRequestError("every completion needs at least one token to score")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate([p + c for p, c in zip(prompts, completions)], params, use_tqdm=False)
        scores = []
        for prompt, completion, out in zip(prompts, completions, outputs):
            entries = out.prompt_logprobs[len(prompt):]
            scores.append(torch.tensor([e[t].logprob for e, t in zip(entries, completion)], dtype=torch.float32))
        return scores

    def update_weights(
        self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        reset_prefix_cache: bool = True,
    ) -> int:
        """Load new weights in place (HF names, e.g. a transformers model's state_dict()); returns the new version."""
        start = time.perf_counter()
        self.engine.update_weights(named_tensors, reset_prefix_cache=reset_prefix_cache)
        self.last_update_seconds = time.perf_counter() - start
        return self.weight_version

    def pause(self) -> None:
        self.engine.pause()

    def resume(self) -> None:
        self.engine.resume()

    def abort(self, request_ids: list[str]):
        """Abort requests; returns their partial outputs (None for unknown ids)."""
        return [self.engine.abort_request(r) for r in request_ids]

    def sleep(self, level: int = 1) -> None:
        """Free the KV pool (level 1) and the weights too (level 2) while the trainer runs."""
        self.engine.sleep(level)

    def wake_up(self, reload_weights: bool = True) -> None:
        """reload_weights=False after sleep(level=2): the next update_weights() must bring every tensor."""
        self.engine.wake_up(reload_weights)
