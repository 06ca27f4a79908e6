"""The llama.cpp bench peer (tools/bench_llamacpp.py):

- the weight file follows the precision (int4 = the model's own Q4_1 file; a file that is
  not Q4_0/Q4_1 is refused for int4 with the reason), and the numpy sampler is greedy =
  argmax, seeded per request, logprob = float32 log_softmax;
- with llama-cpp-python installed: tiny rollout / latency runs give exactly max_tokens per
  request and sane timings, repeat runs give the same tokens (the KV cache is cleared),
  the prompt ids are pinfer's and llama.cpp's own tokenizer makes the same ids, and greedy
  tokens on the Q4_1 file agree with pinfer's int4 until a near-tie.

The runner tests skip where llama-cpp-python is not installed (CI does not build it).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pinfer.loading.resolve import DEFAULT_MODEL, resolve_model
from pinfer.tools.bench_llamacpp import gguf_for_precision, sample, target_type
from pinfer.tools.workloads import make_workload

GREEDY_TOKENS = 12


def test_weight_file_follows_the_precision(tmp_path):
    model = resolve_model(DEFAULT_MODEL)  # Q4_1 matrices
    own = gguf_for_precision(model, "auto", "int4", cache=tmp_path)
    assert (own.path, own.type, own.converted) == (model, "Q4_1", False)
    assert [target_type(model, d, q) for d, q in (("auto", None), ("bfloat16", None), ("float32", None),
                                                   ("bfloat16", "int8"))] == ["BF16", "BF16", "F32", "Q8_0"]
    f16 = tmp_path / "f16.gguf"
    writer = gguf.GGUFWriter(f16, "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="own Q4_0/Q4_1 GGUF.*f16.gguf is F16"):
        gguf_for_precision(f16, "auto", "int4", cache=tmp_path)


def test_sampler_is_argmax_or_seeded_per_request_with_raw_logprobs():
    logits = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32) * 4
    reference = torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()
    greedy, logprobs = sample(logits, 0.0, [], True)
    assert (greedy == logits.argmax(axis=1)).all()
    np.testing.assert_allclose(logprobs, reference[np.arange(3), greedy], atol=1e-5)

    def draw(temperature: float, seeds: list[int]):
        return sample(logits, temperature, [np.random.default_rng(s) for s in seeds], True)

    tokens, logprobs = draw(1.0, [5, 6, 7])
    assert (tokens == draw(1.0, [5, 6, 7])[0]).all() and (tokens != draw(1.0, [8, 9, 10])[0]).any()
    np.testing.assert_allclose(logprobs, reference[np.arange(3), tokens], atol=1e-5)
    _, tempered = draw(0.5, [5, 6, 7])  # logprobs stay those of the raw logits at any temperature
    np.testing.assert_allclose(tempered, reference[np.arange(3), draw(0.5, [5, 6, 7])[0]], atol=1e-5)
    # Many seeded draws follow softmax(logits): the empirical mean logprob is the entropy's negative.
    probs = np.exp(reference[0])
    draws = [sample(logits[:1], 1.0, [np.random.default_rng(s)], True)[1][0] for s in range(2000)]
    assert abs(np.mean(draws) - (probs * reference[0]).sum()) < 0.15


@pytest.fixture(scope="module")
def runner():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'pinfer[bench]')")
    from pinfer.tools.bench_llamacpp import LlamaCppRunner

    # One thread: ggml's spinning barriers slow down many-fold when the test machine is oversubscribed.
    r = LlamaCppRunner({"engine": {"model": DEFAULT_MODEL, "dtype": "auto", "quantization": "int4"}, "threads": 1})
    yield r
    r.close()


@pytest.fixture(scope="module")
def pinfer_int4():
    from pinfer import LLM

    return LLM(DEFAULT_MODEL, quantization="int4", kv_cache_memory="64MiB")


def test_tiny_runs_give_exact_token_counts_and_sane_timings(runner):
    described = runner.describe()
    assert (described["gguf_type"], described["quantization"], described["threads"]) == ("Q4_1", "int4", 1)
    assert described["llama_cpp_version"] and "CMAKE_ARGS=" in described["build"]

    rollout = make_workload("rollout", max_tokens=4, num_prompts=3)
    first = runner.generate(rollout)
    assert first.tokens.shape == (3, 4) and first.logprobs.shape == (3, 4)
    assert np.isfinite(first.logprobs).all() and (first.logprobs <= 0).all()
    result = first.result
    assert [r.generated_tokens for r in result.requests] == [4, 4, 4] and result.generated_tokens == 12
    for r, ids in zip(result.requests, first.prompt_ids):
        assert r.prompt_tokens == len(ids) and 50 <= len(ids) <= 70
        assert 0 < r.ttft_s <= result.seconds and 0 < r.tpot_s < result.seconds
    again = runner.generate(rollout)  # KV cleared, seeds per request: the same tokens
    assert (again.tokens == first.tokens).all()
    np.testing.assert_allclose(again.logprobs, first.logprobs, atol=1e-4)

    latency = runner.generate(make_workload("latency", max_tokens=4))
    assert latency.tokens.shape == (1, 4) and latency.logprobs is None
    (timing,) = latency.result.requests
    assert timing.generated_tokens == 4 and 0 < timing.ttft_s and 0 < timing.tpot_s < 5


def test_prompt_ids_are_pinfers_and_llama_cpps_own(runner, pinfer_int4):
    workload = make_workload("rollout", num_prompts=8)
    conversations = list(workload.conversations) + list(make_workload("latency").conversations)
    tokenizer = pinfer_int4.get_tokenizer()
    for conversation in conversations:
        ids = runner.chat_ids(list(conversation))
        assert ids == pinfer_int4.apply_chat_template(list(conversation))
        text = tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=False)
        assert runner.llama_tokenize(text) == ids


def test_greedy_tokens_match_pinfer_int4_until_a_near_tie(runner, pinfer_int4):
    """Measured on 6 prompts x 32 tokens: the first divergence came at token 8-21 (one prompt
    agreed on all 32), and there pinfer's top two logprobs were tied to 1e-3 in 4 of 5 cases
    (bf16 logits round to ties; llama.cpp's float32 ones do not) and 0.125 apart in the
    other: int4 arithmetic differs (llama.cpp multiplies Q4_1 by Q8_1-quantized activations,
    pinfer by bf16 ones, and pinfer's head is int8 per row vs the file's Q8_0 blocks).
    The bound on the gap is bf16's own noise: pinfer with and without its CPU kernels (the same
    maths, other float32 summation orders) differs by up to 0.28 in a prompt logprob of this
    prompt, and with them the two parted here at a gap of 0.25 (token 8)."""
    from pinfer import SamplingParams

    workload = make_workload("latency", max_tokens=GREEDY_TOKENS)  # parts at token 8 (measured)
    ours = runner.generate(workload).tokens[0].tolist()
    ids = pinfer_int4.apply_chat_template(list(workload.conversations[0]))
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    theirs = pinfer_int4.generate([ids], params, use_tqdm=False)[0].outputs[0]
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs.token_ids)) if a != b), GREEDY_TOKENS)
    assert agree >= 6, (agree, ours, theirs.token_ids)
    if agree < GREEDY_TOKENS:  # where they part, llama.cpp's token is pinfer's runner-up, nearly tied
        top = theirs.logprobs[agree]
        assert ours[agree] in top, (agree, top)
        assert top[theirs.token_ids[agree]].logprob - top[ours[agree]].logprob < 0.35


def test_an_int8_kv_cache_runs_llama_cpp_with_q8_0_caches():
    """kv_cache_dtype="int8" is llama.cpp's q8_0 K and V caches (with flash attention, which a
    quantized V cache needs): the context is created and a rollout gives its tokens."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'pinfer[bench]')")
    from pinfer.tools.bench_llamacpp import LlamaCppRunner

    r = LlamaCppRunner({"engine": {"model": DEFAULT_MODEL, "dtype": "auto", "quantization": "int8",
                                   "kv_cache_dtype": "int8"}, "threads": 1})
    try:
        described = r.describe()
        assert (described["kv_cache_type"], described["gguf_type"]) == ("q8_0", "Q8_0")
        out = r.generate(make_workload("rollout", max_tokens=4, num_prompts=2))
        assert out.tokens.shape == (2, 4) and np.isfinite(out.logprobs).all()
    finally:
        r.close()
