"""Gemma 3 (text) against transformers.

1. Tiny random Gemma3ForCausalLM checkpoints (float32, sliding window 8, local and
   global layers, random norm offsets, one with final-logit soft-capping) saved as
   safetensors: pinfer's prompt logprobs (whole and chunked prefill) and greedy decode
   through the paged cache must match transformers (eager attention, which applies the
   window) on prompts longer than the window.
2. The real gemma-3-270m Q4_K_M GGUF: pinfer's greedy tokens must equal transformers'
   generate() on a float32 model made by transformers' own GGUF loader (its
   dequantization, norm-offset handling and tokenizer are independent of ours).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from pinfer import LLM, SamplingParams
from tiny_models import decode_logprob_diff, hf_logprobs, prompt_logprob_table, save_checkpoint

# As tests/conftest.py: conversions are cached under .cache/tests.
CACHE_DIR = Path(os.environ.get("PINFER_TEST_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "tests"))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=256,
            initializer_range=0.1, sliding_window=8, query_pre_attn_scalar=24, rope_theta=1e6,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    # layers: local, global, local, local, global
    "layer-types-softcap": lambda: Gemma3TextConfig(
        **TINY, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"]),
    # sliding_window_pattern=3: layers 3 (index 2) global; linear rope scaling on global layers only
    "pattern-linear-rope": lambda: Gemma3TextConfig(
        **TINY, sliding_window_pattern=3, rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


def build_checkpoint(name: str, directory: Path, tokenizer_dir: Path):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config.architectures = ["Gemma3ForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():  # Gemma norms start at 0 (= scale 1); random offsets make them matter
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.normal_(0.0, 0.3)
    save_checkpoint(model, directory, tokenizer_dir)
    return model


def test_tiny_layer_types(tmp_path, tokenizer_dir):
    from pinfer.config import ModelConfig
    from pinfer.model.gemma3 import gemma3_layer_types

    for name, expected in (("layer-types-softcap", "SFSSF"), ("pattern-linear-rope", "SSFSS")):
        hf = CONFIGS[name]()
        hf.architectures = ["Gemma3ForCausalLM"]
        ours = gemma3_layer_types(ModelConfig.from_hf_config(hf.to_dict()))
        assert "".join(t[0].upper() for t in ours) == expected
        assert ours == hf.layer_types


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_gemma3_matches_transformers(name, tmp_path, tokenizer_dir):
    hf = build_checkpoint(name, tmp_path, tokenizer_dir)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 23, 40)]  # window is 8
    expected = [hf_logprobs(hf, p) for p in prompts]
    worst = 0.0
    for max_batched in (2048, 3):  # whole prefill, then 3-token chunks read back through the paged cache
        llm = LLM(str(tmp_path), dtype="float32", block_size=4, max_num_batched_tokens=max_batched,
                  kv_cache_memory="4MiB")
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        for prompt, ref, out in zip(prompts, expected, llm.generate(prompts, params, use_tqdm=False)):
            ours = prompt_logprob_table(out)
            theirs = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
            diff = (ours - theirs).abs().max().item()
            worst = max(worst, diff)
            assert diff < 1e-4, (name, max_batched, diff)

    # decode: 12 greedy steps through the paged cache against a forward pass over the whole sequence
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, kv_cache_memory="4MiB")
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        diff = decode_logprob_diff(hf, prompt, out.outputs[0])
        worst = max(worst, diff)
        assert diff < 1e-4, (name, "decode", diff)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    print(f"{name}: max abs logprob diff {worst:.2e}")


def test_tiny_full_logits_match(tmp_path, tokenizer_dir):
    """Raw logits (soft-capped) of the whole model, straight through the model runner's pieces."""
    hf = build_checkpoint("layer-types-softcap", tmp_path, tokenizer_dir)
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, kv_cache_memory="4MiB")
    prompt = torch.randint(3, 512, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    ref = hf_logprobs(hf, prompt)
    # top-5 alternatives per position agree with transformers' log-softmax of capped logits
    for pos, entry in enumerate(out.prompt_logprobs[1:]):
        for tok, lp in entry.items():
            assert abs(lp.logprob - ref[pos, tok].item()) < 1e-4


def test_attn_softcapping_refused(tmp_path, tokenizer_dir):
    from pinfer.config import ModelConfig
    from pinfer.errors import UnsupportedArchitectureError
    from pinfer.model.gemma3 import Gemma3ForCausalLM

    hf = CONFIGS["layer-types-softcap"]()
    hf.architectures = ["Gemma3ForCausalLM"]
    config = hf.to_dict()
    config["attn_logit_softcapping"] = 50.0
    with pytest.raises(UnsupportedArchitectureError, match="attn_logit_softcapping"):
        Gemma3ForCausalLM(ModelConfig.from_hf_config(config), max_positions=64)


def test_activation_check_is_per_architecture():
    from pinfer.config import ModelConfig
    from pinfer.errors import UnsupportedArchitectureError
    from pinfer.model.registry import check_architecture, model_class_for

    shape = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                 head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=8)
    assert model_class_for(ModelConfig("Gemma3ForCausalLM", **shape, hidden_act="gelu_pytorch_tanh")).__name__ \
        == "Gemma3ForCausalLM"
    with pytest.raises(UnsupportedArchitectureError, match="only 'silu'"):
        model_class_for(ModelConfig("LlamaForCausalLM", **shape, hidden_act="gelu_pytorch_tanh"))
    with pytest.raises(UnsupportedArchitectureError, match="'relu' for Gemma3ForCausalLM"):
        model_class_for(ModelConfig("Gemma3ForCausalLM", **shape, hidden_act="relu"))
    with pytest.raises(UnsupportedArchitectureError, match="multimodal"):
        check_architecture({"architectures": ["Gemma3ForConditionalGeneration"]})


def test_gguf_gemma3_tensor_names():
    from pinfer.loading.gguf_loader import hf_tensor_name

    expected = {
        "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
    }
    for gguf_name, hf_name in expected.items():
        assert hf_tensor_name(f"blk.7.{gguf_name}.weight", "gemma3") == f"model.layers.7.{hf_name}.weight"
    assert hf_tensor_name("blk.7.ffn_norm.weight") == "model.layers.7.post_attention_layernorm.weight"  # llama


# ---- real weights ---------------------------------------------------------------------

CHAT_PROMPTS = [
    "Reply with one word: what color is a clear daytime sky?",  # short answer: ends with <end_of_turn>
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
]


@pytest.fixture(scope="module")
def gemma3_gguf() -> Path:
    from pinfer.loading.resolve import resolve_model

    return resolve_model("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_hf_dir(gemma3_gguf: Path) -> Path:
    """A float32 HF folder made by transformers' GGUF loader (cached under .cache/tests)."""
    from pinfer.rl.hf_policy import gguf_to_hf_folder

    return gguf_to_hf_folder(gemma3_gguf, CACHE_DIR / f"gemma3-270m-hf-{gemma3_gguf.stat().st_size}")


def chat_ids(tokenizer, text: str) -> list[int]:
    # The GGUF carries no chat template; this is Gemma 3's own turn format.
    prompt = f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"
    return tokenizer(prompt).input_ids  # adds <bos>


def test_gemma3_270m_greedy_matches_transformers(gemma3_gguf, gemma3_hf_dir):
    from transformers import AutoTokenizer

    llm = LLM(str(gemma3_gguf), dtype="float32")
    ours_tok = llm.engine.tokenizer
    theirs_tok = AutoTokenizer.from_pretrained(gemma3_hf_dir)
    for text in ["Hello world", "  two  spaces\nand a newline", "<start_of_turn>user\nHi<end_of_turn>", "1234 + 5.6"]:
        assert ours_tok(text).input_ids == theirs_tok(text).input_ids, text

    end_of_turn = theirs_tok.convert_tokens_to_ids("<end_of_turn>")
    stop = {theirs_tok.eos_token_id, end_of_turn}
    assert stop <= llm.engine.eos_token_ids

    hf = AutoModelForCausalLM.from_pretrained(gemma3_hf_dir, dtype=torch.float32).eval()
    prompts = [chat_ids(theirs_tok, t) for t in CHAT_PROMPTS]
    max_new = 24
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_new, temperature=0), use_tqdm=False)
    matched = ended = 0
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                              eos_token_id=sorted(stop), pad_token_id=0)[0, len(prompt):].tolist()
        ours = list(out.outputs[0].token_ids)
        # up to and including the first end token
        for seq in (ref, ours):
            cut = next((i for i, t in enumerate(seq) if t in stop), None)
            if cut is not None:
                del seq[cut + 1 :]
        assert ours == ref, (theirs_tok.decode(prompt), theirs_tok.decode(ours), theirs_tok.decode(ref))
        matched += len(ours)
        ended += bool(ours and ours[-1] in stop)
        print(repr(theirs_tok.decode(ours)))
    print(f"gemma3-270m: {matched} greedy tokens matched over {len(prompts)} chat prompts ({ended} reached EOS)")
