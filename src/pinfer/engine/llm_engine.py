"""The engine: requests in, one `step()` at a time, outputs out.

    add_request() -> validate, tokenize, make n sequences, queue them
    step()        -> schedule, run the model on the batch, append tokens, check stops
"""

from __future__ import annotations

import itertools
import os
import random
import time
from dataclasses import dataclass, field

import torch

from pinfer.config import EngineConfig, ModelConfig, parse_dtype, parse_memory_size
from pinfer.distributed.parallel_layers import check_tensor_parallel, shard_model
from pinfer.distributed.tensor_parallel import TensorParallelError, TensorParallelGroup
from pinfer.engine.block_manager import BlockManager
from pinfer.engine.detokenizer import IncrementalDetokenizer
from pinfer.engine.model_runner import ModelRunner, StepResult, kv_bytes_per_block
from pinfer.engine.scheduler import Scheduler
from pinfer.engine.sequence import Sequence
from pinfer.errors import InvalidRequestError, PinferError
from pinfer.loading.loader import default_dtype, load_model, open_checkpoint, reload_model_weights
from pinfer.model.packed_linear import can_pack, dense_weights, pack_linears
from pinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, TokenLogprobs
from pinfer.sampling_params import SamplingParams
from pinfer.tools.trace import NULL_TRACER, LayerSpans, make_tracer


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks held by live sequences
    prefix_cache_hit_rate: float  # prompt tokens served from the prefix cache / prompt tokens looked up
    num_prompt_tokens: int  # cumulative
    num_generated_tokens: int  # cumulative
    num_preemptions: int  # cumulative
    num_free_blocks: int
    num_blocks: int


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)
    error: str | None = None
    final_only: bool = False  # step() returns its output once, when it finishes

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        checkpoint = open_checkpoint(config.model)
        self.model_config = ModelConfig.from_hf_config(checkpoint.config)
        self.device = _resolve_device(config.device)
        self.dtype = default_dtype(checkpoint, self.device) if config.dtype == "auto" else parse_dtype(config.dtype)
        self.max_model_len = self._max_model_len()
        self.tokenizer = checkpoint.load_tokenizer()
        tp = config.tensor_parallel_size
        check_tensor_parallel(self.model_config, tp, config.quantization)  # before any process or weight

        # With tensor parallelism kv_cache_memory is per rank: each holds the K/V of its KV heads.
        bytes_per_block = kv_bytes_per_block(self.model_config, config.block_size, self.dtype, tp, config.kv_cache_dtype)
        num_blocks = parse_memory_size(config.kv_cache_memory) // bytes_per_block
        if num_blocks < 1:
            raise PinferError(
                f"kv_cache_memory={config.kv_cache_memory!r} is smaller than one KV block ({bytes_per_block} bytes)"
            )
        # Ranks 1..tp-1 start now and load their shards while this process (rank 0) loads its own.
        self.tp_group = TensorParallelGroup.start(config, self.dtype, self.device, self.max_model_len, num_blocks) \
            if tp > 1 else None
        try:
            model = load_model(checkpoint, self.model_config, self.dtype, self.device, self.max_model_len,
                               config.quantization, config.deterministic)
            if self.tp_group is not None:
                shard_model(model, rank=0, world_size=tp)
                self.tp_group.wait_ready()
            # Pre-packed oneDNN weights (model/packed_linear.py); not for the modes that need aten's matmuls.
            self._pack_weights = (can_pack(self.device, self.dtype) and not config.deterministic and tp == 1
                                  and config.quantization is None)
            if self._pack_weights:
                pack_linears(model)
        except BaseException:
            if self.tp_group is not None:
                self.tp_group.shutdown()
            raise
        # Tracing off: NULL_TRACER, whose spans are a shared no-op context manager.
        self.tracer = make_tracer(config.trace_file, process_name=f"pinfer {os.path.basename(str(config.model))}")
        self._layer_spans = LayerSpans(self.tracer, model.layers) if config.trace_layers and self.tracer.enabled \
            else None
        self.runner = ModelRunner(model, self.model_config, self.dtype, self.device,
                                  config.block_size, num_blocks, config.attention_backend, config.deterministic,
                                  max_num_seqs=config.max_num_seqs, max_num_tokens=config.max_num_batched_tokens,
                                  max_model_len=self.max_model_len, tracer=self.tracer,
                                  tensor_parallel_size=tp, tp_group=self.tp_group, compile=config.compile,
                                  kv_cache_dtype=config.kv_cache_dtype)
        # A lazily zeroed (CPU) pool costs memory per block first used: reuse used blocks first.
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                          sliding_window=model.shared_sliding_window,
                                          untouched_last=self.runner.pool_is_lazy)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._seed_rng = random.Random(config.seed)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self.weight_version = 0  # bumped by every update_weights()
        self.paused = False
        self.sleeping = False
        self._released_weights: dict[str, tuple[torch.Size, torch.dtype]] = {}  # sleep(level=2)
        self._weights_pending: set[str] = set()  # wake_up(reload_weights=False): keys update_weights still owes
        self._token_text: dict[int, str] = {}  # decoded text of single tokens, for logprob entries
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0

    def _max_model_len(self) -> int:
        # A sliding window does not limit the context: the attention backends apply it.
        limit = self.model_config.max_position_embeddings
        if self.config.max_model_len is not None:
            if self.config.max_model_len > limit:
                raise PinferError(f"max_model_len={self.config.max_model_len} exceeds the model's limit of {limit} tokens")
            limit = self.config.max_model_len
        return limit

    # ---- trace file ------------------------------------------------------------------

    def write_trace(self) -> str | None:
        """Write the trace events so far to config.trace_file (a complete JSON file); returns its path.

        Also done by close(), at garbage collection and at interpreter exit.
        """
        self.tracer.flush()
        return self.tracer.path

    def close(self) -> None:
        """Finish the trace file. The engine stays usable, without tracing, unless it is
        tensor-parallel: close() also stops the worker processes, and steps then fail."""
        if self.tp_group is not None:
            self.tp_group.shutdown()
        self.tracer.close()
        self.tracer = self.runner.tracer = NULL_TRACER
        if self._layer_spans is not None:
            self._layer_spans.remove()
            self._layer_spans = None

    def __del__(self) -> None:
        tracer = getattr(self, "tracer", None)  # __init__ may have failed before setting it
        if tracer is not None:
            tracer.close()
        tp_group = getattr(self, "tp_group", None)
        if tp_group is not None:
            tp_group.shutdown()

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    # ---- requests -----------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty (no token ids)")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return None, ids

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None
    ) -> list[int]:
        """Render a conversation with the model's (or the given) chat template into prompt token ids.

        Reads only the tokenizer: safe to call from any thread.
        """
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template; pass chat_template=...")
        if not messages:
            raise InvalidRequestError("messages is empty")
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, chat_template=chat_template
        )
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Validate a tokenized request against the model and pool; return its resolved max_tokens."""
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        n_prompt = len(prompt_ids)
        if n_prompt >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {n_prompt} tokens; the model's context length is {self.max_model_len} "
                f"(prompt + at least one generated token must fit)"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} exceeds "
                f"the model's context length of {self.max_model_len} tokens"
            )
        if n_prompt + max_tokens > self.kv_capacity_tokens:
            raise InvalidRequestError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) needs more KV cache than the pool holds "
                f"({self.kv_capacity_tokens} tokens); raise kv_cache_memory or lower max_tokens"
            )
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad_stop:
            raise InvalidRequestError(f"stop_token_ids outside the vocabulary: {bad_stop}")
        return max_tokens

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        final_only: bool = False,
    ) -> str:
        """Queue a request; its id. final_only: step() returns its output only when it finishes
        (vLLM's RequestOutputKind.FINAL_ONLY, what LLM.generate wants), not at every step: an
        output copies the growing token and logprob lists, ~64 of them a batch-64 step."""
        params = params or SamplingParams()
        params.validate()
        if self.sleeping:
            raise InvalidRequestError("the engine is asleep; call wake_up() first")
        if self._weights_pending:
            raise InvalidRequestError(
                f"the weights dropped by sleep(level=2) were not restored: update_weights() still owes "
                f"{len(self._weights_pending)} tensor(s)")
        text, prompt_ids = self.tokenize(prompt)
        max_tokens = self.check_request(prompt_ids, params)
        request_id = request_id if request_id is not None else str(next(self._request_ids))
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        base_seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(31)
        seqs = []
        for index in range(params.n):
            seed = base_seed if index == 0 else hash((base_seed, index)) & 0x7FFFFFFF
            seqs.append(Sequence(
                seq_id=next(self._seq_ids), request_id=request_id, sample_index=index,
                prompt_len=len(prompt_ids), token_ids=list(prompt_ids), params=params, seed=seed,
                eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
                max_tokens=max_tokens,
            ))
        request = Request(request_id, text, prompt_ids, params, seqs,
                          RequestMetrics(arrival_time if arrival_time is not None else time.time()),
                          [IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) for _ in seqs],
                          final_only=final_only)
        self.requests[request_id] = request
        self.num_prompt_tokens += len(prompt_ids)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks are freed and its partial output returned."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._make_output(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            prefix_cache_hit_rate=bm.prefix_hit_rate,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
        )

    # ---- RL controls: live weights, pause, sleep ------------------------------------

    def update_weights(self, weights, reset_prefix_cache: bool = True) -> int:
        """Copy new weights into the model in place (no reload) and bump weight_version.

        `weights`: a state_dict-like mapping or an iterable of (hf_name, tensor),
        with Hugging Face names (a transformers model's state_dict() works as is).
        Every name and shape is checked before anything changes. Sequences in
        flight keep the K/V they computed with the old weights: pause() and let
        them finish or abort them first if that matters. Returns tensors written.
        """
        self._refuse_with_tensor_parallel("update_weights()")
        items = weights.items() if hasattr(weights, "items") else weights
        with torch.inference_mode():
            written = self.runner.model.load_weights(items, validate_first=True)
        if not written:
            raise InvalidRequestError("update_weights got no tensor this model stores (check the names)")
        self._weights_pending -= written
        if reset_prefix_cache:  # cached blocks hold K/V of the old weights
            self.block_manager.reset_prefix_cache()
        self.weight_version += 1
        return len(written)

    @property
    def num_weights_pending(self) -> int:
        """Tensors update_weights() must still write after wake_up(reload_weights=False); 0 normally."""
        return len(self._weights_pending)

    def pause(self) -> None:
        """Stop stepping: step() does nothing until resume(); requests stay queued with their blocks."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def sleep(self, level: int = 1) -> None:
        """Release memory while a trainer on the same machine runs (vLLM's sleep levels).

        level 1 frees the KV pool; level 2 also frees the weights. Needs an idle
        engine: finish or abort requests first. wake_up() restores service.
        """
        self._refuse_with_tensor_parallel("sleep()")
        if level not in (1, 2):
            raise InvalidRequestError(f"level must be 1 (KV cache) or 2 (KV cache and weights), got {level!r}")
        if self.has_unfinished_requests():
            raise InvalidRequestError("cannot sleep with unfinished requests; abort or finish them first")
        self.block_manager.reset_prefix_cache()  # the pool's contents are gone
        self.runner.release_kv_pool()
        if level == 2 and not self._released_weights:
            with dense_weights(self.runner.model, repack=False):  # release_weights records the dense shapes
                self._released_weights = self.runner.release_weights()
        self.sleeping = True

    def wake_up(self, reload_weights: bool = True) -> None:
        """Bring the KV pool (and weights dropped by sleep(level=2)) back.

        Dropped weights are re-read from the checkpoint the engine was built from;
        reload_weights=False skips that for a trainer about to push its own:
        requests are then refused until update_weights() has written every tensor.
        """
        if not self.sleeping:
            return
        self.runner.allocate_kv_pool()
        if self._released_weights:
            self.runner.restore_weights(self._released_weights)
            self._released_weights = {}
            if reload_weights:
                # writes a GGUF's Q4 blocks as they are into int4 linears
                reload_model_weights(self.runner.model, open_checkpoint(self.config.model), self.dtype)
                self._weights_pending = set()
            else:
                self._weights_pending = self.runner.model.expected_weight_keys()
            if self._pack_weights:  # without a reload, update_weights unpacks, writes and packs again
                pack_linears(self.runner.model)
        self.sleeping = False

    def _refuse_with_tensor_parallel(self, what: str) -> None:
        # The workers hold their own shards and KV pools: these would need a message to each.
        if self.tp_group is not None:
            raise InvalidRequestError(f"{what} is not supported with tensor_parallel_size > 1 yet")

    def _fail_request(self, request: Request, error: str) -> RequestOutput:
        """End one request with an error, freeing its blocks; the engine goes on with the others."""
        request.error = error
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
        self.requests.pop(request.request_id, None)
        request.metrics.finished_time = time.time()
        return self._make_output(request)

    # ---- the step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return outputs of requests that made progress (final_only ones only when
        they finish; failed ones always)."""
        if self.paused or self.sleeping:
            return []
        tracer = self.tracer
        with tracer.span("step") as step_span:
            with tracer.span("schedule"):
                schedule = self.scheduler.schedule()
            if schedule.is_empty:
                return []
            if tracer.enabled:
                step_span.args.update(num_seqs=len(schedule.scheduled), num_tokens=schedule.num_tokens,
                                      num_preempted=len(schedule.preempted))
            now = time.time()
            for item in schedule.scheduled:
                metrics = self.requests[item.seq.request_id].metrics
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = now
            try:
                result = self.runner.execute(schedule.scheduled)
            except TensorParallelError:  # a dead worker: the engine itself is broken, fail loudly
                raise
            except Exception as exc:  # a failed step fails the requests in it, not the engine
                failed = {item.seq.request_id: self.requests[item.seq.request_id] for item in schedule.scheduled}
                message = f"engine step failed: {type(exc).__name__}: {exc}"
                return [self._fail_request(request, message) for request in failed.values()]
            for item in schedule.scheduled:
                item.seq.num_computed_tokens += item.num_new_tokens
            with tracer.span("postprocess"):  # append tokens, detokenize, check stops, build outputs
                outputs = self._process(result)
        if tracer.enabled:
            tracer.counter("scheduler", running=len(self.scheduler.running), waiting=len(self.scheduler.waiting))
            tracer.counter("kv_cache_usage", percent=100 * self.block_manager.usage)
        return outputs

    def _process(self, result: StepResult) -> list[RequestOutput]:
        now = time.time()
        for entry in result.prompt_logprobs:
            seq = entry.seq
            if not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)
            for i, (lp, rank, top) in enumerate(zip(entry.chosen, entry.ranks, entry.top)):
                token = seq.token_ids[entry.start + i]
                seq.prompt_logprobs.append(self._logprob_entry(token, lp, rank, top))
        touched: dict[str, Request] = {}
        failed: list[RequestOutput] = []
        for sample in result.sampled:
            seq = sample.seq
            request = self.requests.get(seq.request_id)
            if request is None:  # failed earlier in this loop
                continue
            touched[request.request_id] = request
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
                if self.tracer.enabled:
                    self.tracer.counter("TTFT", ms=1000 * request.metrics.time_to_first_token)
            try:
                self._append_token(request, seq, sample)
            except Exception as exc:  # e.g. a detokenizer error: fail this request only
                del touched[request.request_id]
                failed.append(self._fail_request(request, f"{type(exc).__name__}: {exc}"))
        outputs = failed
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
                if self.tracer.enabled:
                    self._trace_tpot(request)
            elif request.final_only:
                continue
            outputs.append(self._make_output(request))
        return outputs

    def _trace_tpot(self, request: Request) -> None:
        # Time per output token after the first, as the server's /metrics histogram defines it.
        num_tokens = max(seq.num_output_tokens for seq in request.seqs)
        m = request.metrics
        if num_tokens > 1:
            self.tracer.counter("TPOT", ms=1000 * (m.finished_time - m.first_token_time) / (num_tokens - 1))

    def _append_token(self, request: Request, seq: Sequence, sample) -> None:
        token = sample.token_id
        seq.token_ids.append(token)
        self.num_generated_tokens += 1
        if sample.logprob is not None:
            seq.output_logprobs.append(sample.logprob)
            seq.output_top_logprobs.append(self._logprob_entry(token, sample.logprob, sample.rank, sample.top))
        delta = request.detokenizers[seq.sample_index].add(token)
        previous_len = len(seq.text)
        seq.text += delta
        params = seq.params
        past_min = seq.num_output_tokens >= params.min_tokens
        if past_min and token in params.stop_token_ids:
            self._finish(seq, "stop", stop_reason=token)
        elif past_min and token in seq.eos_token_ids:
            self._finish(seq, "stop")
        elif past_min and params.stop and self._check_stop_strings(seq, previous_len):
            pass
        elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _check_stop_strings(self, seq: Sequence, previous_len: int) -> bool:
        """Finish seq if its text now contains a stop string (which may span tokens); trim the text."""
        for stop in seq.params.stop:
            # only the new text and the len(stop)-1 characters before it can hold a new match
            start = max(0, previous_len - len(stop) + 1)
            index = seq.text.find(stop, start)
            if index != -1:
                end = index + len(stop) if seq.params.include_stop_str_in_output else index
                seq.text = seq.text[:end]
                self._finish(seq, "stop", stop_reason=stop)
                return True
        return False

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _logprob_entry(self, token: int, logprob: float, rank: int, top: list[tuple[int, float]]) -> TokenLogprobs:
        entry: TokenLogprobs = {token: Logprob(logprob, rank, self._decode_token(token))}
        for rank_i, (alt, alt_lp) in enumerate(top, start=1):
            if alt not in entry:
                entry[alt] = Logprob(alt_lp, rank_i, self._decode_token(alt))
        return entry

    def _decode_token(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    def _make_output(self, request: Request) -> RequestOutput:
        completions = []
        for seq in request.seqs:
            wants = seq.params.logprobs is not None
            text = seq.text
            if seq.params.stop and not seq.is_finished:
                # hold back what could be the start of a stop string, so a stream never shows one
                hold = max(len(stop) for stop in seq.params.stop) - 1
                text = text[: max(0, len(text) - hold)]
            completions.append(CompletionOutput(
                index=seq.sample_index,
                text=text,
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=float(sum(seq.output_logprobs)) if wants else None,
                logprobs=list(seq.output_top_logprobs) if wants else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                token_logprobs=list(seq.output_logprobs) if wants else None,
            ))
        request.metrics.num_cached_tokens = max(s.num_cached_tokens for s in request.seqs)
        prompt_logprobs = request.seqs[0].prompt_logprobs if request.params.prompt_logprobs is not None else None
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             prompt_logprobs, completions, request.finished, request.metrics, request.error)
