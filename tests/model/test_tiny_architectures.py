"""Llama, Mistral, Qwen2, Qwen3: tiny random models built with transformers and
saved as safetensors; pinfer loads them with its own model code and must match
transformers' logprobs for prefill, chunked prefill and decode through the paged cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from pinfer import LLM, SamplingParams
from tiny_models import decode_logprob_diff, hf_logprobs, prompt_logprob_table, save_checkpoint

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "llama-tied-llama3-rope": lambda: LlamaConfig(
        **COMMON, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0),
    "llama-linear-rope": lambda: LlamaConfig(**COMMON, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),  # q/k/v biases
    "qwen3": lambda: Qwen3Config(**{**COMMON, "head_dim": 32}),  # q/k norms, head_dim != hidden / heads
}


def build_checkpoint(name: str, directory, tokenizer_dir):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    save_checkpoint(model, directory, tokenizer_dir)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logprobs_match_transformers(name, tmp_path, tokenizer_dir):
    hf = build_checkpoint(name, tmp_path, tokenizer_dir)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    expected = [hf_logprobs(hf, p) for p in prompts]

    for max_batched in (2048, 3):  # whole prefill, then 3-token chunks read back through the paged cache
        llm = LLM(str(tmp_path), dtype="float32", block_size=4, max_num_batched_tokens=max_batched,
                  kv_cache_memory="4MiB")
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        for prompt, ref, out in zip(prompts, expected, llm.generate(prompts, params, use_tqdm=False)):
            ours = prompt_logprob_table(out)
            theirs = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
            assert (ours - theirs).abs().max().item() < 1e-4, (name, max_batched)

    # decode: greedy tokens and their raw logprobs against a forward pass over the whole sequence
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, kv_cache_memory="4MiB")
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        assert decode_logprob_diff(hf, prompt, out.outputs[0]) < 1e-4
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
