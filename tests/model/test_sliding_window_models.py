"""Sliding-window attention end to end: a tiny random Mistral whose window (8) is much
shorter than its prompts (up to 30 tokens) and generations must match transformers'
logprobs for prefill, chunked prefill and decode past the window, with every attention
backend; plus how window settings are read from config.json."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from pinfer import LLM, SamplingParams
from pinfer.config import ModelConfig
from pinfer.engine.model_runner import kv_bytes_per_block
from pinfer.errors import UnsupportedArchitectureError
from pinfer.model.attention import ATTENTION_BACKENDS
from tiny_models import decode_logprob_diff, hf_logprobs, save_checkpoint

WINDOW = 8
MISTRAL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, initializer_range=0.1,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)
PROMPT_LENS = (5, 19, 30)  # shorter than, about twice and almost four times the window
MAX_ABS_DIFF = 1e-4


@pytest.fixture(scope="module")
def mistral(tmp_path_factory, tokenizer_dir):
    """(checkpoint dir, transformers model with the window, the same weights without it)."""
    directory = tmp_path_factory.mktemp("mistral-swa")
    torch.manual_seed(0)
    config = MistralConfig(**MISTRAL, sliding_window=WINDOW)
    # eager: transformers builds the sliding-window mask itself and applies it.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    save_checkpoint(model, directory, tokenizer_dir)
    full = AutoModelForCausalLM.from_config(MistralConfig(**MISTRAL, sliding_window=None), dtype=torch.float32,
                                            attn_implementation="eager").eval()
    full.load_state_dict(model.state_dict())
    return directory, model, full


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def test_transformers_applies_the_window(mistral) -> None:
    """Guard for the tests below: the windowed reference differs from full attention
    past the window (so matching it is evidence that pinfer applies the window)."""
    _, model, full = mistral
    ids = prompts()[-1]
    windowed, unwindowed = hf_logprobs(model, ids), hf_logprobs(full, ids)
    assert torch.equal(windowed[:WINDOW], unwindowed[:WINDOW])  # inside the window: identical
    assert (windowed[WINDOW:] - unwindowed[WINDOW:]).abs().max().item() > 1e-2


def test_max_model_len_is_not_capped_by_the_window(mistral) -> None:
    directory, _, _ = mistral
    llm = LLM(str(directory), dtype="float32", block_size=4, kv_cache_memory="4MiB")
    assert llm.engine.model_config.sliding_window == WINDOW
    assert llm.engine._max_model_len() == MISTRAL["max_position_embeddings"]


@pytest.mark.parametrize("backend", list(ATTENTION_BACKENDS))
def test_mistral_sliding_window_matches_transformers(mistral, backend: str) -> None:
    directory, model, _ = mistral
    batch = prompts()

    expected = [hf_logprobs(model, p) for p in batch]
    for max_batched in (2048, 3):  # whole prefill, then 3-token chunks read back through the paged cache
        llm = LLM(str(directory), dtype="float32", block_size=4, max_num_batched_tokens=max_batched,
                  kv_cache_memory="4MiB", attention_backend=backend)
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        for prompt, ref, out in zip(batch, expected, llm.generate(batch, params, use_tqdm=False)):
            ours = torch.tensor([e[tok].logprob for e, tok in zip(out.prompt_logprobs[1:], prompt[1:])])
            theirs = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
            diff = (ours - theirs).abs().max().item()
            assert diff < MAX_ABS_DIFF, (backend, max_batched, len(prompt), diff)

    # Decode 12 steps, the 30-token prompt ends at position 41: far past the window.
    llm = LLM(str(directory), dtype="float32", block_size=4, kv_cache_memory="4MiB", attention_backend=backend)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
    for prompt, out in zip(batch, llm.generate(batch, params, use_tqdm=False)):
        diff = decode_logprob_diff(model, prompt, out.outputs[0])
        assert diff < MAX_ABS_DIFF, (backend, len(prompt), diff)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


QWEN2 = dict(architectures=["Qwen2ForCausalLM"], num_attention_heads=4, vocab_size=16, hidden_size=8,
             intermediate_size=8, num_hidden_layers=4, sliding_window=4096)


@pytest.mark.parametrize(
    "hf, window",
    [
        (dict(MISTRAL, architectures=["MistralForCausalLM"], sliding_window=4096), 4096),
        (dict(MISTRAL, architectures=["MistralForCausalLM"], sliding_window=None), None),
        (QWEN2, None),  # use_sliding_window defaults to off, whatever sliding_window says
        (dict(QWEN2, use_sliding_window=False, max_window_layers=0), None),
        (dict(QWEN2, use_sliding_window=True, max_window_layers=4), None),  # no layer from 4 on
        (dict(QWEN2, use_sliding_window=True, max_window_layers=0), 4096),  # every layer
        (dict(QWEN2, use_sliding_window=True, layer_types=["sliding_attention"] * 4), 4096),
    ],
)
def test_sliding_window_from_config(hf: dict, window: int | None) -> None:
    assert ModelConfig.from_hf_config(hf).sliding_window == window


@pytest.mark.parametrize(
    "hf",
    [
        dict(QWEN2, use_sliding_window=True, max_window_layers=2),
        dict(QWEN2, use_sliding_window=True, layer_types=["full_attention", "sliding_attention"] * 2),
    ],
)
def test_qwen2_with_some_windowed_layers_is_refused(hf: dict) -> None:
    with pytest.raises(UnsupportedArchitectureError, match="2 of 4 layers"):
        ModelConfig.from_hf_config(hf)


def test_decode_far_past_the_window_runs_in_a_pool_sized_for_the_window(mistral) -> None:
    """All layers are windowed, so blocks behind the window go back to the pool during decode:
    the 3 sequences end at 35, 49 and 60 positions (37 blocks of 4 if nothing were freed), in a
    pool of 24 blocks, with the same tokens as with an ample pool and no preemption."""
    directory, model, _ = mistral
    batch = prompts()
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ample = LLM(str(directory), dtype="float32", block_size=4, kv_cache_memory="4MiB")
    expected = [out.outputs[0].token_ids for out in ample.generate(batch, params, use_tqdm=False)]
    assert ample.engine.block_manager.sliding_window == WINDOW

    block_bytes = kv_bytes_per_block(ample.engine.model_config, 4, torch.float32)
    engine = LLM(str(directory), dtype="float32", block_size=4, kv_cache_memory=str(24 * block_bytes)).engine
    manager = engine.block_manager
    assert manager.num_blocks == 24
    for i, prompt in enumerate(batch):
        engine.add_request(prompt, params, request_id=str(i))
    outputs, used = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        used.append(manager.num_blocks - manager.num_free_blocks)
    assert [outputs[str(i)] for i in range(len(batch))] == expected
    assert engine.scheduler.num_preemptions == 0
    assert used[0] == 2 + 5 + 8  # the first step prefills every prompt whole
    # then a decode token at p reads keys p-7..p: at most 3 blocks per sequence
    assert max(used[1:]) <= 3 * 3
    assert used[-1] == 0
    for prompt, tokens in zip(batch, expected):  # and the greedy tokens are transformers' own
        ref = hf_logprobs(model, prompt + tokens)[len(prompt) - 1 : -1]
        assert tokens == ref.argmax(-1).tolist()
