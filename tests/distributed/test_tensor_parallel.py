"""Tensor parallelism on gloo (two CPU processes): TP=2 gives TP=1's greedy tokens, logprobs and
prompt logprobs (float32, within 1e-4) and keeps deterministic mode batch-invariant; a killed
worker fails the engine loudly and quickly instead of hanging; sizes that do not split are
refused before any process starts."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from pinfer import LLM, SamplingParams
from pinfer.config import EngineConfig
from pinfer.distributed.tensor_parallel import TensorParallelError
from pinfer.errors import PinferError

# 4 heads / 2 KV heads, vocab 512, intermediate 128: everything splits by 2.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)
CONFIGS = {
    "llama-tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**COMMON),  # q/k/v biases, untied head
}
ENGINE = dict(dtype="float32", block_size=4, kv_cache_memory="4MiB", max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def tokenizer_dir(smollm2_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(smollm2_hf_dir).save_pretrained(out)
    return out


def build_checkpoint(name: str, directory, tokenizer_dir) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return str(directory)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 23, 40)]  # 23, 40: chunked prefill


def _run(llm: LLM):
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    return llm.generate(_prompts(), params, use_tqdm=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp2_matches_tp1(name, tmp_path, tokenizer_dir):
    path = build_checkpoint(name, tmp_path, tokenizer_dir)
    expected = _run(LLM(path, **ENGINE))
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    workers = [w.process for w in llm.engine.tp_group.workers]
    got = _run(llm)
    for want, out in zip(expected, got):
        a, b = want.outputs[0], out.outputs[0]
        assert b.token_ids == a.token_ids, name
        assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 1e-4
        for e_want, e_got in zip(a.logprobs, b.logprobs):  # top-3 alternatives: same ids, same values
            assert list(e_want) == list(e_got)
            assert all(abs(e_want[t].logprob - e_got[t].logprob) < 1e-4 for t in e_want)
        for e_want, e_got in zip(want.prompt_logprobs[1:], out.prompt_logprobs[1:]):
            assert set(e_want) == set(e_got)
            assert all(abs(e_want[t].logprob - e_got[t].logprob) < 1e-4 for t in e_want)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    llm.engine.close()
    assert all(p.exitcode == 0 for p in workers), [p.exitcode for p in workers]


def test_tp2_with_an_int8_kv_cache_matches_tp1(tmp_path, tokenizer_dir):
    # Each rank's pool holds its KV heads, and rows are quantized one (token, kv head) at a time,
    # so the shards store exactly what one process stores.
    path = build_checkpoint("llama-tied", tmp_path, tokenizer_dir)
    expected = _run(LLM(path, kv_cache_dtype="int8", **ENGINE))
    llm = LLM(path, tensor_parallel_size=2, kv_cache_dtype="int8", **ENGINE)
    got = _run(llm)
    for want, out in zip(expected, got):
        a, b = want.outputs[0], out.outputs[0]
        assert b.token_ids == a.token_ids
        assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 1e-4
    llm.engine.close()


def test_deterministic_mode_stays_batch_invariant(tmp_path, tokenizer_dir):
    # Each shard's linears are batch-invariant and the all-reduce is elementwise, so a request's
    # logprobs are bitwise the same alone or in a batch with other (chunked) prompts.
    llm = LLM(build_checkpoint("qwen2", tmp_path, tokenizer_dir), tensor_parallel_size=2, deterministic=True,
              **ENGINE)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True)
    alone = llm.generate([[1, 5, 7, 9, 11]], params, use_tqdm=False)[0].outputs[0]
    batched = llm.generate([[1, 5, 7, 9, 11], *_prompts()], params, use_tqdm=False)[0].outputs[0]
    assert batched.token_ids == alone.token_ids and batched.token_logprobs == alone.token_logprobs
    llm.engine.close()


def test_killed_worker_fails_loudly(tmp_path, tokenizer_dir):
    llm = LLM(build_checkpoint("llama-tied", tmp_path, tokenizer_dir), tensor_parallel_size=2, **ENGINE)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert len(llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    worker = llm.engine.tp_group.workers[0].process
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) was killed by signal SIGKILL"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    assert time.monotonic() - start < 60
    with pytest.raises(TensorParallelError, match="cannot continue"):  # and it stays failed
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    llm.engine.close()


def test_worker_killed_mid_generation_does_not_hang(tmp_path, tokenizer_dir):
    # Killed while generate() runs: between steps or inside a step's collectives (gloo sees the
    # closed connection), rank 0 must raise, not wait forever.
    llm = LLM(build_checkpoint("llama-tied", tmp_path, tokenizer_dir), tensor_parallel_size=2, **ENGINE)
    worker = llm.engine.tp_group.workers[0].process

    def kill_once_decoding():
        while llm.engine.num_generated_tokens < 32:
            time.sleep(0.001)
        os.kill(worker.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_decoding, daemon=True)
    killer.start()
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) was killed by signal SIGKILL"):
        llm.generate([[1, 2, 3]] * 8, SamplingParams(max_tokens=250, temperature=0, ignore_eos=True), use_tqdm=False)
    assert time.monotonic() - start < 60
    killer.join()
    llm.engine.close()


def test_sizes_that_do_not_split_are_refused_before_any_work(smollm2_gguf):
    # SmolLM2-135M: 9 heads, 3 KV heads.
    with pytest.raises(PinferError, match=r"tensor_parallel_size=2 must divide .*num_attention_heads\) = 9.*"
                                          r"num_key_value_heads\) = 3"):
        LLM(str(smollm2_gguf), tensor_parallel_size=2)
    assert multiprocessing.active_children() == []  # no worker was started
    for bad in (0, -1, 1.5):
        with pytest.raises(PinferError, match="tensor_parallel_size must be an integer >= 1"):
            EngineConfig(model="x", tensor_parallel_size=bad)
    with pytest.raises(PinferError, match="quantization='int8' is not supported"):
        LLM(str(smollm2_gguf), tensor_parallel_size=3, quantization="int8")
