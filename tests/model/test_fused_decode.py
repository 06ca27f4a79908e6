"""The decode step's decoder stack in one kernel call (model/fused_decode.py) computes the
module path's bits: the same tokens and logprobs from the real SmolLM2 weights (bf16, int8, int4;
bf16 and int8 KV caches) and from tiny Qwen2 (qkv bias) and Mistral (sliding window) checkpoints, and it steps aside
where a layer would take other ops (Qwen3's q/k norms)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

import pinfer.model.llama as llama
from pinfer import LLM, SamplingParams, kernels
from pinfer.model import fused_decode
from tiny_models import save_checkpoint

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)


@pytest.fixture(autouse=True)
def needs_the_kernel():
    if not (kernels.load() and kernels.has("decode_layers")):
        pytest.skip(f"no decode_layers kernel in this build ({kernels.status()})")


def generate_both_ways(llm: LLM, prompts, monkeypatch) -> tuple[list, list, int]:
    """(outputs with the fused stack, outputs with the modules, decode steps that fused)."""
    fused_steps = []
    real = fused_decode.decode_stack

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        fused_steps.append(out is not None)
        return out

    params = [SamplingParams(max_tokens=24, temperature=1.0, seed=7, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.0, logprobs=0, ignore_eos=True)]
    def run(decode_stack) -> list:
        monkeypatch.setattr(llama, "decode_stack", decode_stack)
        outputs = []
        for p in params:
            llm.engine.block_manager.reset_prefix_cache()  # the same prefill steps every time
            outputs.append(llm.generate(prompts, p, use_tqdm=False))
        return outputs

    return run(counting), run(lambda *args, **kwargs: None), sum(fused_steps)


def assert_same(fused, modules) -> None:
    for run_f, run_m in zip(fused, modules):
        for f, m in zip(run_f, run_m):
            assert f.outputs[0].token_ids == m.outputs[0].token_ids
            assert f.outputs[0].logprobs == m.outputs[0].logprobs  # every entry, bit for bit


@pytest.mark.parametrize("quantization,kv_cache_dtype",
                         [(None, "auto"), ("int8", "auto"), ("int4", "auto"), (None, "int8"), ("int8", "int8")])
def test_smollm2_fused_decode_has_the_module_path_bits(smollm2_gguf, quantization, kv_cache_dtype, monkeypatch):
    # the AVX2 build fuses bf16 linears over bf16 pools only: the int8/int4 GEMMs and int8 pools need AVX-512
    for op in ({"int8": ["int8_gemm"], "int4": ["int4_gemm"]}.get(quantization, [])
               + (["paged_decode_attention_int8"] if kv_cache_dtype == "int8" else [])):
        if not kernels.has(op):
            pytest.skip(f"no {op} kernel in this build ({kernels.status()})")
    llm = LLM(str(smollm2_gguf), dtype="bfloat16", quantization=quantization, kv_cache_memory="64MiB",
              kv_cache_dtype=kv_cache_dtype)
    chat = llm.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}])
    prompts = [chat, chat[:-4], chat + [1000, 2000, 3000]]
    fused, modules, fused_steps = generate_both_ways(llm, prompts, monkeypatch)
    assert fused_steps >= 2 * 23  # every decode step of both runs
    assert_same(fused, modules)


def tiny_checkpoint(tmp_path, tokenizer_dir, config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_checkpoint(model, tmp_path, tokenizer_dir)
    return tmp_path


@pytest.mark.parametrize("config", [Qwen2Config(**TINY), MistralConfig(**TINY, sliding_window=8)],
                         ids=["qwen2-qkv-bias", "mistral-window-8"])
def test_tiny_models_fused_decode_has_the_module_path_bits(tmp_path, tokenizer_dir, config, monkeypatch):
    llm = LLM(str(tiny_checkpoint(tmp_path, tokenizer_dir, config)), dtype="bfloat16", block_size=4,
              kv_cache_memory="4MiB")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 19)]  # decode runs past the window
    fused, modules, fused_steps = generate_both_ways(llm, prompts, monkeypatch)
    assert fused_steps >= 2 * 23
    assert_same(fused, modules)


def test_qwen3_qk_norms_take_the_modules(tmp_path, tokenizer_dir):
    llm = LLM(str(tiny_checkpoint(tmp_path, tokenizer_dir, Qwen3Config(**TINY, head_dim=16))), dtype="bfloat16",
              kv_cache_memory="4MiB")
    runner = llm.engine.runner
    assert fused_decode.stack_tensors(runner.model, runner.backend) is None
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_weight_updates_and_replaced_modules_reach_the_fused_stack(tmp_path, tokenizer_dir, quantization,
                                                                   monkeypatch):
    """The plan of where the tensors live is made once; the tensors are read at every step."""
    if quantization == "int8" and not kernels.has("int8_gemm"):
        pytest.skip(f"no int8_gemm kernel in this build ({kernels.status()}): int8 linears do not fuse")
    path = tiny_checkpoint(tmp_path, tokenizer_dir, Qwen2Config(**TINY))
    llm = LLM(str(path), dtype="bfloat16", quantization=quantization, kv_cache_memory="4MiB")
    runner = llm.engine.runner
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    before, _, fused_steps = generate_both_ways(llm, prompts, monkeypatch)
    assert fused_steps > 0 and runner.model.__dict__.get(fused_decode._PLAN) is not None

    trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    trained = {name: w * 1.5 if "mlp" in name else w for name, w in trained.items()}
    llm.engine.update_weights(trained)  # unpacks, writes, packs again: new tensors
    fused, modules, fused_steps = generate_both_ways(llm, prompts, monkeypatch)
    assert fused_steps > 0
    assert_same(fused, modules)  # the fused stack saw the new weights
    assert fused[0][0].outputs[0].token_ids != before[0][0].outputs[0].token_ids

    layer = runner.model.layers[1]
    layer.mlp = type(layer.mlp)(runner.model.config).to(torch.bfloat16)  # a replaced submodule, unpacked
    assert fused_decode.stack_tensors(runner.model, runner.backend) is None  # voids the plan: the modules run
