"""Owns the model, the KV pool and the sampler; turns one scheduled batch into
sampled tokens (and prompt logprobs where asked)."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pinfer import kernels
from pinfer.config import ModelConfig
from pinfer.distributed.tensor_parallel import StepHeader, TensorParallelGroup, pack_step
from pinfer.engine.scheduler import ScheduledSequence
from pinfer.engine.sequence import Sequence
from pinfer.memory import return_freed_memory_to_os
from pinfer.model.attention import get_attention_backend
from pinfer.model.attention.base import AttentionMetadata, Int8KV, KVPool
from pinfer.model.batch_invariant import BatchInvariantMode
from pinfer.sampling.penalties import penalty_bias
from pinfer.sampling.sampler import Sampler, SamplingBatch
from pinfer.tools.trace import NULL_TRACER


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, tensor_parallel_size: int = 1,
                       kv_cache_dtype: str = "auto") -> int:
    """K and V, every layer, one block; with tensor parallelism, one rank's share (its KV heads).
    int8: a byte a value and a float32 scale per head row."""
    num_kv_heads = config.num_kv_heads // tensor_parallel_size
    if kv_cache_dtype == "int8":
        bytes_per_row = config.head_dim + 4
    else:
        bytes_per_row = config.head_dim * torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * num_kv_heads * bytes_per_row


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float | None
    rank: int | None
    top: list[tuple[int, float]]  # (token_id, logprob) alternatives, most likely first


@dataclass
class PromptLogprobs:
    seq: Sequence
    start: int  # position of the first prompt token these entries score
    chosen: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]]


@dataclass
class StepResult:
    sampled: list[SampledToken]
    prompt_logprobs: list[PromptLogprobs]


class StepBuffers:
    """The step's integer inputs, written in place every step rather than made by torch.tensor().

    Sized once for the largest step (max_num_tokens tokens, max_num_seqs sequences,
    max_blocks table entries each); a step uses leading slices, which are views. Host
    values are written through numpy (no torch op, no allocation). On CPU the host
    buffers are the model's inputs; on other devices they are copied into device twins.
    A buffer that turns out too small (e.g. a caller bypassing the scheduler's limits) grows.
    """

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks: int, device: torch.device):
        self.device = device
        sizes = {"input_ids": (max_num_tokens,), "positions": (max_num_tokens,), "slot_mapping": (max_num_tokens,),
                 "query_start_loc": (max_num_seqs + 1,), "query_lens": (max_num_seqs,),
                 "context_lens": (max_num_seqs,), "block_tables": (max_num_seqs, max_blocks)}
        self.host = {name: torch.zeros(shape, dtype=torch.long) for name, shape in sizes.items()}
        self._numpy = {name: buf.numpy() for name, buf in self.host.items()}  # views of the same memory
        self.on_device = {} if device.type == "cpu" else {
            name: torch.zeros_like(buf, device=device) for name, buf in self.host.items()}

    def _fit(self, name: str, shape: tuple[int, ...]) -> None:
        if all(n <= size for n, size in zip(shape, self.host[name].shape)):
            return
        grown = tuple(max(n, 2 * size) for n, size in zip(shape, self.host[name].shape))
        self.host[name] = torch.zeros(grown, dtype=torch.long)
        self._numpy[name] = self.host[name].numpy()
        if self.on_device:
            self.on_device[name] = torch.zeros(grown, dtype=torch.long, device=self.device)

    def put(self, name: str, values: list[int]) -> torch.Tensor:
        n = len(values)
        self._fit(name, (n,))
        self._numpy[name][:n] = values
        return self._upload(name, (slice(0, n),))

    def put_tables(self, tables: list[list[int]]) -> torch.Tensor:
        """Block tables padded with 0 to the longest: [len(tables), max(len(t))]."""
        rows, width = len(tables), max(len(t) for t in tables)
        self._fit("block_tables", (rows, width))
        view = self._numpy["block_tables"]
        view[:rows, :width] = 0
        for row, table in enumerate(tables):
            view[row, : len(table)] = table
        return self._upload("block_tables", (slice(0, rows), slice(0, width)))

    def _upload(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        host = self.host[name][index]
        if not self.on_device:
            return host
        device = self.on_device[name][index]
        device.copy_(host)  # synchronous: the host buffer is rewritten next step
        return device


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        num_blocks: int,
        attention_backend: str,
        deterministic: bool = False,
        max_num_seqs: int = 256,
        max_num_tokens: int = 2048,
        max_model_len: int = 2048,
        tracer=NULL_TRACER,
        tensor_parallel_size: int = 1,
        tp_group: TensorParallelGroup | None = None,
        compile: bool = False,  # torch.compile the sampler's plain-temperature path (sampling/sampler.py)
        kv_cache_dtype: str = "auto",  # "auto": the model's dtype; "int8": Int8KV pools (model/attention/base.py)
    ):
        self.model, self.config, self.dtype, self.device = model, config, dtype, device
        # Tensor parallelism: the model is this rank's shard and the pool holds this rank's KV heads.
        # tp_group is set on rank 0 only: it sends each step to the workers (distributed/tensor_parallel.py).
        self.num_kv_heads = config.num_kv_heads // tensor_parallel_size
        self.tp_group = tp_group
        self.deterministic = deterministic
        # pinfer's CPU kernels (kernels/__init__.py): built on the first start on a machine, then cached.
        self.cpu_kernels = device.type == "cpu" and not deterministic and kernels.load()
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_cache_dtype = kv_cache_dtype
        self.backend = get_attention_backend(attention_backend)
        self.sampler = Sampler(compile=compile)
        self.kv_caches = self._allocate_kv_pool()
        self.buffers = StepBuffers(max_num_tokens, max_num_seqs, -(-max_model_len // block_size), device)
        self.tracer = tracer

    def release_kv_pool(self) -> None:
        """Free the KV pool's memory (sleep); allocate_kv_pool() brings it back, zeroed."""
        self.kv_caches, self._pool, self._scale_pool = [], None, None
        return_freed_memory_to_os()

    def allocate_kv_pool(self) -> None:
        self.kv_caches = self._allocate_kv_pool()

    def release_weights(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Free every parameter's storage (sleep level 2); returns what restore_weights() needs."""
        shapes = {}
        for name, param in self.model.named_parameters():  # a tied head is listed once
            shapes[name] = (param.shape, param.dtype)
            param.data = torch.empty(0, dtype=param.dtype, device=self.device)
        return_freed_memory_to_os()
        return shapes

    def restore_weights(self, shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> None:
        """Give the parameters storage again (uninitialised: the caller loads weights into it)."""
        params = dict(self.model.named_parameters())
        for name, (shape, dtype) in shapes.items():
            params[name].data = torch.empty(shape, dtype=dtype, device=self.device)

    def _allocate_kv_pool(self) -> list[tuple[KVPool, KVPool]]:
        shape = (self.config.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.config.head_dim)
        int8 = self.kv_cache_dtype == "int8"
        # Pages the process has not written cost no RSS, so on the CPU a pool of kv_cache_memory
        # bytes costs only the blocks in use: blocks are zeroed on first use (zero_new_blocks)
        # instead of all at once. Zeroed, not left as they are: attention reads a page's unwritten
        # slots and masks them, and garbage there could be NaN, which no mask hides.
        lazy = self.device.type == "cpu"
        new = torch.empty if lazy else torch.zeros
        self._pool = new(shape, dtype=torch.int8 if int8 else self.dtype, device=self.device)
        self._scale_pool = new((*shape[:-1], 1), dtype=torch.float32, device=self.device) if int8 else None
        self._zeroed = np.zeros(self.num_blocks, dtype=bool) if lazy else None
        self.blocks_zeroed = 0  # blocks zeroed on first use so far (CPU)
        if int8:
            return [tuple(Int8KV(self._pool[i, j], self._scale_pool[i, j], self.dtype) for j in (0, 1))
                    for i in range(self.config.num_layers)]
        return [(self._pool[i, 0], self._pool[i, 1]) for i in range(self.config.num_layers)]

    @property
    def pool_is_lazy(self) -> bool:
        """True where pool blocks cost memory only once first used (the CPU pool, zeroed on first use)."""
        return self._zeroed is not None

    def zero_new_blocks(self, block_tables: torch.Tensor) -> None:
        """Zero the pool blocks of this step's tables that were never used (CPU pools only).
        The bookkeeping is numpy on the host tables: no tensor work on steps without a new block."""
        if self._zeroed is None:
            return
        ids = block_tables.numpy().ravel()
        fresh = ids[~self._zeroed[ids]]
        if fresh.size:
            fresh = np.unique(fresh)  # only then: np.unique of every step's tables was ~0.1 ms a batch-1 token
            # runs of consecutive ids (never-used blocks are handed out in order), each one slice's
            # zero_(): an index_put of the ids took ~1 ms for 4 blocks, the slices 0.04-0.07
            breaks = np.flatnonzero(np.diff(fresh) != 1) + 1
            for run in np.split(fresh, breaks):
                first, last = int(run[0]), int(run[-1]) + 1
                self._pool[:, :, first:last].zero_()
                if self._scale_pool is not None:
                    self._scale_pool[:, :, first:last].zero_()
            self._zeroed[fresh] = True
            self.blocks_zeroed += int(fresh.size)

    # ---- inputs ---------------------------------------------------------------

    def _prepare(self, batch: list[ScheduledSequence]):
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []  # flat index of the token whose logits give the next token
        prompt_rows: list[int] = []  # flat indices whose logits score the next prompt token
        prompt_targets: list[int] = []
        prompt_spans: list[tuple[Sequence, int, int]] = []  # (seq, first position, count)
        bs = self.block_size
        for item in batch:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            base = len(input_ids)
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            if item.completes_prefill:
                sample_rows.append(base + n - 1)
            if seq.wants_prompt_logprobs:
                # position p's logits score prompt token p + 1; record each prompt position once
                first = max(start, len(seq.prompt_logprobs) - 1) if seq.prompt_logprobs else start
                last = min(start + n, seq.prompt_len - 1)
                if last > first:
                    prompt_rows.extend(base + p - start for p in range(first, last))
                    prompt_targets.extend(seq.token_ids[first + 1 : last + 1])
                    prompt_spans.append((seq, first + 1, last - first))
        put = self.buffers.put
        meta = AttentionMetadata(
            query_start_loc=put("query_start_loc", [0, *itertools.accumulate(query_lens)]),
            query_lens=put("query_lens", query_lens),
            context_lens=put("context_lens", context_lens),
            block_tables=self.buffers.put_tables([item.seq.block_table for item in batch]),
            slot_mapping=put("slot_mapping", slots),
            query_lens_cpu=query_lens,
            context_lens_cpu=context_lens,
            block_size=bs,
        )
        return (put("input_ids", input_ids), put("positions", positions), meta, sample_rows,
                prompt_rows, prompt_targets, prompt_spans)

    def _sampling_batch(self, seqs: list[Sequence], logits: torch.Tensor) -> SamplingBatch:
        banned: list[tuple[int, int]] = []
        num_logprobs = -1
        for row, seq in enumerate(seqs):
            params = seq.params
            if params.logprobs is not None:
                num_logprobs = max(num_logprobs, params.logprobs)
            if seq.num_output_tokens < params.min_tokens:
                banned.extend((row, t) for t in (*seq.eos_token_ids, *params.stop_token_ids))
        bias = None
        if any(s.params.has_penalties for s in seqs):
            bias = penalty_bias(
                logits.float(),
                output_tokens=[s.output_token_ids for s in seqs],
                prompt_tokens=[s.prompt_token_ids if s.params.repetition_penalty != 1.0 else [] for s in seqs],
                presence=[s.params.presence_penalty for s in seqs],
                frequency=[s.params.frequency_penalty for s in seqs],
                repetition=[s.params.repetition_penalty for s in seqs],
            )
        return SamplingBatch.from_lists(
            temperature=[s.params.temperature for s in seqs],
            top_k=[s.params.top_k for s in seqs],
            top_p=[s.params.top_p for s in seqs],
            min_p=[s.params.min_p for s in seqs],
            seeds=[s.seed for s in seqs],
            steps=[s.num_output_tokens for s in seqs],
            processed=[s.params.logprobs_mode == "processed" for s in seqs],
            num_logprobs=num_logprobs,
            banned=banned,
            device=self.device,
            logit_bias=bias,
        )

    # ---- the step -------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSequence]) -> StepResult:
        if self.tp_group is None:
            return self._execute(batch)
        with self.tp_group.guard():  # a dead worker or failed collective -> TensorParallelError
            return self._execute(batch)

    def _execute(self, batch: list[ScheduledSequence]) -> StepResult:
        tracer = self.tracer
        with tracer.span("prepare_inputs"):
            (input_ids, positions, meta, sample_rows,
             prompt_rows, prompt_targets, prompt_spans) = self._prepare(batch)
        if self.tp_group is not None:
            # The workers run the same forward and compute_logits calls on their shards
            # (tensor_parallel._run_step), in this order: the collectives must line up.
            header = StepHeader(meta.query_lens_cpu, meta.context_lens_cpu, meta.block_tables.shape[1],
                                meta.block_size, sample_rows, prompt_rows)
            with tracer.span("broadcast_step"):
                self.tp_group.send_step(header, pack_step(input_ids, positions, meta))
        self.zero_new_blocks(meta.block_tables)
        with self.forward_context():
            with self._forward_span(batch, meta) if tracer.enabled else contextlib.nullcontext():
                hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
            sampled: list[SampledToken] = []
            if sample_rows:
                seqs = [item.seq for item in batch if item.completes_prefill]
                with tracer.span("logits"):
                    logits = self.model.compute_logits(hidden[sample_rows])
                with tracer.span("sample"):
                    sampled = self._sample(seqs, logits)
            with tracer.span("prompt_logprobs") if prompt_rows else contextlib.nullcontext():
                prompt_results = self._prompt_logprobs(hidden, prompt_rows, prompt_targets, prompt_spans)
        return StepResult(sampled, prompt_results)

    def forward_context(self):
        """Around the model's forward: deterministic mode's batch-invariant aten ops, or else
        pinfer's CPU kernels (kernels/__init__.py) where they loaded."""
        return BatchInvariantMode() if self.deterministic else kernels.active(self.cpu_kernels)

    def _forward_span(self, batch: list[ScheduledSequence], meta: AttentionMetadata):
        """The model forward's span: "decode" (every sequence feeds back its last sampled token),
        "prefill" (none does: prompt chunks, including one-token prompts) or "mixed"."""
        num_decode = sum(item.num_new_tokens == 1 and item.seq.num_output_tokens > 0 for item in batch)
        kind = "decode" if num_decode == len(batch) else "prefill" if num_decode == 0 else "mixed"
        return self.tracer.span(kind, cat="forward", batch_size=len(batch), num_tokens=sum(meta.query_lens_cpu),
                                num_decode_seqs=num_decode, num_prefill_seqs=len(batch) - num_decode,
                                max_context_len=max(meta.context_lens_cpu))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[SampledToken]:
        if not self.deterministic:
            return self._unpack_samples(seqs, self.sampler(logits, self._sampling_batch(seqs, logits)))
        # The sampler sizes its top-k/top-p candidate sets from the whole batch's settings; rows
        # with the same cut-offs sampled together always see the same sizes (and so the same sums).
        groups: dict[tuple, list[int]] = {}
        for row, seq in enumerate(seqs):
            groups.setdefault((seq.params.top_k, seq.params.top_p, seq.params.min_p), []).append(row)
        sampled: list[SampledToken | None] = [None] * len(seqs)
        for rows in groups.values():
            group_seqs = [seqs[r] for r in rows]
            group_logits = logits[rows]
            out = self.sampler(group_logits, self._sampling_batch(group_seqs, group_logits))
            for row, token in zip(rows, self._unpack_samples(group_seqs, out)):
                sampled[row] = token
        return sampled

    @staticmethod
    def _unpack_samples(seqs: list[Sequence], out) -> list[SampledToken]:
        tokens = out.token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        ranks = out.ranks.tolist() if out.ranks is not None else None
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        results = []
        for row, seq in enumerate(seqs):
            k = seq.params.logprobs
            wants = k is not None and logprobs is not None
            top = list(zip(top_ids[row][:k], top_lps[row][:k])) if wants and k else []
            results.append(SampledToken(
                seq, tokens[row],
                logprobs[row] if wants else None,
                ranks[row] if wants else None,
                top,
            ))
        return results

    def _prompt_logprobs(self, hidden, rows, targets, spans) -> list[PromptLogprobs]:
        if not rows:
            return []
        # Prompt logprobs are always raw: log_softmax in float32 of the model's logits.
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]).float(), dim=-1)
        target = torch.tensor(targets, device=logprobs.device)
        chosen = logprobs.gather(1, target[:, None]).squeeze(1)
        ranks = (logprobs > chosen[:, None]).sum(dim=1) + 1
        k_max = max(seq.params.prompt_logprobs for seq, _, _ in spans)
        top_lp, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
        chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
        top_lp_l = top_lp.tolist() if k_max else None
        top_ids_l = top_ids.tolist() if k_max else None
        results, offset = [], 0
        for seq, start, count in spans:
            k = seq.params.prompt_logprobs
            top = [list(zip(top_ids_l[i][:k], top_lp_l[i][:k])) if k else [] for i in range(offset, offset + count)]
            results.append(PromptLogprobs(seq, start, chosen_l[offset:offset + count],
                                          ranks_l[offset:offset + count], top))
            offset += count
        return results
