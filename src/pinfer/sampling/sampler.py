"""Next-token sampling for a whole batch in one pass, with logprobs.

What a row samples from (its "processed" distribution), in float32:
  0. + logit_bias, if any (presence/frequency/repetition penalties, see penalties.py).
  1. banned tokens (EOS under min_tokens) -> -inf. First, as vLLM applies
     min_tokens before everything else: a cut-off such as top_k=1 then picks
     the best allowed token instead of leaving nothing to sample.
  2. / temperature, for random rows. A temperature below 1e-5 counts as 0,
     which means greedy: argmax, no temperature, lowest token id on ties.
  3. top-k: keep the k largest.
  4. top-p: keep the smallest set of most likely tokens whose probability,
     renormalised after top-k, reaches top_p (the top token always stays).
  5. min-p: drop tokens whose probability is below min_p * the top probability.
Steps 3-5 in this order are vLLM v0's order (vLLM v1 applies min-p before
top-k/top-p; only min-p together with top-p tells the two apart). Every
cut-off is a per-row value threshold on the logits, so tokens tied with the
last kept token are kept too, and rows with different settings share one
batched computation: take each row's largest values in order (a partial
top-k; more only for the rows whose nucleus is larger, a full sort only for
the rare ones), find each row's threshold with gathers and cumulative sums.

Random rows use the Gumbel-max trick, argmax(logits + G), which samples exactly
from softmax(logits). G comes from a counter-based hash of (seed, step, token
id) (see `random.py`), so a draw never depends on the rest of the batch. When
a row's cut-offs leave it a few known candidates, noise is drawn only for
those: the same tokens get the same noise, so the draw is identical.

Device syncs (free on CPU, not on a GPU): none for greedy or plain temperature
sampling; with cut-offs, a few per round of widening (usually one round); one
for logprobs.

Logprobs (see `sampling_params.py`): raw rows use log_softmax(logits), processed
rows log_softmax of the distribution in steps 1-5 (greedy rows: no temperature,
cut-offs applied).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pinfer import kernels
from pinfer.sampling import random as counter_rng
from pinfer.sampling_params import SamplingParams

GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
TOP_P_WIDTH = 256  # candidates looked at first for top-p; more only for the rows that need it
_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """One row per sequence sampled this step; tensors on the logits' device.

    The python bools and ints from `all_greedy` on are fast-path and shape
    decisions that the builders take from python lists, so that the sampler
    needs no device sync to take them.
    """

    temperature: torch.Tensor  # [B] float32; 0 (anything below GREEDY_TEMPERATURE) = greedy
    top_k: torch.Tensor  # [B] int64; -1 = disabled
    top_p: torch.Tensor  # [B] float32; 1.0 = disabled
    min_p: torch.Tensor  # [B] float32; 0.0 = disabled
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64, index of the sampled token in the sequence's output
    processed_logprobs: torch.Tensor  # [B] bool; True: "processed", False: "raw"
    num_logprobs: int  # top alternatives wanted (max over rows); 0 = chosen only; -1 = no logprobs
    banned_rows: torch.Tensor | None  # [M] int64, with banned_tokens: (row, token) never sampled
    banned_tokens: torch.Tensor | None
    logit_bias: torch.Tensor | None  # [B, V] float32 added to the processed logits (penalties); None = none
    all_greedy: bool
    all_random: bool
    needs_filtering: bool  # a top-k/top-p/min-p cut-off changes a sample or a processed logprob
    any_temperature: bool  # a random row has a temperature other than 1
    max_top_k: int  # largest active top_k, 0 if none
    any_top_p: bool
    any_min_p: bool
    any_processed: bool  # some row wants processed logprobs
    all_processed: bool

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_lists(
        cls,
        temperature: Sequence[float],
        top_k: Sequence[int] | None = None,
        top_p: Sequence[float] | None = None,
        min_p: Sequence[float] | None = None,
        seeds: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
        processed: Sequence[bool] | None = None,
        num_logprobs: int = -1,
        banned: Sequence[tuple[int, int]] = (),
        device: torch.device | str = "cpu",
        logit_bias: torch.Tensor | None = None,
    ) -> SamplingBatch:
        """Build from per-row python values; omitted lists mean "disabled" (steps: 0)."""
        rows = len(temperature)
        top_k = [-1 if k is None or k <= 0 else int(k) for k in (top_k or [-1] * rows)]
        top_p = list(top_p or [1.0] * rows)
        min_p = list(min_p or [0.0] * rows)
        processed = list(processed or [False] * rows)
        steps = list(steps or [0] * rows)
        greedy = [t < GREEDY_TEMPERATURE for t in temperature]
        if seeds is None:
            if not all(greedy):
                raise ValueError("seeds are required when a row samples randomly")
            seeds = [0] * rows
        seeds = [(int(s) + 2**63) % 2**64 - 2**63 for s in seeds]  # any python int, as int64 bits
        lengths = {len(x) for x in (top_k, top_p, min_p, processed, steps, seeds)}
        if lengths != {rows}:
            raise ValueError(f"every per-row list must have {rows} entries")

        def filtered(i: int) -> bool:
            return top_k[i] > 0 or top_p[i] < 1.0 or min_p[i] > 0.0

        # Cut-offs matter for random rows' samples and for processed logprobs; a
        # greedy row's argmax always survives them.
        needs_filtering = any(
            filtered(i) and (not greedy[i] or (processed[i] and num_logprobs >= 0)) for i in range(rows)
        )

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        banned_rows = banned_tokens = None
        if banned:
            banned_rows = tensor([r for r, _ in banned], torch.int64)
            banned_tokens = tensor([t for _, t in banned], torch.int64)
        return cls(
            temperature=tensor(list(temperature), torch.float32),
            top_k=tensor(top_k, torch.int64),
            top_p=tensor(top_p, torch.float32),
            min_p=tensor(min_p, torch.float32),
            seeds=tensor(seeds, torch.int64),
            steps=tensor(steps, torch.int64),
            processed_logprobs=tensor(processed, torch.bool),
            num_logprobs=num_logprobs,
            banned_rows=banned_rows,
            banned_tokens=banned_tokens,
            logit_bias=logit_bias,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            needs_filtering=needs_filtering,
            any_temperature=any(not g and t != 1.0 for g, t in zip(greedy, temperature)),
            max_top_k=max([0, *top_k]) if needs_filtering else 0,
            any_top_p=needs_filtering and any(p < 1.0 for p in top_p),
            any_min_p=needs_filtering and any(p > 0.0 for p in min_p),
            any_processed=any(processed),
            all_processed=all(processed),
        )

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        banned: Sequence[tuple[int, int]] = (),
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        """Build from each row's SamplingParams; seeds are the engine's (drawn for unseeded requests)."""
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls.from_lists(
            temperature=[p.temperature for p in params],
            top_k=[p.top_k for p in params],
            top_p=[p.top_p for p in params],
            min_p=[p.min_p for p in params],
            seeds=seeds,
            steps=steps,
            processed=[p.logprobs_mode == "processed" for p in params],
            num_logprobs=max(wanted, default=-1),
            banned=banned,
            device=device,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, chosen token's logprob under the row's mode
    top_token_ids: torch.Tensor | None  # [B, num_logprobs] int64, most likely first
    top_logprobs: torch.Tensor | None  # [B, num_logprobs] float32
    ranks: torch.Tensor | None  # [B] int64, 1-based: tokens at least as likely as the chosen one (vLLM's rank)


@dataclass
class _Candidates:
    """Where some random rows sample from. rows: their indices (None: every row).
    values/ids: for each, its largest processed logits, descending, and their
    token ids, holding every token the row keeps; None: the whole vocabulary."""

    rows: torch.Tensor | None = None
    values: torch.Tensor | None = None
    ids: torch.Tensor | None = None


class Sampler:
    """logits [B, V] (any float dtype) + SamplingBatch -> SamplerOutput. Stateless.

    candidate_noise=False always draws noise over the whole vocabulary; the
    samples are the same, only slower (kept for tests and benchmarks).
    Batches that only sample with a temperature (no cut-offs, bans or penalties; RL rollouts)
    take a fused path: pinfer's CPU kernel where it is usable (kernels/), else with
    compile=True one torch.compile'd function. Both make the same tokens and ranks as the
    eager path, and logprobs within float32 rounding. All-greedy batches without logprobs,
    bans or penalties (batch-1 chat) take the argmax of the logits as they are.
    """

    def __init__(self, candidate_noise: bool = True, compile: bool = False) -> None:
        self.candidate_noise = candidate_noise
        self._plain_random = torch.compile(_plain_random_sample, dynamic=True) if compile else None

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == batch.num_rows, (logits.shape, batch.num_rows)
        if batch.all_greedy and batch.num_logprobs < 0 and batch.banned_rows is None and batch.logit_bias is None:
            # The first maximum of the logits as they are (no float32 copy: the conversion is
            # exact): a greedy row has no temperature, and cut-offs never remove the maximum.
            return SamplerOutput(_argmax(logits), None, None, None, None)
        use_kernel = kernels.usable(logits) and kernels.has("gumbel_sample") and logits.is_contiguous()
        if (use_kernel or self._plain_random is not None) and _is_plain_random(batch):
            if use_kernel:
                # The same computation in two passes per row, noise only for tokens that can win
                # (kernels/cpu_ops.cpp), the same tokens.
                keys = torch.ops.pinfer.row_keys(batch.seeds, batch.steps)  # random.py's row_keys, bit for bit
                token_ids, chosen, ranks = torch.ops.pinfer.gumbel_sample(logits, batch.temperature, keys,
                                                                          batch.all_processed)
            else:
                token_ids, chosen, ranks = self._plain_random(logits, batch.temperature, batch.seeds, batch.steps,
                                                              batch.all_processed)
            if batch.num_logprobs < 0:
                return SamplerOutput(token_ids, None, None, None, None)
            empty = chosen.new_empty((chosen.shape[0], 0))
            return SamplerOutput(token_ids, chosen, token_ids.new_empty((chosen.shape[0], 0)), empty, ranks)
        raw = logits.float()  # may alias `logits`: never written to
        greedy = batch.temperature < GREEDY_TEMPERATURE
        x = _scaled_logits(raw, batch, greedy)  # steps 1-2
        cutoff, groups = None, [_Candidates()]
        if batch.needs_filtering:
            cutoff, groups = _cutoffs(x, batch)  # steps 3-5: a row keeps x >= cutoff
        token_ids = self._sample(x, cutoff, groups, greedy, batch)
        if batch.num_logprobs < 0:
            return SamplerOutput(token_ids, None, None, None, None)
        return _logprobs(raw, x, cutoff, token_ids, batch)

    def _sample(self, x, cutoff, groups: list[_Candidates], greedy, batch: SamplingBatch) -> torch.Tensor:
        """Greedy rows: argmax. Random rows: Gumbel-max over each group's candidates."""
        if batch.all_greedy:
            return _argmax(x)  # cut-offs never remove the maximum
        token_ids = x.new_empty(x.shape[0], dtype=torch.int64) if batch.all_random else _argmax(x)
        for group in groups:
            rows = group.rows
            seeds, steps = (batch.seeds, batch.steps) if rows is None else (batch.seeds[rows], batch.steps[rows])
            if group.ids is not None and self.candidate_noise:
                values, ids = group.values, group.ids
                scores = counter_rng.add_gumbel(values, seeds, steps, ids)
            else:
                values, ids = (x if rows is None else x[rows]), None
                scores = counter_rng.add_gumbel(values, seeds, steps, x.shape[1])
            if cutoff is not None:
                scores.masked_fill_(values < (cutoff if rows is None else cutoff[rows]).unsqueeze(1), _NEG_INF)
            sampled = _argmax(scores)
            if ids is not None:
                sampled = ids.gather(1, sampled.unsqueeze(1)).squeeze(1)
            if rows is None:  # the only group
                return sampled if batch.all_random else torch.where(greedy, token_ids, sampled)
            token_ids[rows] = sampled
        return token_ids


def _is_plain_random(batch: SamplingBatch) -> bool:
    """Every row samples the whole vocabulary at its temperature, and wants at most the chosen
    token's logprob, all rows in one mode (a python-only check: no device sync)."""
    return (batch.all_random and not batch.needs_filtering and batch.banned_rows is None
            and batch.logit_bias is None and batch.num_logprobs <= 0
            and batch.any_processed == batch.all_processed)


def _plain_random_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                         processed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gumbel-max over logits / T, the chosen token's logprob (raw, or processed = of logits / T)
    and its rank: what Sampler.__call__ computes for such a batch, written to be fused."""
    raw = logits.float()
    x = raw / temperature.unsqueeze(1)
    token_ids = counter_rng.add_gumbel(x, seeds, steps, x.shape[1]).argmax(dim=-1)
    source = x if processed else raw
    chosen = source.gather(1, token_ids.unsqueeze(1))
    ranks = (source >= chosen).sum(dim=-1)
    return token_ids, (chosen.squeeze(1) - torch.logsumexp(source, dim=-1)), ranks


_ARGMAX_BLOCK = 256


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x.max(dim=-1).indices (the first maximum): pinfer's CPU kernel, or else from block
    maxima: on CPU, torch's reductions that track indices run ~4x slower than amax."""
    if kernels.usable(x) and x.is_contiguous() and x.dim() == 2 and kernels.has("argmax"):
        return torch.ops.pinfer.argmax(x)
    rows, n = x.shape
    blocks = n // _ARGMAX_BLOCK
    if blocks < 4:
        return x.max(dim=-1).indices
    block_max = x[:, : blocks * _ARGMAX_BLOCK].unflatten(1, (blocks, _ARGMAX_BLOCK)).amax(dim=-1)
    if blocks * _ARGMAX_BLOCK < n:
        block_max = torch.cat([block_max, x[:, blocks * _ARGMAX_BLOCK :].amax(dim=-1, keepdim=True)], dim=1)
    start = block_max.max(dim=-1).indices * _ARGMAX_BLOCK
    # The tail block is shorter: clamping repeats its last id after the real ones.
    cols = (start.unsqueeze(1) + torch.arange(_ARGMAX_BLOCK, device=x.device)).clamp_(max=n - 1)
    return cols.gather(1, x.gather(1, cols).max(dim=-1).indices.unsqueeze(1)).squeeze(1)


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k, dim=-1): values descending and their ids (ties in any order).

    The k largest values lie in the k blocks of ids with the largest maxima, so
    it looks only inside those (plus the ragged tail). With blocks of about
    V / 4k ids this is ~5x faster than torch.topk on CPU for k = 5 and ~2x for
    k = 1024, over a 49k vocabulary; for larger k it is torch.topk.
    """
    rows, n = x.shape
    block = 64
    while block >= 8 and block * 4 * k > n:
        block //= 2
    if block < 8:
        return x.topk(k, dim=-1)
    blocks = n // block
    head = blocks * block
    block_max = x[:, :head].unflatten(1, (blocks, block)).amax(dim=-1)
    top_blocks = block_max.topk(k, dim=-1, sorted=False).indices
    cols = (top_blocks.unsqueeze(-1) * block + torch.arange(block, device=x.device)).flatten(1)
    if head < n:
        cols = torch.cat([cols, torch.arange(head, n, device=x.device).expand(rows, -1)], dim=1)
    values, picked = x.gather(1, cols).topk(k, dim=-1)
    return values, cols.gather(1, picked)


def _scaled_logits(raw: torch.Tensor, batch: SamplingBatch, greedy: torch.Tensor) -> torch.Tensor:
    """Banned tokens at -inf, random rows divided by their temperature. May alias `raw`."""
    x = raw
    if batch.logit_bias is not None:
        x = raw + batch.logit_bias
    if batch.banned_rows is not None:
        x = x.index_put((batch.banned_rows, batch.banned_tokens), x.new_tensor(_NEG_INF))
    if batch.any_temperature:
        temperature = batch.temperature if batch.all_random else batch.temperature.masked_fill(greedy, 1.0)
        x = x.div_(temperature.unsqueeze(1)) if x is not raw else x / temperature.unsqueeze(1)
    return x


def _cutoffs(x: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, list[_Candidates]]:
    """Per-row threshold for steps 3-5, and the candidates each random row samples from.

    Rows look at their `width` largest values first (top_k + 1, or TOP_P_WIDTH
    for top-p and min-p). The few whose nucleus runs past them look again at
    4x as many, and so on up to the whole sorted row; each width's rows form
    one group. (On CPU, torch.topk of 256 of 49152 costs ~1/20 of a full sort.)
    """
    vocab = x.shape[1]
    if batch.all_greedy and not (batch.max_top_k > 0 or batch.any_top_p):  # min-p only: no sort
        return x.amax(dim=-1) + batch.min_p.log(), []
    random_rows = batch.temperature >= GREEDY_TEMPERATURE
    # top_k + 1, to see whether the k-th value's ties run past the candidates;
    # min-p keeps few tokens too, and then noise for them only is cheaper.
    max_top_k = batch.max_top_k
    if max_top_k >= vocab:  # top_k >= V keeps everything: size the candidates for the other rows
        max_top_k = int(batch.top_k.masked_fill(batch.top_k >= vocab, 0).max())
    wide = batch.any_top_p or batch.any_min_p
    width = min(vocab, max(max_top_k + 1, TOP_P_WIDTH if wide else 0))
    rows, cutoff, groups = None, None, []
    while True:
        sub_cutoff, values, ids, decided = _row_cutoffs(
            _take(x, rows), _take(batch.top_k, rows), _take(batch.top_p, rows), _take(batch.min_p, rows), width, batch
        )
        if rows is None:
            cutoff = sub_cutoff
        else:
            cutoff[rows] = sub_cutoff
        # Done here: greedy rows, and random rows whose kept tokens all are candidates.
        within = values[:, -1] < sub_cutoff if width < vocab else torch.ones_like(decided)
        is_random = _take(random_rows, rows)
        done = decided & (within | ~is_random)
        whole_vocab = decided & ~within & is_random  # no cut-off, or it keeps more than the candidates
        all_done, any_whole_vocab = torch.stack([done.all(), whole_vocab.any()]).tolist()
        if all_done:
            groups.append(_Candidates(rows, values, ids))
            return cutoff, groups
        here = (done & is_random).nonzero().squeeze(1)
        if here.numel():
            groups.append(_Candidates(_take(rows, here) if rows is not None else here, values[here], ids[here]))
        if any_whole_vocab:
            whole = whole_vocab.nonzero().squeeze(1)
            groups.append(_Candidates(_take(rows, whole) if rows is not None else whole))
        undecided = (~decided).nonzero().squeeze(1)
        if not undecided.numel():
            return cutoff, groups
        rows = _take(rows, undecided) if rows is not None else undecided
        width = vocab if width * 4 * 2 >= vocab else width * 4


def _take(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return t if rows is None or t is None else t[rows]


def _row_cutoffs(x, top_k, top_p, min_p, width: int, batch: SamplingBatch):
    """Thresholds from the `width` largest values of each row.

    Returns (cutoff [R], values [R, W], ids [R, W], decided [R]); a row is
    undecided when its top-p nucleus, or its top-k ties, may reach past W.
    """
    vocab = x.shape[1]
    full = width >= vocab
    if full:
        values, ids = x.sort(dim=-1, descending=True)
    else:
        values, ids = _topk(x, width)
    decided = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    cutoff = values.new_full((x.shape[0],), _NEG_INF)

    k_active = (top_k > 0) & (top_k < vocab)
    if batch.max_top_k > 0:
        kth = values.gather(1, (top_k.clamp(1, values.shape[1]) - 1).unsqueeze(1)).squeeze(1)
        cutoff = torch.where(k_active, kth, cutoff)

    if batch.any_top_p:
        p_active = top_p < 1.0
        kept = values.masked_fill(values < cutoff.unsqueeze(1), _NEG_INF)
        # Normaliser of the row after top-k: the kept candidates when they hold
        # the whole top-k set, else the whole row.
        k_within = k_active & (full or (values[:, -1] < cutoff))
        log_norm = kept.logsumexp(dim=-1)
        if (p_active & ~k_within).any():  # the whole row's normaliser; values[:, 0] is its max
            top = values[:, :1]
            whole_row = top.squeeze(1) + (x - top).exp_().sum(dim=-1).log_()
            log_norm = torch.where(k_within, log_norm, whole_row)
        probs = (kept.double() - log_norm.double().unsqueeze(1)).exp()
        before = (probs.cumsum(dim=-1) < top_p.double().unsqueeze(1)).sum(dim=-1)  # tokens before reaching top_p
        last = values.gather(1, before.clamp(max=values.shape[1] - 1).unsqueeze(1)).squeeze(1)
        cutoff = torch.where(p_active, torch.maximum(cutoff, last), cutoff)
        if not full:
            decided = ~p_active | ((before < values.shape[1]) & (k_within | ~k_active))

    if batch.any_min_p:
        cutoff = torch.maximum(cutoff, values[:, 0] + min_p.log())  # p >= min_p * p_max
    return cutoff, values, ids, decided


def _logprobs(raw, x, cutoff, token_ids, batch: SamplingBatch) -> SamplerOutput:
    """Chosen-token logprob, rank and top alternatives, per row in its mode."""
    mode = batch.processed_logprobs
    all_processed, any_processed = torch.stack([mode.all(), mode.any()]).tolist()  # skips [B, V] passes
    if not any_processed:
        source = raw
    else:
        source = x if cutoff is None else x.masked_fill(x < cutoff.unsqueeze(1), _NEG_INF)
        if not all_processed:
            source = torch.where(mode.unsqueeze(1), source, raw)
    logprobs = torch.log_softmax(source, dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    # Rank from the logits, which rounding has not merged into ties.
    ranks = (source >= source.gather(1, token_ids.unsqueeze(1))).sum(dim=-1, dtype=torch.int32).long()
    if batch.num_logprobs > 0:
        top_logprobs, top_token_ids = _topk(logprobs, batch.num_logprobs)
    else:
        top_logprobs = logprobs.new_empty((logprobs.shape[0], 0))
        top_token_ids = token_ids.new_empty((logprobs.shape[0], 0))
    return SamplerOutput(token_ids, chosen.squeeze(1), top_token_ids, top_logprobs, ranks)
