"""One sequence = one sample of one request, with its tokens, KV blocks and progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pinfer.outputs import TokenLogprobs
from pinfer.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    sample_index: int  # 0..n-1 within its request
    prompt_len: int
    token_ids: list[int]  # prompt followed by generated tokens
    params: SamplingParams
    seed: int  # per-sequence sampling seed: draws depend only on (seed, output index)
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16  # resolved: never None here
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache on admission
    block_table: list[int] = field(default_factory=list)
    # Leading block-table entries already returned to the pool (out of a sliding window; stale ids).
    num_released_blocks: int = 0
    num_preemptions: int = 0
    # outputs
    text: str = ""
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def num_blocks_needed(self, num_tokens: int, block_size: int) -> int:
        return (num_tokens + block_size - 1) // block_size
