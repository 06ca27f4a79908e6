"""GGUFCheckpoint: dequantization of every supported ggml type, Q/K un-permutation,
HF names and config, clear errors for bad files, and agreement with transformers'
own GGUF loader on the real SmolLM2 file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from safetensors import safe_open

from pinfer.errors import ModelLoadError, UnsupportedArchitectureError
from pinfer.loading.gguf_loader import GGUFCheckpoint, _FastReader

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 64, 4, 2, 256, 128, 2
HEAD_DIM = HIDDEN // HEADS

# Each weight of the tiny model in a different storage type; ffn_down has 256 inputs
# so it can hold the 256-element K-quant blocks.
WEIGHT_TYPES = {
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.Q4_0,
    "blk.0.attn_q.weight": Q.F16,
    "blk.0.attn_k.weight": Q.BF16,
    "blk.0.attn_v.weight": Q.Q4_0,
    "blk.0.attn_output.weight": Q.Q4_1,
    "blk.0.ffn_gate.weight": Q.Q8_0,
    "blk.0.ffn_up.weight": Q.F32,
    "blk.0.ffn_down.weight": Q.Q4_K,
    "blk.1.attn_q.weight": Q.Q4_1,
    "blk.1.attn_k.weight": Q.Q8_0,
    "blk.1.attn_v.weight": Q.F16,
    "blk.1.attn_output.weight": Q.BF16,
    "blk.1.ffn_gate.weight": Q.Q4_0,
    "blk.1.ffn_up.weight": Q.Q4_1,
    "blk.1.ffn_down.weight": Q.Q6_K,
}
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
    **{
        f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight"
        for i in range(LAYERS)
        for g, h in [
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ]
    },
}


def weight_shape(name: str) -> tuple[int, int]:
    """torch layout [out_features, in_features]."""
    kind = name.split(".")[-2]
    return {
        "token_embd": (VOCAB, HIDDEN),
        "output": (VOCAB, HIDDEN),
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }[kind]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama q_proj/k_proj."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_heads(name: str) -> int | None:
    if ".attn_q." in name:
        return HEADS
    if ".attn_k." in name:
        return KV_HEADS
    return None


# --- independent K-quant dequantizers, transcribed from ggml-quants.c ------------


def _f16(raw: np.ndarray) -> np.float32:
    return np.float32(raw.view(np.float16)[0])


def ref_dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    """dequantize_row_q4_K: block = d(f16) dmin(f16) scales[12] qs[128], 256 values."""

    def scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
        if j < 4:
            return int(q[j]) & 63, int(q[j + 4]) & 63
        return (int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4), (int(q[j + 4]) >> 4) | ((int(q[j]) >> 6) << 4)

    blocks = data.reshape(-1, 144)
    out = np.empty((blocks.shape[0], 256), dtype=np.float32)
    for b, block in enumerate(blocks):
        d, dmin = _f16(block[0:2]), _f16(block[2:4])
        scales, q = block[4:16], block[16:144]
        y = []
        for j, is_ in zip(range(0, 256, 64), range(0, 8, 2)):
            sc, m = scale_min_k4(is_, scales)
            d1, m1 = d * np.float32(sc), dmin * np.float32(m)
            sc, m = scale_min_k4(is_ + 1, scales)
            d2, m2 = d * np.float32(sc), dmin * np.float32(m)
            qs = q[j // 2 : j // 2 + 32]
            y += [d1 * np.float32(v & 0xF) - m1 for v in qs]
            y += [d2 * np.float32(v >> 4) - m2 for v in qs]
        out[b] = y
    return out.reshape(data.shape[0], -1)


def ref_dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    """dequantize_row_q6_K: block = ql[128] qh[64] scales[16](int8) d(f16), 256 values."""
    blocks = data.reshape(-1, 210)
    out = np.empty((blocks.shape[0], 256), dtype=np.float32)
    for b, block in enumerate(blocks):
        ql, qh = block[0:128].astype(int), block[128:192].astype(int)
        sc = block[192:208].view(np.int8).astype(int)
        d = _f16(block[208:210])
        y = np.empty(256, dtype=np.float32)
        for n in range(2):  # two halves of 128 values
            l_, h_, s_, y_ = ql[64 * n :], qh[32 * n :], sc[8 * n :], 128 * n
            for l in range(32):
                is_ = l // 16
                q1 = ((l_[l] & 0xF) | (((h_[l] >> 0) & 3) << 4)) - 32
                q2 = ((l_[l + 32] & 0xF) | (((h_[l] >> 2) & 3) << 4)) - 32
                q3 = ((l_[l] >> 4) | (((h_[l] >> 4) & 3) << 4)) - 32
                q4 = ((l_[l + 32] >> 4) | (((h_[l] >> 6) & 3) << 4)) - 32
                y[y_ + l] = d * np.float32(s_[is_]) * np.float32(q1)
                y[y_ + l + 32] = d * np.float32(s_[is_ + 2]) * np.float32(q2)
                y[y_ + l + 64] = d * np.float32(s_[is_ + 4]) * np.float32(q3)
                y[y_ + l + 96] = d * np.float32(s_[is_ + 6]) * np.float32(q4)
        out[b] = y
    return out.reshape(data.shape[0], -1)


def random_k_quant_bytes(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Valid raw K-quant blocks: random nibbles/scales, small finite f16 super-scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        blocks[:, 0:4] = scales  # d, dmin
    else:
        blocks[:, 208:210] = scales[:, :2]  # d
    return blocks.reshape(rows, cols // block_size * type_size)


# --- writing synthetic GGUF files -------------------------------------------------


def add_tiny_tokenizer(writer: gguf.GGUFWriter) -> None:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "ab", "to"] + [chr(ord("a") + i) for i in range(26)]
    tokens += [f"<unused{i}>" for i in range(VOCAB - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    writer.add_token_merges(["a b", "t o"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages[0]['content'] }}")


def write_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, tuple[np.ndarray, Q]],
    metadata: dict | None = None,
    **hparams,
) -> Path:
    """tensors: name -> (array as stored, ggml type); quantized arrays are raw bytes."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(hparams.get("layers", LAYERS))
    writer.add_context_length(hparams.get("context", 256))
    writer.add_embedding_length(hparams.get("hidden", HIDDEN))
    writer.add_feed_forward_length(hparams.get("ffn", FFN))
    writer.add_head_count(hparams.get("heads", HEADS))
    writer.add_head_count_kv(hparams.get("kv_heads", KV_HEADS))
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(hparams.get("rope_theta", 10000.0))
    add_tiny_tokenizer(writer)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    for name, (array, qtype) in tensors.items():
        raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def store(w: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w, qtype)


def quant_error_bound(w: np.ndarray, qtype: Q) -> np.ndarray:
    """Largest error each element may have after a round trip through qtype."""
    if qtype == Q.F32:
        return np.zeros_like(w)
    if qtype == Q.F16:
        return np.abs(w) * 2.0**-11 + 1e-7
    if qtype == Q.BF16:
        return np.abs(w) * 2.0**-8 + 1e-30
    block = w.reshape(-1, 32)
    amax, lo, hi = np.abs(block).max(1), block.min(1), block.max(1)
    # One quantization step per block (rounding is half a step; Q4_0's -8..7 range
    # can clip the far side by up to a step), plus f16 rounding of the scales.
    step = {Q.Q8_0: amax / 127, Q.Q4_0: amax / 8, Q.Q4_1: (hi - lo) / 15}[qtype]
    return np.repeat(step * 1.01 + 1e-6, 32).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(path, originals, stored): a 2-layer llama GGUF with one tensor per ggml type."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    originals: dict[str, np.ndarray] = {}
    stored: dict[str, tuple[np.ndarray, Q]] = {}
    for name, qtype in WEIGHT_TYPES.items():
        rows, cols = weight_shape(name)
        if qtype in (Q.Q4_K, Q.Q6_K):  # no numpy quantizer in gguf: write raw blocks
            stored[name] = (random_k_quant_bytes(rng, qtype, rows, cols), qtype)
            continue
        w = rng.normal(0, 0.05, size=(rows, cols)).astype(np.float32)
        originals[name] = w
        heads = permute_heads(name)
        as_written = llama_cpp_permute(w, heads) if heads else w
        stored[name] = (store(as_written, qtype), qtype)
    norms = [f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_norm", "ffn_norm")]
    for name in ["output_norm.weight", *norms]:
        w = rng.uniform(0.5, 1.5, size=HIDDEN).astype(np.float32)
        originals[name] = w
        stored[name] = (w, Q.F32)
    write_gguf(path, "llama", stored)
    return path, originals, stored


@pytest.fixture(scope="module")
def tiny_weights(tiny_llama):
    path, _, _ = tiny_llama
    return dict(GGUFCheckpoint(path).weights(torch.float32))


# --- dequantization ---------------------------------------------------------------


@pytest.mark.parametrize("gguf_name", list(WEIGHT_TYPES))
def test_dequantized_weights_match_stored_bytes(tiny_llama, tiny_weights, gguf_name):
    """Exactly gguf.quants.dequantize of what was written (Q/K rows put back in HF order)."""
    _, _, stored = tiny_llama
    data, qtype = stored[gguf_name]
    loaded = tiny_weights[HF_NAMES[gguf_name]]
    assert loaded.dtype == torch.float32
    assert tuple(loaded.shape) == weight_shape(gguf_name)
    expected = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(weight_shape(gguf_name))
    heads = permute_heads(gguf_name)
    got = llama_cpp_permute(loaded.numpy(), heads) if heads else loaded.numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("gguf_name", [n for n, t in WEIGHT_TYPES.items() if t not in (Q.Q4_K, Q.Q6_K)])
def test_dequantized_weights_within_quantization_error(tiny_llama, tiny_weights, gguf_name):
    _, originals, _ = tiny_llama
    original = originals[gguf_name]
    loaded = tiny_weights[HF_NAMES[gguf_name]].numpy()
    error = np.abs(loaded - original)
    bound = quant_error_bound(original, WEIGHT_TYPES[gguf_name])
    assert (error <= bound).all(), f"max error {error.max():.3g}, worst excess {(error - bound).max():.3g}"
    if WEIGHT_TYPES[gguf_name] != Q.F32:
        assert error.max() > 0  # it really went through the quantizer


def test_k_quants_have_no_numpy_quantizer():
    # Why Q4_K/Q6_K are checked against hand-written dequantizers below instead.
    for qtype in (Q.Q4_K, Q.Q6_K):
        with pytest.raises(NotImplementedError):
            gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)


@pytest.mark.parametrize(
    "gguf_name, reference",
    [("blk.0.ffn_down.weight", ref_dequantize_q4_k), ("blk.1.ffn_down.weight", ref_dequantize_q6_k)],
)
def test_k_quants_match_ggml_reference(tiny_llama, tiny_weights, gguf_name, reference):
    _, _, stored = tiny_llama
    data, _ = stored[gguf_name]
    expected = reference(data)
    loaded = tiny_weights[HF_NAMES[gguf_name]].numpy()
    assert loaded.shape == expected.shape == (HIDDEN, FFN)
    assert np.abs(expected).max() > 0.1  # non-trivial values
    np.testing.assert_allclose(loaded, expected, rtol=1e-6, atol=1e-7)


def test_weights_cast_to_requested_dtype(tiny_llama, tiny_weights):
    path, _, _ = tiny_llama
    for name, w in GGUFCheckpoint(path).weights(torch.bfloat16):
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, tiny_weights[name].to(torch.bfloat16))


# --- Q/K permutation ----------------------------------------------------------------


def test_qk_permutation_undone_for_llama(tmp_path):
    q = np.arange(HIDDEN * HIDDEN, dtype=np.float32).reshape(HIDDEN, HIDDEN)
    k = -np.arange(KV_HEADS * HEAD_DIM * HIDDEN, dtype=np.float32).reshape(KV_HEADS * HEAD_DIM, HIDDEN)
    q_bias = np.arange(HIDDEN, dtype=np.float32)
    assert not np.array_equal(llama_cpp_permute(q, HEADS), q)  # the permutation is not a no-op
    tensors = {
        "token_embd.weight": (np.ones((VOCAB, HIDDEN), np.float32), Q.F32),
        "blk.0.attn_q.weight": (llama_cpp_permute(q, HEADS), Q.F32),
        "blk.0.attn_k.weight": (llama_cpp_permute(k, KV_HEADS), Q.F32),
        "blk.0.attn_q.bias": (llama_cpp_permute(q_bias, HEADS), Q.F32),
        "blk.0.attn_v.weight": (k.copy(), Q.F32),
    }
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "perm.gguf", "llama", tensors, layers=1))
    weights = dict(ckpt.weights(torch.float32))
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.k_proj.weight"].numpy(), k)
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.bias"].numpy(), q_bias)
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.v_proj.weight"].numpy(), k)  # v untouched
    assert ckpt.config["attention_bias"] is True


def test_qwen3_is_not_permuted_and_maps_qk_norms(tmp_path):
    head_dim = 32  # Qwen3 sets head_dim independently of hidden/heads
    q = np.arange(HEADS * head_dim * HIDDEN, dtype=np.float32).reshape(HEADS * head_dim, HIDDEN)
    tensors = {
        "token_embd.weight": (np.ones((VOCAB, HIDDEN), np.float32), Q.F32),
        "output.weight": (np.ones((VOCAB, HIDDEN), np.float16), Q.F16),
        "blk.0.attn_q.weight": (q, Q.F32),
        "blk.0.attn_q_norm.weight": (np.full(head_dim, 2.0, np.float32), Q.F32),
        "blk.0.attn_k_norm.weight": (np.full(head_dim, 3.0, np.float32), Q.F32),
    }
    path = write_gguf(tmp_path / "qwen3.gguf", "qwen3", tensors, {"qwen3.attention.key_length": head_dim}, layers=1)
    ckpt = GGUFCheckpoint(path)
    weights = dict(ckpt.weights(torch.float32))
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    assert torch.equal(weights["model.layers.0.self_attn.q_norm.weight"], torch.full((head_dim,), 2.0))
    assert torch.equal(weights["model.layers.0.self_attn.k_norm.weight"], torch.full((head_dim,), 3.0))
    assert ckpt.config["architectures"] == ["Qwen3ForCausalLM"]
    assert ckpt.config["model_type"] == "qwen3"
    assert ckpt.config["head_dim"] == head_dim
    assert ckpt.config["attention_bias"] is False
    assert ckpt.config["tie_word_embeddings"] is False


def test_qwen2_biases_and_config(tmp_path):
    bias = np.arange(HIDDEN, dtype=np.float32)
    tensors = {
        "token_embd.weight": (np.ones((VOCAB, HIDDEN), np.float32), Q.F32),
        "blk.0.attn_q.bias": (bias, Q.F32),
        "blk.0.attn_k.bias": (bias[: KV_HEADS * HEAD_DIM], Q.F32),
        "blk.0.attn_v.bias": (bias[: KV_HEADS * HEAD_DIM], Q.F32),
    }
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "qwen2.gguf", "qwen2", tensors, layers=1, rope_theta=1e6))
    weights = dict(ckpt.weights(torch.float32))
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.bias"].numpy(), bias)  # not permuted
    assert set(weights) == {
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.self_attn.v_proj.bias",
    }
    assert ckpt.config["architectures"] == ["Qwen2ForCausalLM"]
    assert ckpt.config["attention_bias"] is True
    assert ckpt.config["rope_theta"] == 1e6


# --- names and config ------------------------------------------------------------------


def test_names_and_config_of_tiny_llama(tiny_llama, tiny_weights):
    path, _, stored = tiny_llama
    assert set(tiny_weights) == {HF_NAMES[name] for name in stored}
    ckpt = GGUFCheckpoint(path)
    assert ckpt.config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 256,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
        "mlp_bias": False,
    }
    assert ckpt.chat_template == "{{ messages[0]['content'] }}"


def test_tied_embeddings_without_output_weight(tmp_path):
    tensors = {"token_embd.weight": (np.ones((VOCAB, HIDDEN), np.float32), Q.F32)}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "tied.gguf", "llama", tensors, layers=1))
    assert ckpt.config["tie_word_embeddings"] is True
    assert [name for name, _ in ckpt.weights(torch.float32)] == ["model.embed_tokens.weight"]


def test_linear_rope_scaling(tmp_path):
    tensors = {"token_embd.weight": (np.ones((VOCAB, HIDDEN), np.float32), Q.F32)}
    metadata = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "linear.gguf", "llama", tensors, metadata))
    assert ckpt.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def llama_cpp_rope_factors(head_dim, base, factor, low, high, old_ctx):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (llama3 rope)."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


@pytest.mark.parametrize(
    "factor, low, high, old_ctx, ctx_in_metadata",
    [(8.0, 1.0, 4.0, 8192, False), (32.0, 1.0, 4.0, 8192, False), (16.0, 2.0, 6.0, 4096, True)],
)
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, factor, low, high, old_ctx, ctx_in_metadata):
    head_dim, base = 64, 500000.0
    rope_freqs = llama_cpp_rope_factors(head_dim, base, factor, low, high, old_ctx)
    tensors = {
        "token_embd.weight": (np.ones((VOCAB, 4 * head_dim), np.float32), Q.F32),
        "rope_freqs.weight": (rope_freqs, Q.F32),
    }
    metadata = {"llama.rope.scaling.original_context_length": old_ctx} if ctx_in_metadata else {}
    path = write_gguf(tmp_path / "llama3.gguf", "llama", tensors, metadata, hidden=4 * head_dim, rope_theta=base)
    ckpt = GGUFCheckpoint(path)
    scaling = ckpt.config["rope_scaling"]
    assert scaling["rope_type"] == "llama3"
    assert scaling["original_max_position_embeddings"] == old_ctx
    assert scaling["factor"] == pytest.approx(factor)
    assert scaling["low_freq_factor"] == pytest.approx(low, rel=1e-3)
    assert scaling["high_freq_factor"] == pytest.approx(high, rel=1e-3)
    assert [name for name, _ in ckpt.weights(torch.float32)] == ["model.embed_tokens.weight"]  # consumed


# --- the metadata fast path -----------------------------------------------------------


def test_fast_reader_reads_the_same_fields_as_gguf_reader(tiny_llama, tmp_path):
    """Our bulk array parsing gives the same fields as the stock reader, for every value type."""
    writer = gguf.GGUFWriter(str(tmp_path / "arrays.gguf"), "llama")
    writer.add_key_value("t.f32", [1.5, -2.25, 3e-8], V.ARRAY, sub_type=V.FLOAT32)
    writer.add_key_value("t.u8", [0, 255, 7], V.ARRAY, sub_type=V.UINT8)
    writer.add_key_value("t.i64", [-(2**40), 2**40], V.ARRAY, sub_type=V.INT64)
    writer.add_key_value("t.f64", [0.1, 1e300], V.ARRAY, sub_type=V.FLOAT64)
    writer.add_key_value("t.bool", [True, False, True], V.ARRAY)
    writer.add_key_value("t.str", ["", "héllo wörld", "😀", "a b"], V.ARRAY)
    writer.add_key_value("t.nested", [[1, 2], [3]], V.ARRAY)
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    for path in (tiny_llama[0], tmp_path / "arrays.gguf"):
        stock, fast = gguf.GGUFReader(path), _FastReader(path)
        assert list(stock.fields) == list(fast.fields)
        for key, field in stock.fields.items():
            other = fast.fields[key]
            assert (other.types, other.data, len(other.parts)) == (field.types, field.data, len(field.parts)), key
            assert other.contents() == field.contents(), key
            if field.types[0] == V.ARRAY and field.types[1] != V.ARRAY:
                assert [other.contents(i) for i in range(len(field.data))] == field.contents(), key
        assert [(t.name, t.tensor_type, t.data_offset) for t in stock.tensors] == [
            (t.name, t.tensor_type, t.data_offset) for t in fast.tensors
        ]
    assert _FastReader(tmp_path / "arrays.gguf").fields["t.str"].contents() == ["", "héllo wörld", "😀", "a b"]


# --- bad files -----------------------------------------------------------------------------


def test_random_bytes_are_not_a_gguf_file(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="not a GGUF file") as info:
        GGUFCheckpoint(path)
    assert str(path) in str(info.value)


def test_empty_file_is_not_a_gguf_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GGUFCheckpoint(path)


def test_real_gguf_cut_in_half_is_truncated(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    path = tmp_path / "half.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated") as info:
        GGUFCheckpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert f"only {len(data) // 2} bytes" in message


def test_cut_inside_metadata_is_reported(tmp_path, tiny_llama):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_llama[0].read_bytes()[:600])  # inside the token list
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as info:
        GGUFCheckpoint(path)
    assert str(path) in str(info.value)


def test_unknown_architecture(tmp_path):
    tensors = {"token_embd.weight": (np.ones((VOCAB, HIDDEN), np.float32), Q.F32)}
    with pytest.raises(UnsupportedArchitectureError) as info:
        GGUFCheckpoint(write_gguf(tmp_path / "falcon.gguf", "falcon", tensors))
    message = str(info.value)
    assert "'falcon'" in message
    for supported in ("llama", "qwen2", "qwen3"):
        assert supported in message


def test_unknown_tensor_name(tmp_path):
    tensors = {
        "token_embd.weight": (np.ones((VOCAB, HIDDEN), np.float32), Q.F32),
        "blk.0.attn_mystery.weight": (np.ones((4, 4), np.float32), Q.F32),
    }
    with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_mystery\.weight"):
        GGUFCheckpoint(write_gguf(tmp_path / "mystery.gguf", "llama", tensors))


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        GGUFCheckpoint(tmp_path / "missing.gguf")


# --- the real SmolLM2 file against transformers' own GGUF loader -------------------------


@pytest.fixture(scope="module")
def smollm2_checkpoint(smollm2_gguf):
    return GGUFCheckpoint(smollm2_gguf)


def test_real_weights_match_transformers(smollm2_checkpoint, smollm2_hf_dir):
    seen = set()
    with safe_open(smollm2_hf_dir / "model.safetensors", framework="pt") as reference:
        names = set(reference.keys())
        for name, tensor in smollm2_checkpoint.weights(torch.float32):
            assert name in names, name
            expected = reference.get_tensor(name)
            assert tensor.shape == expected.shape, name
            diff = tensor.sub_(expected).abs_().max().item()  # in place: 135M values
            assert diff <= 1e-6, f"{name}: max abs diff {diff}"
            seen.add(name)
    # transformers drops lm_head.weight from the file when it is tied to the embedding.
    assert names - seen <= {"lm_head.weight"}
    assert len(seen) == 272


def test_real_config_matches_transformers(smollm2_checkpoint, smollm2_hf_dir):
    reference = json.loads((smollm2_hf_dir / "config.json").read_text())
    config = smollm2_checkpoint.config
    for key in [
        "architectures",
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "attention_bias",
        "mlp_bias",
        "hidden_act",
    ]:
        assert config[key] == reference[key], key
    assert config["rms_norm_eps"] == pytest.approx(reference["rms_norm_eps"], rel=1e-6)
    ref_theta = reference.get("rope_theta", reference.get("rope_parameters", {}).get("rope_theta"))
    assert config["rope_theta"] == ref_theta == 100000.0
    assert config["rope_scaling"] is None


def test_tiny_llama_tokenizer_from_file(tiny_llama):
    tokenizer = GGUFCheckpoint(tiny_llama[0]).load_tokenizer()
    ids = tokenizer.encode("<|im_start|>abtoz")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|im_start|>", "ab", "to", "z"]
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}"
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_auto_dtype_is_float32_on_a_cpu_without_a_fast_bf16_matmul(tiny_llama, monkeypatch):
    """A GGUF file loads in bf16, except on a CPU where neither pinfer's bf16 GEMM nor oneDNN's
    exists (aten's bf16 linear runs ~8x slower than float32 there)."""
    from pinfer.loading import loader

    checkpoint = GGUFCheckpoint(tiny_llama[0])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for own_gemm, onednn in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(loader.kernels, "has", lambda op, own_gemm=own_gemm: own_gemm)
        monkeypatch.setattr(loader, "onednn_packs", lambda dtype, onednn=onednn: onednn)
        fast = own_gemm or onednn
        assert loader.default_dtype(checkpoint, cpu) == (torch.bfloat16 if fast else torch.float32)
        assert loader.default_dtype(checkpoint, cuda) == torch.bfloat16
