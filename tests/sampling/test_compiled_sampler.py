"""Sampler(compile=True): its compiled plain-temperature path gives the eager path's tokens
and ranks, and its logprobs within float32 rounding; other batches take the eager path."""

from __future__ import annotations

import pytest
import torch

from pinfer.sampling.sampler import Sampler, SamplingBatch


@pytest.mark.parametrize("processed", [False, True])
def test_compiled_plain_random_path_matches_eager(processed):
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 6, 1000
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(torch.bfloat16)
    batch = SamplingBatch.from_lists(temperature=[1.0, 0.7, 1.3, 1.0, 2.0, 0.5], seeds=[11, 12, 13, 14, 15, 2**40],
                                     steps=[0, 3, 9, 1, 4, 7], processed=[processed] * rows, num_logprobs=0)
    eager, compiled = Sampler()(logits, batch), Sampler(compile=True)(logits, batch)
    assert torch.equal(compiled.token_ids, eager.token_ids)
    assert torch.equal(compiled.ranks, eager.ranks)
    assert (compiled.logprobs - eager.logprobs).abs().max().item() < 1e-5
    assert compiled.top_token_ids.shape == (rows, 0)


def test_batches_with_cutoffs_or_alternatives_take_the_eager_path():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(compile=True)
    for options in (dict(top_k=[5, -1, -1]), dict(num_logprobs=3), dict(processed=[True, False, False])):
        batch = SamplingBatch.from_lists(temperature=[1.0, 1.0, 0.8], seeds=[1, 2, 3],
                                         **{"num_logprobs": 0, **options})
        eager, compiled = Sampler()(logits, batch), sampler(logits, batch)
        assert torch.equal(compiled.token_ids, eager.token_ids)
        assert torch.equal(compiled.logprobs, eager.logprobs)  # the same code ran: bit for bit


def test_compile_is_refused_with_deterministic_mode():
    from pinfer.config import EngineConfig
    from pinfer.errors import PinferError

    with pytest.raises(PinferError, match="deterministic"):
        EngineConfig(model="unused", compile=True, deterministic=True)
