"""Per-request generation settings, in the shape vLLM users know.

Logprob definitions (see `logprobs_mode`):
  raw:       log_softmax(logits) in float32 of the model's final logits, before
             temperature, top-k, top-p, min-p or any token ban. This is what a
             trainer computes from the same weights at temperature 1.
  processed: log_softmax in float32 of the distribution actually sampled from:
             logits / temperature, with tokens removed by top-k / top-p / min-p
             (and banned tokens such as EOS under min_tokens) set to -inf.
             With temperature 0 (greedy) no temperature is applied.
PPO/GRPO importance ratios that assume the sampling distribution should use
`processed`; ratios against a temperature-1 trainer use `raw`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pinfer.errors import InvalidRequestError

LogprobsMode = Literal["raw", "processed"]


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_k: int = -1  # -1 (or 0) disables
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI: subtract this from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract this times each token's count in the output
    repetition_penalty: float = 1.0  # HF/vLLM: divide positive (multiply negative) logits of prompt+output tokens
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # k alternatives besides the chosen token; 0 = chosen only
    prompt_logprobs: int | None = None
    logprobs_mode: LogprobsMode = "raw"
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError (a ValueError) naming the first bad field."""
        if not isinstance(self.n, int) or self.n < 1:
            raise InvalidRequestError(f"n must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise InvalidRequestError(f"max_tokens must be an integer >= 1 (or None), got {self.max_tokens!r}")
        if self.min_tokens < 0:
            raise InvalidRequestError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidRequestError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidRequestError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and self.logprobs < 0:
            raise InvalidRequestError(f"logprobs must be >= 0 (or None), got {self.logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise InvalidRequestError(f"prompt_logprobs must be >= 0 (or None), got {self.prompt_logprobs}")
        if self.logprobs_mode not in ("raw", "processed"):
            raise InvalidRequestError(f"logprobs_mode must be 'raw' or 'processed', got {self.logprobs_mode!r}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        if self.seed is not None and not isinstance(self.seed, int):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
