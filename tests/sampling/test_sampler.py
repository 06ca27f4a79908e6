"""The batched sampler: greedy, seeded Gumbel-max sampling, top-k/top-p/min-p,
token bans, raw and processed logprobs, and the counter-based RNG under it.

Every random draw here is a pure function of (seed, step, token id), so these
statistical tests are deterministic: thresholds are set at p ~ 1e-4 for a
fresh seed choice, and a passing test keeps passing.
"""

from __future__ import annotations

import math

import pytest
import torch

from pinfer.sampling import random as counter_rng
from pinfer.sampling.sampler import Sampler, SamplingBatch, _argmax, _topk
from pinfer.sampling_params import SamplingParams

sampler = Sampler()
MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------- references


def _lowbias32(x: int, finish: bool = True) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16) if finish else x


def _reference_bits(seed: int, step: int, token: int) -> int:
    key = 0
    words = (step & MASK32, (step >> 32) & MASK32, seed & MASK32, (seed >> 32) & MASK32)
    for word, salt in zip(words, (0x68E31DA4, 0xB5297A4D, 0x1B56C4E9, 0x2F3C6A75)):
        key = _lowbias32(key ^ word ^ salt)
    return _lowbias32(key ^ _lowbias32(token ^ 0x9E3779B9), finish=False)


def reference_processed(logits: torch.Tensor, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, banned=()):
    """One row's processed logits, by the definitions, in float64, one step at a time."""
    x = logits.double().clone()
    x[list(banned)] = -math.inf
    if temperature >= 1e-5:
        x = x / temperature
    if 0 < top_k < x.numel():
        x[x < x.sort(descending=True).values[top_k - 1]] = -math.inf
    if top_p < 1.0:
        values = x.sort(descending=True).values
        cumulative = torch.softmax(values, 0).cumsum(0)
        last = int((cumulative < top_p).sum())  # the token that makes the sum reach top_p
        x[x < values[min(last, x.numel() - 1)]] = -math.inf
    if min_p > 0.0:
        probs = torch.softmax(x, 0)
        x[probs < min_p * probs.max()] = -math.inf
    return x


def chi_square_z(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square of counts against probs, as a standard normal z
    (Wilson-Hilferty). z > 4 happens with probability ~3e-5 under the null."""
    n = counts.sum().double()
    expected = probs.double() * n
    stat = float(((counts.double() - expected) ** 2 / expected).sum())
    dof = probs.numel() - 1
    return ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))


def draw_many(logits_row: torch.Tensor, n: int, seed: int = 1234, **row) -> torch.Tensor:
    """n draws from one distribution: one row per step, all in one batch."""
    banned = row.pop("banned", ())
    batch = SamplingBatch.from_lists(
        temperature=[row.pop("temperature", 1.0)] * n,
        top_k=[row.pop("top_k", -1)] * n,
        top_p=[row.pop("top_p", 1.0)] * n,
        min_p=[row.pop("min_p", 0.0)] * n,
        seeds=[seed] * n,
        steps=list(range(n)),
        banned=[(i, t) for i in range(n) for t in banned],
    )
    assert not row, row
    return sampler(logits_row.expand(n, -1), batch).token_ids


def zipf_logits(vocab: int, seed: int = 0) -> torch.Tensor:
    """Distinct, well separated log-probabilities (~1/rank), in shuffled token order."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(vocab, generator=g) + 1
    return -1.1 * ranks.double().log().float() + 3.0


# ---------------------------------------------------------------- the RNG


def test_random_bits_match_pure_python_reference():
    seeds = [0, 1, 42, -1, -(2**63), 2**63 - 1, 0x123456789ABCDEF, -987654321]
    steps = [0, 1, 7, 2**32 + 5, 2**40, 3, 12345, 2**31]
    tokens = torch.tensor([[0, 1, 2, 49151, 2**20 + 3, 151935]] * len(seeds))
    bits = counter_rng.random_bits(torch.tensor(seeds), torch.tensor(steps), tokens)
    expected = [[_reference_bits(s, t, int(tok)) for tok in row] for s, t, row in zip(seeds, steps, tokens)]
    assert (bits.long() & MASK32).tolist() == expected
    u = counter_rng.uniform(torch.tensor(seeds), torch.tensor(steps), tokens)
    expected_u = [[((b >> 9) * 2 + 1) * 2.0**-24 for b in row] for row in expected]
    assert u.double().tolist() == expected_u
    # A grid wide enough for the vectorised kernels, with a ragged end.
    grid = counter_rng.random_bits(torch.tensor(seeds[3:5]), torch.tensor(steps[3:5]), 4099)
    expected = [[_reference_bits(s, t, tok) for tok in range(4099)] for s, t in zip(seeds[3:5], steps[3:5])]
    assert (grid.long() & MASK32).tolist() == expected


def test_full_grid_and_gathered_tokens_give_the_same_numbers():
    seeds, steps = torch.tensor([3, -5, 2**40]), torch.tensor([0, 9, 1])
    grid = counter_rng.uniform(seeds, steps, 1000)
    ids = torch.tensor([[999, 0, 17], [5, 5, 6], [123, 456, 789]])
    assert torch.equal(counter_rng.uniform(seeds, steps, ids), grid.gather(1, ids))
    assert torch.equal(counter_rng.uniform(seeds[1:2], steps[1:2], 1000), grid[1:2])


def test_uniform_is_uniform_on_the_open_interval():
    u = counter_rng.uniform(torch.arange(64), torch.zeros(64, dtype=torch.int64), 8192).double().flatten()
    n = u.numel()
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)
    counts = torch.histc(u, bins=256, min=0.0, max=1.0)
    assert chi_square_z(counts, torch.full((256,), 1 / 256)) < 4
    # Kolmogorov-Smirnov on a subsample: sqrt(n) * D < 1.95 at p = 0.001.
    sub = u[::37].sort().values
    m = sub.numel()
    grid = torch.arange(1, m + 1, dtype=torch.float64) / m
    d = torch.maximum((grid - sub).abs(), (sub - (grid - 1 / m)).abs()).max()
    assert math.sqrt(m) * d < 1.95


def _joint_chi_square(a: torch.Tensor, b: torch.Tensor, bins: int = 16) -> float:
    cell = (a.flatten() * bins).long() * bins + (b.flatten() * bins).long()
    counts = torch.bincount(cell, minlength=bins * bins)
    return chi_square_z(counts, torch.full((bins * bins,), 1 / bins**2))


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda s, t, v: (s, t + 1, v), id="next-step"),
        pytest.param(lambda s, t, v: (s + 1, t, v), id="next-seed"),
        pytest.param(lambda s, t, v: (s ^ (1 << 32), t, v), id="seed-high-word"),
        pytest.param(lambda s, t, v: (t, s, v), id="seed-step-swapped"),
    ],
)
def test_uniform_is_independent_across_steps_and_seeds(other):
    seeds = torch.arange(32) * 1000 + 7
    steps = torch.arange(32) % 5
    a = counter_rng.uniform(seeds, steps, 4096).double()
    b = counter_rng.uniform(*other(seeds, steps, 4096)).double()
    n = a.numel()
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 4 / math.sqrt(n)
    assert _joint_chi_square(a, b) < 4


def test_uniform_is_independent_across_neighbouring_tokens():
    u = counter_rng.uniform(torch.arange(32), torch.zeros(32, dtype=torch.int64), 4097).double()
    a, b = u[:, :-1], u[:, 1:]
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 4 / math.sqrt(a.numel())
    assert _joint_chi_square(a, b) < 4


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = sampler(logits, SamplingBatch.from_lists(temperature=[0.0] * 6))
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))
    assert out.logprobs is None and out.top_token_ids is None and out.ranks is None


@pytest.mark.parametrize("use_kernels", [False, True])
def test_greedy_fast_path_gives_the_full_paths_tokens(use_kernels):
    """Greedy rows without logprobs take the argmax of the logits as they are (bf16 here); with
    logprobs wanted they go the whole way (float32 copy, scaling, cut-offs): the same tokens."""
    from pinfer import kernels

    logits = torch.randint(0, 30, (5, 49152), generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with kernels.active(use_kernels):
        fast = sampler(logits, SamplingBatch.from_lists(temperature=[0.0] * 5, top_k=[3] * 5))
        full = sampler(logits, SamplingBatch.from_lists(temperature=[0.0] * 5, top_k=[3] * 5, num_logprobs=0))
    assert fast.logprobs is None and full.logprobs is not None
    assert torch.equal(fast.token_ids, full.token_ids)
    assert torch.equal(fast.token_ids, logits.float().max(dim=-1).indices)  # the first maximum of many ties


@pytest.mark.parametrize("vocab", [10, 1024, 2000, 49152])
def test_argmax_is_the_first_maximum(vocab):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, 40, (50, vocab), generator=gen).float()  # many ties
    x[3] = -math.inf
    x[4, -1] = 100.0  # in the short tail block
    assert torch.equal(_argmax(x), x.max(dim=-1).indices)


@pytest.mark.parametrize(
    "vocab,k", [(v, k) for v in (100, 4096, 5000, 49152) for k in (1, 5, 20, 257, 1024) if k <= v]
)
def test_blockwise_topk_matches_torch_topk(vocab, k):
    gen = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(20, vocab, generator=gen)
    x[1, : vocab - 3] = -math.inf  # fewer finite values than k
    x[2, -2] = 50.0  # the largest in the ragged tail
    values, ids = _topk(x, k)
    expected = x.topk(k, dim=-1)
    assert torch.equal(values, expected.values)
    assert torch.equal(x.gather(1, ids), values)
    assert all(len(set(row)) == k for row in ids.tolist())  # no id twice


def test_greedy_ties_pick_the_lowest_token_id():
    logits = torch.zeros(3, 10)
    logits[0, [7, 3, 9]] = 5.0
    logits[1, [2, 8]] = 1.0
    out = sampler(logits, SamplingBatch.from_lists(temperature=[0.0] * 3))
    assert out.token_ids.tolist() == [3, 2, 0]


def test_banned_tokens_are_never_chosen_greedily():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    batch = SamplingBatch.from_lists(temperature=[0.0, 0.0], top_k=[1, -1], banned=[(0, 1), (1, 0), (1, 1)])
    assert sampler(logits, batch).token_ids.tolist() == [2, 2]


# ---------------------------------------------------------------- random draws


def test_banned_tokens_are_never_sampled():
    logits = zipf_logits(32)
    favourite = int(logits.argmax())
    for extra in ({}, {"top_k": 1}, {"top_p": 0.3}, {"min_p": 0.5}):
        tokens = draw_many(logits, 2000, banned=(favourite, 5), **extra)
        assert favourite not in tokens.tolist() and 5 not in tokens.tolist()
    # top_k=1 with the top token banned: the best allowed token, every time.
    tokens = draw_many(logits, 200, banned=(favourite,), top_k=1)
    expected = int(logits.masked_fill(torch.arange(32) == favourite, -math.inf).argmax())
    assert set(tokens.tolist()) == {expected}


def _mixed_rows():
    """Rows of every kind, as keyword dicts for from_lists (one value each)."""
    return [
        dict(temperature=1.0, seeds=11, steps=0),
        dict(temperature=0.0, seeds=0, steps=4, top_k=3),
        dict(temperature=0.7, seeds=12, steps=3, top_k=20),
        dict(temperature=1.3, seeds=13, steps=9, top_p=0.8),
        dict(temperature=1.0, seeds=14, steps=1, min_p=0.1),
        dict(temperature=0.9, seeds=15, steps=2, top_k=50, top_p=0.9, min_p=0.02),
        dict(temperature=1.0, seeds=16, steps=5, top_p=0.95, processed=True),
        dict(temperature=0.0, seeds=0, steps=0, processed=True, min_p=0.3),
        dict(temperature=0.5, seeds=17, steps=8, top_k=1),
    ]


def _batch(rows, num_logprobs=-1, banned=()):
    keys = ("temperature", "top_k", "top_p", "min_p", "seeds", "steps", "processed")
    defaults = dict(top_k=-1, top_p=1.0, min_p=0.0, processed=False)
    lists = {k: [r.get(k, defaults.get(k)) for r in rows] for k in keys}
    return SamplingBatch.from_lists(**lists, num_logprobs=num_logprobs, banned=banned)


def test_same_seed_and_step_give_the_same_token_wherever_the_row_is():
    gen = torch.Generator().manual_seed(1)
    rows = _mixed_rows()
    logits = torch.randn(len(rows), 1000, generator=gen) * 3
    base = sampler(logits, _batch(rows)).token_ids
    assert torch.equal(sampler(logits, _batch(rows)).token_ids, base)  # again
    # Permuted, and mixed into a larger batch of other requests.
    perm = torch.randperm(len(rows), generator=gen)
    assert torch.equal(sampler(logits[perm], _batch([rows[i] for i in perm])).token_ids, base[perm])
    others = [dict(temperature=1.0, seeds=100 + i, steps=i, top_p=0.5) for i in range(7)]
    big_logits = torch.cat([torch.randn(7, 1000, generator=gen), logits])
    assert torch.equal(sampler(big_logits, _batch(others + rows)).token_ids[7:], base)
    # Each row alone.
    for i, row in enumerate(rows):
        assert sampler(logits[i : i + 1], _batch([row])).token_ids.item() == base[i]


def test_candidate_noise_draws_the_same_tokens_as_full_vocabulary_noise():
    # Rows of every path: settled by the first candidates, by wider ones (near-
    # flat rows), sorted whole, top-k ties past the candidates, no cut-off, greedy.
    gen = torch.Generator().manual_seed(2)
    n, vocab = 120, 10000
    logits = torch.randn(n, vocab, generator=gen) * 2
    logits[::7] = torch.rand(len(logits[::7]), vocab, generator=gen)
    logits[5, :300] = 9.0
    batch = SamplingBatch.from_lists(
        temperature=[(0.8, 1.0, 0.0, 1.3)[i % 4] for i in range(n)],
        top_k=[(5, 40, -1, -1, 200)[i % 5] for i in range(n)],
        top_p=[(1.0, 0.9, 0.7, 0.5, 0.99, 1.0)[i % 6] for i in range(n)],
        min_p=[(0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.001)[i % 7] for i in range(n)],
        seeds=list(range(n)),
        steps=[7] * n,
    )
    assert torch.equal(sampler(logits, batch).token_ids, Sampler(candidate_noise=False)(logits, batch).token_ids)


def test_top_k_at_least_the_vocabulary_keeps_everything_and_seeds_may_be_any_int():
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(13))
    rows = [
        dict(temperature=1.0, seeds=2**70 + 5, steps=0, top_k=10**6, processed=True),
        dict(temperature=1.0, seeds=4, steps=0, top_k=7),
    ]
    out = sampler(logits[:2], _batch(rows, num_logprobs=300))
    assert torch.isfinite(out.top_logprobs[0]).all() and torch.isfinite(out.top_logprobs[1]).sum() == 300
    same_bits = dict(rows[0], seeds=5)  # seeds are taken modulo 2**64
    assert sampler(logits[:1], _batch([same_bits])).token_ids.item() == out.token_ids[0]


def test_different_seeds_or_steps_give_different_draws():
    logits = torch.zeros(1, 1000)  # uniform: any two independent draws differ with p = 0.999
    n = 200
    by_seed = sampler(
        logits.expand(n, -1), SamplingBatch.from_lists(temperature=[1.0] * n, seeds=list(range(n)), steps=[0] * n)
    ).token_ids
    by_step = sampler(
        logits.expand(n, -1), SamplingBatch.from_lists(temperature=[1.0] * n, seeds=[5] * n, steps=list(range(n)))
    ).token_ids
    assert len(set(by_seed.tolist())) > 170 and len(set(by_step.tolist())) > 170
    assert (by_seed != by_step).float().mean() > 0.95


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_match_the_tempered_distribution(temperature):
    logits = zipf_logits(24, seed=3)
    tokens = draw_many(logits, 40000, temperature=temperature)
    probs = torch.softmax(logits.double() / temperature, 0)
    assert chi_square_z(torch.bincount(tokens, minlength=24), probs) < 4


@pytest.mark.parametrize(
    "cut",
    [
        dict(top_k=5),
        dict(top_p=0.6),
        dict(top_p=0.9, temperature=0.5),
        dict(min_p=0.15),
        dict(top_k=8, top_p=0.7, min_p=0.2, temperature=1.5),
    ],
    ids=["top_k", "top_p", "top_p-tempered", "min_p", "all"],
)
def test_cutoffs_keep_exactly_the_defined_set_with_the_right_frequencies(cut):
    logits = zipf_logits(40, seed=4)
    expected = reference_processed(logits, **cut)
    kept = torch.isfinite(expected)
    assert 2 <= kept.sum() < 40
    tokens = draw_many(logits, 30000, **cut)
    counts = torch.bincount(tokens, minlength=40)
    assert set(tokens.tolist()) == set(kept.nonzero().flatten().tolist())
    assert chi_square_z(counts[kept], torch.softmax(expected[kept], 0)) < 4


def test_top_k_keeps_the_five_most_likely():
    logits = zipf_logits(64, seed=5)
    tokens = draw_many(logits, 5000, top_k=5)
    assert set(tokens.tolist()) == set(logits.topk(5).indices.tolist())


def test_top_p_beyond_the_first_candidates_widens_only_where_needed():
    # Near-flat rows hold thousands of tokens in their nucleus, past the first
    # TOP_P_WIDTH candidates and past the next width too; peaked rows are
    # settled by the first or the second width; top_k inside the first width
    # settles a row at once.
    gen = torch.Generator().manual_seed(6)
    vocab = 10000
    flat = torch.rand(3, vocab, generator=gen) * 0.5
    peaked = zipf_logits(vocab, seed=7).expand(3, -1)
    logits = torch.cat([flat, peaked])
    top_p = [0.9, 0.5, 0.99, 0.9, 0.5, 0.99]
    top_k = [-1, -1, 100, -1, -1, -1]
    rows = [dict(temperature=1.0, seeds=i, steps=0, top_p=p, top_k=k) for i, (p, k) in enumerate(zip(top_p, top_k))]
    out = sampler(logits, _batch(rows))
    processed = sampler(logits, _batch([{**r, "processed": True} for r in rows], num_logprobs=0))
    assert torch.equal(processed.token_ids, out.token_ids)
    for i in range(len(rows)):
        ref_lp = torch.log_softmax(reference_processed(logits[i], top_p=top_p[i], top_k=top_k[i]), 0)
        token = out.token_ids[i]
        assert torch.isfinite(ref_lp[token])
        assert processed.logprobs[i].item() == pytest.approx(ref_lp[token].item(), abs=1e-5)
        assert processed.ranks[i] == int((ref_lp >= ref_lp[token]).sum())


def test_top_k_ties_past_the_candidates_are_kept():
    logits = torch.zeros(2, 3000)
    logits[:, :10] = 2.0  # ten tied tokens, top_k=4 keeps all of them
    rows = [dict(temperature=1.0, seeds=s, steps=0, top_k=4, processed=True) for s in (1, 2)]
    out = sampler(logits, _batch(rows, num_logprobs=12))
    assert (out.token_ids < 10).all()
    assert torch.allclose(out.top_logprobs[:, :10], torch.full((2, 10), -math.log(10)))
    assert torch.isinf(out.top_logprobs[:, 10:]).all()


# ---------------------------------------------------------------- logprobs


def test_raw_logprobs_are_log_softmax_of_the_logits():
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(5, 300, generator=gen) * 4).to(torch.bfloat16)
    settings = [(0, -1), (1, 5), (0.3, -1), (2, 50), (1, -1)]
    rows = [dict(temperature=t, seeds=i, steps=0, top_k=k) for i, (t, k) in enumerate(settings)]
    out = sampler(logits, _batch(rows, num_logprobs=4, banned=[(1, 7)]))
    expected = torch.log_softmax(logits.float(), dim=-1)
    chosen = expected.gather(1, out.token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.logprobs, chosen, atol=1e-6, rtol=0)
    top = expected.topk(4, dim=-1)
    torch.testing.assert_close(out.top_logprobs, top.values, atol=1e-6, rtol=0)
    # bf16 logits tie often; tied alternatives may come in any order.
    assert torch.equal(expected.gather(1, out.top_token_ids), out.top_logprobs)
    assert torch.equal(out.ranks, (expected >= chosen.unsqueeze(1)).sum(dim=-1))
    assert out.ranks[0] == 1 and out.top_token_ids.dtype == torch.int64


def test_processed_logprobs_are_log_softmax_of_the_sampled_distribution():
    gen = torch.Generator().manual_seed(9)
    rows = _mixed_rows()
    logits = torch.randn(len(rows), 200, generator=gen) * 3
    banned = [(0, 3), (2, 3), (5, 10)]
    out = sampler(logits, _batch([{**r, "processed": True} for r in rows], num_logprobs=200, banned=banned))
    for i, row in enumerate(rows):
        ref = reference_processed(
            logits[i],
            temperature=row["temperature"],
            top_k=row.get("top_k", -1),
            top_p=row.get("top_p", 1.0),
            min_p=row.get("min_p", 0.0),
            banned=[t for r, t in banned if r == i],
        )
        ref_lp = torch.log_softmax(ref, 0)
        token = out.token_ids[i]
        assert torch.isfinite(ref[token])
        assert out.logprobs[i].item() == pytest.approx(ref_lp[token].item(), abs=1e-5)
        # Alternatives: the kept tokens, most likely first, then -inf for the rest.
        n_kept = int(torch.isfinite(ref).sum())
        top = out.top_logprobs[i]
        assert torch.isinf(top[n_kept:]).all() and torch.isfinite(top[:n_kept]).all()
        assert (top[:-1] >= top[1:]).all()
        assert set(out.top_token_ids[i, :n_kept].tolist()) == set(torch.isfinite(ref).nonzero().flatten().tolist())
        expected_top = ref_lp.sort(descending=True).values[:n_kept]
        torch.testing.assert_close(top[:n_kept].double(), expected_top, atol=1e-5, rtol=0)
        assert out.ranks[i] == int((ref_lp >= ref_lp[token]).sum())


def test_raw_and_processed_rows_in_one_batch():
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(4, 100, generator=gen) * 2
    rows = [dict(temperature=0.5, seeds=i, steps=0, top_k=10, processed=i % 2 == 1) for i in range(4)]
    out = sampler(logits, _batch(rows, num_logprobs=2))
    raw = torch.log_softmax(logits, dim=-1)
    for i in range(4):
        if i % 2:
            expected = torch.log_softmax(reference_processed(logits[i], temperature=0.5, top_k=10), 0).float()
        else:
            expected = raw[i]
        assert out.logprobs[i].item() == pytest.approx(expected[out.token_ids[i]].item(), abs=1e-5)
        torch.testing.assert_close(out.top_logprobs[i], expected.topk(2).values, atol=1e-5, rtol=0)


def test_zero_logprobs_means_chosen_token_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(11))
    out = sampler(logits, SamplingBatch.from_lists(temperature=[1.0] * 3, seeds=[1, 2, 3], num_logprobs=0))
    assert out.logprobs.shape == (3,) and out.ranks.shape == (3,)
    assert out.top_token_ids.shape == (3, 0) and out.top_logprobs.shape == (3, 0)


# ---------------------------------------------------------------- batches


def test_mixed_batch_equals_each_row_sampled_alone():
    gen = torch.Generator().manual_seed(12)
    rows = _mixed_rows()
    logits = torch.randn(len(rows), 3000, generator=gen) * 2.5
    banned = [(0, int(logits[0].argmax())), (3, 1), (4, 2)]
    together = sampler(logits, _batch(rows, num_logprobs=3, banned=banned))
    for i, row in enumerate(rows):
        alone = sampler(logits[i : i + 1], _batch([row], num_logprobs=3, banned=[(0, t) for r, t in banned if r == i]))
        assert alone.token_ids.item() == together.token_ids[i]
        assert alone.ranks.item() == together.ranks[i]
        torch.testing.assert_close(alone.logprobs, together.logprobs[i : i + 1], atol=1e-6, rtol=0)
        torch.testing.assert_close(alone.top_logprobs, together.top_logprobs[i : i + 1], atol=1e-6, rtol=0)
    assert together.token_ids[0] != banned[0][1]


def test_build_from_sampling_params():
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.8, top_k=0, top_p=0.9, logprobs_mode="processed"),
        SamplingParams(min_p=0.1, logprobs=5),
    ]
    batch = SamplingBatch.from_params(params, seeds=[1, 2, 3], steps=[0, 4, 1], banned=[(2, 0)])
    assert batch.top_k.tolist() == [-1, -1, -1]
    assert batch.processed_logprobs.tolist() == [False, True, False]
    assert batch.num_logprobs == 5
    assert (batch.all_greedy, batch.all_random, batch.needs_filtering) == (False, False, True)
    assert batch.banned_rows.tolist() == [2] and batch.banned_tokens.tolist() == [0]
    out = sampler(torch.randn(3, 20), batch)
    assert out.top_logprobs.shape == (3, 5)
    with pytest.raises(ValueError, match="seeds"):
        SamplingBatch.from_lists(temperature=[1.0])
