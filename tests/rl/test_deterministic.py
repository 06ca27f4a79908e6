"""Deterministic (batch-invariant) mode: a request's tokens and logprobs are
bitwise the same alone, in a batch of 16 mixed-length requests, with chunked
prefill and under forced preemption; and still agree with transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pinfer import LLM, SamplingParams
from pinfer.errors import PinferError
from pinfer.model.batch_invariant import BatchInvariantMode, batch_invariant_linear
from smollm2_prompts import USER_MESSAGES

TARGET = "What is 17 + 25? Explain step by step."
# 16 neighbours of mixed lengths (about 5 to 60 tokens).
OTHERS = [f"Note {i}: " + USER_MESSAGES[i % len(USER_MESSAGES)] * (1 + i % 2) for i in range(16)]
PARAMS = [
    SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True, logprobs=2),  # an RL rollout
    SamplingParams(temperature=0.8, top_k=20, max_tokens=12, seed=3, ignore_eos=True, logprobs=0,
                   logprobs_mode="processed"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_rows_do_not_depend_on_the_batch(dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1728, 576, generator=gen).to(dtype)
    bias = torch.randn(1728, generator=gen).to(dtype)
    x = torch.randn(100, 576, generator=gen).to(dtype)
    full = batch_invariant_linear(x, weight, bias)
    for rows in (1, 2, 7, 31, 32, 33, 64):
        assert torch.equal(batch_invariant_linear(x[:rows], weight, bias), full[:rows]), rows
    with BatchInvariantMode():  # nn.Linear goes through it
        assert torch.equal(F.linear(x[:5], weight, bias), full[:5])
    torch.testing.assert_close(full.float(), F.linear(x, weight, bias).float(),
                               **({} if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)))


def _results(outputs) -> list:
    return [[(c.token_ids, c.token_logprobs, [[(t, e.logprob) for t, e in entry.items()] for entry in c.logprobs])
             for c in out.outputs] for out in outputs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_tokens_and_logprobs_alone_batched_chunked_and_preempted(smollm2_gguf, dtype):
    llm = LLM(str(smollm2_gguf), dtype=dtype, deterministic=True)
    alone = [_results(llm.generate([TARGET], p, use_tqdm=False))[0] for p in PARAMS]
    # The target twice among 16 others of mixed lengths and settings: once with each
    # PARAMS (the second time its prompt comes from the prefix cache).
    requests = OTHERS[:3] + [TARGET] + OTHERS[3:8] + [TARGET] + OTHERS[8:]
    params = [PARAMS[i % 2] for i in range(len(requests))]
    params[3], params[9] = PARAMS[0], PARAMS[1]
    mixed = _results(llm.generate(requests, params, use_tqdm=False))
    assert mixed[3] == alone[0] and mixed[9] == alone[1]

    # A pool of 11 blocks for 18 requests and a 48-token step budget: prompts are
    # prefilled in chunks and sequences are preempted and recomputed over and over.
    tight = LLM(str(smollm2_gguf), dtype=dtype, deterministic=True, enable_prefix_caching=False,
                kv_cache_memory=_pool_bytes(llm, 11), max_num_batched_tokens=48)
    squeezed = _results(tight.generate(requests, params, use_tqdm=False))
    print(f"{dtype}: {tight.engine.scheduler.num_preemptions} preemptions in the tight engine")
    assert tight.engine.scheduler.num_preemptions > 0
    assert squeezed == mixed  # every request, not only the target


def _pool_bytes(llm: LLM, num_blocks: int) -> int:
    from pinfer.engine.model_runner import kv_bytes_per_block

    engine = llm.engine
    return num_blocks * kv_bytes_per_block(engine.model_config, engine.config.block_size, engine.dtype)


def test_deterministic_logprobs_still_match_transformers(smollm2_gguf, hf_smollm2, hf_tokenizer):
    llm = LLM(str(smollm2_gguf), dtype="float32", deterministic=True)
    out = llm.generate([TARGET], PARAMS[0], use_tqdm=False)[0]
    prompt, completion = out.prompt_token_ids, out.outputs[0].token_ids
    with torch.no_grad():
        logits = hf_smollm2(torch.tensor([prompt + completion])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1].gather(1, torch.tensor(completion)[:, None])
    diff = (expected.squeeze(1) - torch.tensor(out.outputs[0].token_logprobs)).abs().max().item()
    print(f"deterministic float32 vs transformers: max |logprob diff| = {diff:.2e}")
    assert diff < 1e-4


def test_deterministic_mode_refuses_another_attention_backend(smollm2_gguf):
    with pytest.raises(PinferError, match="batch_invariant"):
        LLM(str(smollm2_gguf), deterministic=True, attention_backend="paged")
