"""Every bad input gets a clear error naming the problem before any work starts,
and the engine keeps serving afterwards."""

from __future__ import annotations

import json

import pytest

from pinfer import LLM, SamplingParams
from pinfer.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, UnsupportedArchitectureError


def test_unknown_model_says_what_is_accepted():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'no-such-model'.*Accepted: an alias \(gemma3-270m, smollm2-135m\)"):
        LLM("no-such-model")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_head": 2}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_corrupt_safetensors(smollm2_hf_dir, tmp_path):
    for f in smollm2_hf_dir.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot read safetensors file .*model.safetensors"):
        LLM(str(tmp_path))


def test_truncated_safetensors(smollm2_hf_dir, tmp_path):
    for f in smollm2_hf_dir.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    data = (smollm2_hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(tmp_path))


def test_truncated_gguf(smollm2_gguf, tmp_path):
    data = smollm2_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        LLM(str(cut))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be -1"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(logprobs_mode="soft"), "logprobs_mode must be 'raw' or 'processed'"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt, params, message", [
    ("", SamplingParams(), "prompt is empty"),
    ([], SamplingParams(), "no prompts given"),
    ([[]], SamplingParams(), "prompt is empty"),
    ([[1, 2, 49152]], SamplingParams(), r"token ids outside the vocabulary \[0, 49152\): \[49152\]"),
    ([[-1, 5]], SamplingParams(), "token ids outside the vocabulary"),
    ("Hello", SamplingParams(max_tokens=9000), r"exceeds the model's context length of 8192 tokens"),
    ("Hello", SamplingParams(stop_token_ids=[10**6]), "stop_token_ids outside the vocabulary"),
])
def test_bad_requests_fail_before_any_work(smollm2_llm, prompt, params, message):
    engine = smollm2_llm.engine
    with pytest.raises(InvalidRequestError, match=message):
        smollm2_llm.generate(prompt, params, use_tqdm=False)
    assert not engine.has_unfinished_requests() and not engine.requests


def test_one_bad_prompt_in_a_batch_queues_nothing(smollm2_llm):
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        smollm2_llm.generate(["fine prompt", ""], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not smollm2_llm.engine.has_unfinished_requests()


def test_prompt_beyond_kv_pool(smollm2_gguf):
    llm = LLM(str(smollm2_gguf), kv_cache_memory="8MiB")  # bfloat16: 8 MiB holds ~360 tokens
    capacity = llm.engine.kv_capacity_tokens
    with pytest.raises(InvalidRequestError, match=rf"needs more KV cache than the pool holds \({capacity} tokens\)"):
        llm.generate("Hello", SamplingParams(max_tokens=capacity), use_tqdm=False)


def test_engine_keeps_serving_after_bad_requests(smollm2_llm):
    for bad in ("", [[10**9]]):
        with pytest.raises(InvalidRequestError):
            smollm2_llm.generate(bad, SamplingParams(), use_tqdm=False)
    out = smollm2_llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
