"""The offline API, shaped like vLLM's:

    llm = LLM(model="smollm2-135m")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outputs[0].outputs[0].text
"""

from __future__ import annotations

from typing import Any, Sequence as Seq

from tqdm.auto import tqdm

from pinfer.config import EngineConfig
from pinfer.distributed.data_parallel import DataParallelEngine
from pinfer.engine.llm_engine import LLMEngine
from pinfer.errors import InvalidRequestError
from pinfer.loading.resolve import DEFAULT_MODEL
from pinfer.outputs import RequestOutput
from pinfer.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_options: Any):
        """engine_options: any EngineConfig field (dtype, device, kv_cache_memory, max_num_seqs, ...).

        data_parallel_size=N > 1: N engine replicas as Ray actors (distributed/data_parallel.py)."""
        config = EngineConfig(model=model, **engine_options)
        self.engine: LLMEngine | DataParallelEngine = (
            DataParallelEngine(config) if config.data_parallel_size > 1 else LLMEngine(config))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs come back in input order."""
        if self.engine.paused:
            raise InvalidRequestError("the engine is paused; call llm.engine.resume() first")
        prompts = _as_prompt_list(prompts)
        params = _broadcast_params(sampling_params, len(prompts))
        # Validate everything before queuing anything: a bad prompt fails the call, not half of it.
        for prompt, p in zip(prompts, params):
            p.validate()
            _, ids = self.engine.tokenize(prompt)
            self.engine.check_request(ids, p)
        if isinstance(self.engine, DataParallelEngine):  # a whole share per replica: no per-step round trips
            return self.engine.generate(prompts, params, use_tqdm)
        request_ids = [self.engine.add_request(prompt, p, final_only=True) for prompt, p in zip(prompts, params)]
        return run_to_completion(self.engine, request_ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt, chat_template) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, chat_template: str | None = None
    ) -> list[int]:
        return self.engine.apply_chat_template(messages, add_generation_prompt, chat_template)


def run_to_completion(engine: LLMEngine, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
    """Step the engine until the given (queued) requests finish; their outputs in the given order.

    Also the loop of each data-parallel replica."""
    finished: dict[str, RequestOutput] = {}
    bar = tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm)
    generated_before = engine.num_generated_tokens
    try:
        while len(finished) < len(request_ids):
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    bar.update(1)
            if use_tqdm:
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix(tok_s=f"{(engine.num_generated_tokens - generated_before) / elapsed:.1f}")
    except BaseException:
        for request_id in request_ids:  # never leave half-run requests holding KV blocks
            if request_id not in finished:
                engine.abort_request(request_id)
        raise
    finally:
        bar.close()
    return [finished[r] for r in request_ids]


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InvalidRequestError("no prompts given")
    if all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    return [p if isinstance(p, str) else list(p) for p in prompts]


def _broadcast_params(params: SamplingParams | Seq[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {count} prompts")
    return params
