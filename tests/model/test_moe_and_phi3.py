"""Mixture-of-experts (Qwen3-MoE, Qwen2-MoE, Mixtral) and Phi-3 (fused checkpoint
tensors, partial rotary): tiny random transformers models saved with
save_pretrained, loaded by pinfer, logprobs compared through prefill, chunked
prefill and decode through the paged cache (same approach as test_tiny_architectures)."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, MixtralConfig, Phi3Config, Qwen2MoeConfig,
                          Qwen3MoeConfig)

from pinfer import LLM, SamplingParams
from pinfer.config import ModelConfig
from tiny_models import decode_logprob_diff, hf_logprobs, prompt_logprob_table, save_checkpoint

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)

CONFIGS = {
    # layer 1 dense (mlp_only_layers); top-2 of 8, renormalised
    "qwen3-moe": lambda: Qwen3MoeConfig(**COMMON, **MOE, norm_topk_prob=True, mlp_only_layers=[1]),
    # raw softmax weights + the sigmoid-gated shared expert; every 2nd layer sparse
    "qwen2-moe": lambda: Qwen2MoeConfig(**COMMON, **MOE, norm_topk_prob=False, shared_expert_intermediate_size=48,
                                        decoder_sparse_step=2),
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "phi3": lambda: Phi3Config(**COMMON),
    "phi3-partial-rotary": lambda: Phi3Config(**COMMON, partial_rotary_factor=0.75),  # Phi-4-mini style
}


def build_checkpoint(name: str, directory, tokenizer_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32, attn_implementation="eager").eval()
    save_checkpoint(model, directory, tokenizer_dir)
    return model


def config_of(name: str) -> ModelConfig:
    hf = CONFIGS[name]()
    hf.architectures = [type(AutoModelForCausalLM.from_config(hf)).__name__]
    return ModelConfig.from_hf_config(hf.to_dict())


def test_moe_config_fields():
    qwen2 = config_of("qwen2-moe")
    assert [qwen2.is_moe_layer(i) for i in range(3)] == [False, True, False]
    assert qwen2.shared_expert_intermediate_size == 48 and not qwen2.norm_topk_prob
    qwen3 = config_of("qwen3-moe")
    assert [qwen3.is_moe_layer(i) for i in range(3)] == [True, False, True]
    mixtral = config_of("mixtral")
    assert mixtral.num_experts == 4 and mixtral.norm_topk_prob and mixtral.moe_intermediate_size == 128
    phi = config_of("phi3-partial-rotary")
    assert phi.rope.partial_rotary_factor == 0.75


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logprobs_match_transformers(name, tmp_path, tokenizer_dir):
    hf = build_checkpoint(name, tmp_path, tokenizer_dir)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    expected = [hf_logprobs(hf, p) for p in prompts]
    diffs = []

    for max_batched in (2048, 3):  # whole prefill, then 3-token chunks read back through the paged cache
        llm = LLM(str(tmp_path), dtype="float32", block_size=4, max_num_batched_tokens=max_batched,
                  kv_cache_memory="4MiB")
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        for prompt, ref, out in zip(prompts, expected, llm.generate(prompts, params, use_tqdm=False)):
            ours = prompt_logprob_table(out)
            theirs = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
            diffs.append((ours - theirs).abs().max().item())
            assert diffs[-1] < 1e-4, (name, max_batched)

    # decode: greedy tokens and their raw logprobs against a forward pass over the whole sequence
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, kv_cache_memory="4MiB")
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        diffs.append(decode_logprob_diff(hf, prompt, out.outputs[0]))
        assert diffs[-1] < 1e-4
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    print(f"{name}: max abs logprob diff {max(diffs):.2e}")


def test_router_uses_several_experts(tmp_path, tokenizer_dir):
    """The random router really spreads tokens over experts (else the MoE test proves little)."""
    build_checkpoint("qwen3-moe", tmp_path, tokenizer_dir)
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, kv_cache_memory="4MiB")
    block = llm.engine.runner.model.layers[0].mlp
    x = llm.engine.runner.model.embed_tokens(torch.arange(3, 103))
    used = torch.topk(block.gate(x), 2, dim=-1).indices.unique()
    assert len(used) >= 6


def test_fused_3d_expert_tensors_load(tmp_path, tokenizer_dir):
    """transformers 5 keeps experts fused in memory ([E, 2I, H]); a state_dict pushed from it
    (e.g. live weight updates from an HF policy) loads to the same parameters."""
    hf = build_checkpoint("qwen3-moe", tmp_path, tokenizer_dir)
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, kv_cache_memory="4MiB")
    model = llm.engine.runner.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.data.zero_()
    loaded = model.load_weights(hf.state_dict().items(), validate_first=True)
    assert model.expected_weight_keys() <= loaded
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dynamic_ntk_rope_matches_at_full_length(tmp_path, tokenizer_dir):
    """Dynamic NTK: pinfer freezes the frequencies at max_position_embeddings * factor (as vLLM
    does; the context grows to that length). transformers derives them from the current
    sequence length, so the two agree exactly for a forward of that full length: checked here
    for prompt logprobs and for greedy decode ending at the full length."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "max_position_embeddings": 32},
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    save_checkpoint(hf, tmp_path, tokenizer_dir)
    full_len = 64
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (full_len,), generator=gen).tolist()

    llm = LLM(str(tmp_path), dtype="float32", block_size=4, max_num_batched_tokens=5, kv_cache_memory="4MiB")
    assert llm.engine.max_model_len == full_len
    # prompt logprobs of 63 tokens; transformers sees all 64 so that its seq_len is the full length
    out = llm.generate([ids[:-1]], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                       use_tqdm=False)[0]
    ref = hf_logprobs(hf, ids)[: full_len - 2].gather(1, torch.tensor(ids[1:-1])[:, None]).squeeze(1)
    prompt_diff = (prompt_logprob_table(out) - ref).abs().max().item()
    assert prompt_diff < 1e-4

    prompt = ids[:56]  # 8 decode steps end exactly at the full length
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    full = prompt + out.token_ids
    assert len(full) == full_len
    ref = hf_logprobs(hf, full)[len(prompt) - 1 : -1]
    assert out.token_ids == ref.argmax(-1).tolist()
    decode_diff = (torch.tensor(out.token_logprobs) - ref.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1))
    assert decode_diff.abs().max().item() < 1e-4
    print(f"dynamic rope: prompt {prompt_diff:.2e}, decode {decode_diff.abs().max().item():.2e}")


def test_moe_is_batch_invariant_in_deterministic_mode(tmp_path, tokenizer_dir):
    """Experts go through F.linear (batch-invariant tiles in deterministic mode) and each token's
    expert outputs are summed in a fixed (expert) order: a request's logprobs are bitwise the
    same alone and among others, although its experts then see different numbers of tokens."""
    build_checkpoint("qwen2-moe", tmp_path, tokenizer_dir)
    llm = LLM(str(tmp_path), dtype="float32", deterministic=True, block_size=4, kv_cache_memory="4MiB")
    gen = torch.Generator().manual_seed(2)
    target, *others = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (17, 5, 40, 23, 9)]
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0, prompt_logprobs=0, ignore_eos=True)

    def result(out):
        return (out.outputs[0].token_ids, out.outputs[0].token_logprobs, prompt_logprob_table(out).tolist())

    alone = result(llm.generate([target], params, use_tqdm=False)[0])
    mixed = llm.generate(others[:2] + [target] + others[2:], params, use_tqdm=False)
    assert result(mixed[2]) == alone


def test_phi3_longrope_is_refused():
    config = Phi3Config(**COMMON, original_max_position_embeddings=128, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    hf = config.to_dict()
    hf["architectures"] = ["Phi3ForCausalLM"]
    with pytest.raises(Exception, match="longrope"):
        ModelConfig.from_hf_config(hf)
