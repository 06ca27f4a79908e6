"""The OpenAI wire format: request bodies (pydantic), their SamplingParams, and
the JSON pieces of responses (logprobs, usage, errors).

Requests accept OpenAI's fields plus vLLM's extensions (top_k, min_p,
min_tokens, ignore_eos, stop_token_ids, repetition_penalty, return_token_ids,
...). Unknown fields are ignored, as vLLM does; a known field of the wrong
type is a 400 naming it.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pinfer.errors import InvalidRequestError
from pinfer.outputs import CompletionOutput, TokenLogprobs
from pinfer.sampling_params import SamplingParams

MAX_LOGPROBS = 20  # top alternatives per token a request may ask for (vLLM's default max_logprobs)
MAX_N = 128  # samples per request (OpenAI's limit for chat)


# ---- errors ----------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(exc: InvalidRequestError, aliases: dict[str, str] | None = None) -> OpenAIError:
    """400 for an engine/SamplingParams validation error; `param` is the field its message starts with."""
    message = str(exc)
    match = re.match(r"[a-z_]+", message)
    param = match.group(0) if match and match.group(0) in _PARAM_NAMES else None
    if message.startswith("stop strings"):
        param = "stop"
    if param and aliases:
        param = aliases.get(param, param)
    code = "context_length_exceeded" if "context length" in message else None
    return OpenAIError(400, message, param=param, code=code)


# ---- requests --------------------------------------------------------------------------


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as vLLM does


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class _SamplingRequest(OpenAIBaseModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = False  # each choice carries prompt_token_ids and token_ids
    # pinfer: which distribution logprobs come from, "raw" (default) or "processed" (see SamplingParams)
    logprobs_mode: Literal["raw", "processed"] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise OpenAIError(400, f"n must be an integer in [1, {MAX_N}], got {self.n}", param="n")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises InvalidRequestError naming the first bad field."""
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logprobs_mode=self.logprobs_mode or "raw",
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions; null: up to the context length
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(400, "best_of other than n is not supported", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise OpenAIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise OpenAIError(400, "prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)

    def to_sampling_params(self) -> SamplingParams:
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self.sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None  # default: up to the context length
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise OpenAIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise OpenAIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                  param="top_logprobs")
        if self.tools:
            raise OpenAIError(400, "tools (function calling) are not supported", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise OpenAIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        if not self.messages:
            raise OpenAIError(400, "messages must be a non-empty list", param="messages")

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None and self.max_tokens is not None \
            else "max_completion_tokens"

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs)

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template wants them: content flattened to text."""
        messages = []
        for i, m in enumerate(self.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise OpenAIError(400, f"messages[{i}]: only text content parts are supported",
                                          param="messages")
                    texts.append(part["text"])
                content = "".join(texts)
            message = {"role": m.role, "content": content or ""}
            if m.name is not None:
                message["name"] = m.name
            messages.append(message)
        return messages


# ---- RL control requests ------------------------------------------------------------------


class _ControlRequest(BaseModel):
    # unlike the OpenAI bodies, a misspelt field is an error: silently ignoring "abort_inflight" would not abort
    model_config = ConfigDict(extra="forbid")


class UpdateWeightsRequest(_ControlRequest):
    path: str  # a .safetensors file or a folder of them, Hugging Face tensor names, readable by the server
    reset_prefix_cache: bool = True


class PauseRequest(_ControlRequest):
    abort_in_flight: bool = False


class SleepRequest(_ControlRequest):
    level: int = 1  # 1: free the KV cache; 2: also the weights


class WakeUpRequest(_ControlRequest):
    reload_weights: bool = True  # after level 2: re-read the checkpoint (false: /update_weights will push them)


# SamplingParams fields and request fields an InvalidRequestError message may start with
_PARAM_NAMES = set(SamplingParams.__dataclass_fields__) | {"prompt", "messages", "stop_token_ids"}


# ---- responses ----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finite(logprob: float) -> float:
    """JSON has no -inf: report a banned token's logprob as -9999.0, as vLLM does."""
    return logprob if math.isfinite(logprob) else -9999.0


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprobs | None], text_offset: int,
                        decode_token) -> dict[str, list]:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    `entries[i]` holds token_ids[i] and its top alternatives; None (the first prompt token) has no logprob.
    top_logprobs maps each alternative's text to its logprob (the chosen token included, as vLLM does).
    """
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(token_ids, entries):
        if entry is None:
            text, logprob, top = decode_token(token), None, None
        else:
            chosen = entry[token]
            text, logprob = chosen.decoded_token or "", finite(chosen.logprob)
            top = {lp.decoded_token or "": finite(lp.logprob) for lp in entry.values()}
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprobs], top_k: int) -> list[dict[str, Any]]:
    """OpenAI chat logprobs content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    content = []
    for token, entry in zip(token_ids, entries):
        chosen = entry[token]
        top = sorted((lp for lp in entry.values() if lp.rank <= top_k), key=lambda lp: lp.rank)[:top_k]
        content.append({**_chat_token(chosen.decoded_token, chosen.logprob),
                        "top_logprobs": [_chat_token(lp.decoded_token, lp.logprob) for lp in top]})
    return content


def _chat_token(text: str | None, logprob: float) -> dict[str, Any]:
    text = text or ""
    return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}


def stop_fields(completion: CompletionOutput) -> dict[str, Any]:
    return {"finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
