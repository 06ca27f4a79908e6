"""On the real SmolLM2-135M-Instruct weights, float32: pinfer's greedy tokens and
logprobs equal transformers' (loaded by transformers' own GGUF path), batching
and preemption do not change results, and GGUF and safetensors loading agree."""

from __future__ import annotations

import pytest
import torch

from pinfer import LLM, SamplingParams
from smollm2_prompts import USER_MESSAGES, chat_prompt_ids

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def llm(smollm2_llm):
    return smollm2_llm


@pytest.fixture(scope="module")
def prompts(hf_tokenizer):
    return [chat_prompt_ids(hf_tokenizer, m) for m in USER_MESSAGES]


@pytest.fixture(scope="module")
def batch_outputs(llm, prompts):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0)
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def hf_greedy(hf_smollm2, prompts):
    results = []
    for ids in prompts:
        with torch.no_grad():
            out = hf_smollm2.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2, pad_token_id=2)
        results.append(out[0, len(ids):].tolist())
    return results


def until_eos(tokens: list[int], eos: int = 2) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_prompts_have_different_lengths(prompts):
    assert len(prompts) == 8 and len({len(p) for p in prompts}) == 8


def test_greedy_tokens_equal_transformers_generate(batch_outputs, hf_greedy):
    for ours, theirs in zip(batch_outputs, hf_greedy):
        assert until_eos(ours.outputs[0].token_ids) == until_eos(theirs)


def test_generated_logprobs_match_a_transformers_forward_pass(batch_outputs, prompts, hf_smollm2):
    worst = 0.0
    for ids, out in zip(prompts, batch_outputs):
        completion = out.outputs[0]
        full = torch.tensor([ids + completion.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(hf_smollm2(full).logits[0].float(), dim=-1)
        ref = ref[len(ids) - 1 : -1].gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
        worst = max(worst, (torch.tensor(completion.token_logprobs) - ref).abs().max().item())
    assert worst < 1e-3, worst


def test_prompt_logprobs_match_a_transformers_forward_pass(llm, prompts, hf_smollm2):
    ids = prompts[6]
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[ids[pos]].logprob - ref[pos - 1, ids[pos]].item()) < 1e-3
        top = ref[pos - 1].topk(3)
        ranked = sorted((lp for lp in entry.values() if lp.rank <= 3), key=lambda lp: lp.rank)
        ours, theirs = [lp.logprob for lp in ranked[:3]], top.values.tolist()
        assert len(ours) == 3 and max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3, (ours, theirs)


def test_each_prompt_alone_equals_the_ragged_batch(llm, prompts, batch_outputs):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    for ids, batched in zip(prompts, batch_outputs):
        alone = llm.generate([ids], params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == batched.outputs[0].token_ids


def test_forced_preemption_gives_the_same_outputs(smollm2_gguf, prompts, batch_outputs):
    # A pool of 24 blocks x 16 tokens cannot hold 8 sequences of ~60-120 tokens at once.
    small = LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory=24 * 16 * 2 * 30 * 3 * 64 * 4)
    outs = small.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for ours, ref in zip(outs, batch_outputs):
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
    bm = small.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_all_blocks_free_after_requests_finish(llm, batch_outputs):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.has_unfinished_requests()


def test_gguf_and_safetensors_loading_give_the_same_logits(llm, smollm2_hf_dir, prompts):
    from_safetensors = LLM(str(smollm2_hf_dir), dtype="float32")
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    a = llm.generate([prompts[3]], params, use_tqdm=False)[0]
    b = from_safetensors.generate([prompts[3]], params, use_tqdm=False)[0]
    diffs = [abs(x[t].logprob - y[t].logprob) for x, y, t in
             zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], prompts[3][1:])]
    assert max(diffs) < 1e-5
