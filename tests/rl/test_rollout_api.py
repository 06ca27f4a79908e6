"""RolloutEngine on the real SmolLM2 weights: sampled logprobs agree with
teacher-forced scoring and with transformers (the "trainer"); live weight updates
equal a fresh load; pause/abort/sleep/wake_up keep the engine consistent."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from pinfer import LLM, SamplingParams
from pinfer.errors import InvalidRequestError
from pinfer.rl import RolloutEngine
from smollm2_prompts import USER_MESSAGES, chat_prompt_ids


@pytest.fixture(scope="module")
def prompts(hf_tokenizer):
    return [chat_prompt_ids(hf_tokenizer, m) for m in USER_MESSAGES[:3]]


def hf_logprobs(hf_model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + completion])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    return lp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_sampled_logprobs_equal_scoring_and_the_trainer(smollm2_gguf, prompts, hf_smollm2):
    engine = RolloutEngine(str(smollm2_gguf), dtype="float32")
    groups = engine.generate(torch.tensor([prompts[0]]).tolist() + prompts[1:],
                             SamplingParams(temperature=1.0, max_tokens=16, seed=0, ignore_eos=True), n=2)
    assert [len(g) for g in groups] == [2, 2, 2]
    rollouts = [r for g in groups for r in g]
    assert all(r.weight_version == 0 and r.logprobs.dtype == torch.float32 for r in rollouts)
    scores = engine.score([r.prompt_token_ids for r in rollouts], [r.token_ids for r in rollouts])
    vs_score = max((s - r.logprobs).abs().max().item() for s, r in zip(scores, rollouts))
    vs_trainer = max((hf_logprobs(hf_smollm2, r.prompt_token_ids, r.token_ids) - r.logprobs).abs().max().item()
                     for r in rollouts)
    print(f"max |engine - score| = {vs_score:.2e}, max |engine - transformers| = {vs_trainer:.2e}")
    assert vs_score < 1e-4 and vs_trainer < 1e-4


def perturbed_state_dict(hf_model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: (t + 0.02 * t.std() * torch.randn(t.shape, generator=gen)) if t.dim() == 2 else t.clone()
            for name, t in hf_model.state_dict().items()}


def test_update_weights_equals_a_fresh_engine_with_the_new_weights(smollm2_gguf, smollm2_hf_dir, hf_smollm2,
                                                                  prompts, tmp_path):
    new_weights = perturbed_state_dict(hf_smollm2)
    folder = tmp_path / "updated"
    folder.mkdir()
    for f in smollm2_hf_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    save_file({k: v.contiguous() for k, v in new_weights.items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)

    engine = RolloutEngine(str(smollm2_gguf), dtype="float32")
    before = engine.generate(prompts, params)
    version = engine.update_weights(new_weights)
    print(f"update_weights for SmolLM2 (float32, {len(new_weights)} tensors): {engine.last_update_seconds:.3f} s")
    after = engine.generate(prompts, params)
    fresh = RolloutEngine(str(folder), dtype="float32").generate(prompts, params)
    assert version == 1 and all(g[0].weight_version == 1 for g in after)
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in fresh]
    for a, f in zip(after, fresh):
        assert torch.equal(a[0].logprobs, f[0].logprobs)


def test_update_weights_rejects_bad_names_and_shapes_without_changing_anything(smollm2_gguf, prompts):
    engine = RolloutEngine(str(smollm2_gguf), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = engine.generate(prompts[:1], params)[0][0].token_ids
    norm = torch.zeros(576)
    with pytest.raises(ValueError, match="has shape"):  # the first tensor is fine, the second is not
        engine.update_weights([("model.norm.weight", norm), ("model.layers.0.mlp.down_proj.weight", torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="has no place"):
        engine.update_weights({"model.layers.0.mlp.nonsense.weight": torch.zeros(2)})
    assert engine.weight_version == 0
    assert engine.generate(prompts[:1], params)[0][0].token_ids == before


def test_pause_abort_resume(smollm2_llm):
    engine = smollm2_llm.engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    keep = engine.add_request("Tell me about the moon.", params)
    drop = engine.add_request("Tell me about the sun.", params)
    for _ in range(4):
        engine.step()
    engine.pause()
    generated = engine.num_generated_tokens
    assert engine.step() == [] and engine.num_generated_tokens == generated
    with pytest.raises(InvalidRequestError, match="paused"):
        smollm2_llm.generate("x", params, use_tqdm=False)
    partial = engine.abort_request(drop)
    assert partial.finished and partial.outputs[0].finish_reason == "abort"
    assert 0 < len(partial.outputs[0].token_ids) < 40
    engine.resume()
    finished = None
    while finished is None:
        finished = next((o for o in engine.step() if o.request_id == keep and o.finished), None)
    assert len(finished.outputs[0].token_ids) == 40
    alone = smollm2_llm.generate("Tell me about the moon.", params, use_tqdm=False)[0]
    assert finished.outputs[0].token_ids == alone.outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_sleep_releases_the_kv_pool_and_wake_up_restores_service(smollm2_gguf):
    llm = LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory="768MiB")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    before = llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0].token_ids
    # Blocks are zeroed on first use (tests/engine/test_kv_pool_memory.py): touch them all, as
    # if every block had been used, so that the whole pool is resident before sleeping.
    runner = llm.engine.runner
    runner.zero_new_blocks(torch.arange(runner.num_blocks)[None])
    rss_awake = rss_bytes()
    llm.engine.sleep()
    rss_asleep = rss_bytes()
    print(f"RSS awake {rss_awake / 2**20:.0f} MiB, asleep {rss_asleep / 2**20:.0f} MiB")
    assert rss_awake - rss_asleep > 600 * 2**20  # the pool's 768 MiB went back to the OS
    with pytest.raises(InvalidRequestError, match="asleep"):
        llm.generate("hi", params, use_tqdm=False)
    llm.engine.wake_up()
    assert llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0].token_ids == before


def test_sleep_refuses_while_requests_are_unfinished(smollm2_llm):
    engine = smollm2_llm.engine
    rid = engine.add_request("Hello", SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="unfinished requests"):
        engine.sleep()
    engine.abort_request(rid)


def test_sleep_level_2_drops_the_weights_too(smollm2_gguf, hf_smollm2, prompts):
    engine = RolloutEngine(str(smollm2_gguf), dtype="float32", kv_cache_memory="64MiB")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    before = engine.generate(prompts[:2], params)
    rss_awake = rss_bytes()
    engine.sleep(level=2)
    rss_asleep = rss_bytes()
    print(f"sleep(level=2): RSS awake {rss_awake / 2**20:.0f} MiB, asleep {rss_asleep / 2**20:.0f} MiB")
    assert rss_awake - rss_asleep > 450 * 2**20  # 540 MB of float32 weights and the 64 MiB pool
    engine.wake_up()  # re-reads the checkpoint
    again = engine.generate(prompts[:2], params)
    assert [(g[0].token_ids, g[0].logprobs.tolist()) for g in again] == \
        [(g[0].token_ids, g[0].logprobs.tolist()) for g in before]

    # A trainer about to push its own weights skips the reload; until it has pushed all, no requests.
    engine.sleep(level=2)
    engine.wake_up(reload_weights=False)
    with pytest.raises(InvalidRequestError, match="still owes"):
        engine.generate(prompts[:1], params)
    state = hf_smollm2.state_dict()
    engine.update_weights({k: v for k, v in state.items() if "layers.0." not in k})
    with pytest.raises(InvalidRequestError, match="still owes"):
        engine.generate(prompts[:1], params)
    engine.update_weights({k: v for k, v in state.items() if "layers.0." in k})
    restored = engine.generate(prompts[:2], params)
    assert [g[0].token_ids for g in restored] == [g[0].token_ids for g in before]


def test_sleep_rejects_an_unknown_level(smollm2_llm):
    with pytest.raises(InvalidRequestError, match="level"):
        smollm2_llm.engine.sleep(level=3)
