"""A Hugging Face safetensors folder as a GGUF file, in the layout llama.cpp's own
convert_hf_to_gguf.py writes for Llama-family models, so llama.cpp, transformers'
GGUF loader and pinfer all read it:

- tensor names from the gguf package's TensorNameMap (token_embd, blk.N.attn_q, ...);
- llama: Q/K rows permuted from HF's rotate-half rotary layout to ggml's interleaved
  one (qwen2/qwen3 run NEOX-style rope in ggml and are written unpermuted);
- `<arch>.*` hyper-parameters, llama3 rope scaling as a rope_freqs tensor;
- norms and other 1-D tensors stay F32; 2-D tensors become the --outtype (a Q8_0
  tensor whose rows do not split into 32-wide blocks falls back to F16, as llama.cpp does).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from pinfer.config import ModelConfig
from pinfer.errors import PinferError, UnsupportedArchitectureError
from pinfer.loading.safetensors_loader import SafetensorsCheckpoint


@dataclass(frozen=True)
class OutType:
    qtype: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType


OUTTYPES: dict[str, OutType] = {
    "F32": OutType(gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": OutType(gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": OutType(gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": OutType(gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# HF architectures entry -> (GGUF architecture, whether llama.cpp permutes Q/K for it).
# llama.cpp writes Mistral checkpoints as llama too.
GGUF_ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": (gguf.MODEL_ARCH.QWEN3, False),
}


def check_convertible(hf_config: dict) -> ModelConfig:
    """The model's shape, or a clear error for what this writer cannot express."""
    architecture = (hf_config.get("architectures") or ["<none>"])[0]
    if architecture not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"converting {architecture} to GGUF is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    config = ModelConfig.from_hf_config(hf_config)
    if config.sliding_window is not None:
        raise UnsupportedArchitectureError(
            f"{architecture} with sliding-window attention cannot be written as GGUF {architecture}: "
            "the llama/qwen GGUF layouts have no window"
        )
    if config.rope.type not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"rope scaling {config.rope.type!r} is not supported by the GGUF writer (supported: none, linear, llama3)"
        )
    return config


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: HF rotate-half rows -> ggml's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """Per-frequency divisors for llama3 rope scaling (llama.cpp's rope_freqs tensor)."""
    rope, dim = config.rope, config.head_dim
    old_ctx = rope.original_max_position_embeddings or 8192
    freqs = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / rope.high_freq_factor:
            factors.append(1.0)
        elif wavelen > old_ctx / rope.low_freq_factor:
            factors.append(rope.factor)
        else:
            smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
            factors.append(1 / ((1 - smooth) / rope.factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig, hf_config: dict, arch: gguf.MODEL_ARCH,
                         outtype: OutType, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(outtype.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if hf_config.get("head_dim") is not None:  # llama.cpp writes these only when config.json has head_dim
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(config.head_dim)
    if config.rope.type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope.factor)


def _encode(data: np.ndarray, name: str, outtype: OutType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor's bytes in the type llama.cpp would store it as."""
    qtype = outtype.qtype
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32  # norms and biases: tiny, and precision-sensitive
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the 32-wide Q8_0 block
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def hf_to_gguf(folder: Path, out: Path, outtype: str = "F16") -> None:
    """Write the HF checkpoint folder as a GGUF file at `out` (via a temporary file, renamed at the end)."""
    from pinfer.tools.gguf_vocab import add_vocab, check_byte_level_bpe

    folder, out = Path(folder), Path(out)
    out_type = OUTTYPES[outtype]
    checkpoint = SafetensorsCheckpoint(folder)
    config = check_convertible(checkpoint.config)
    check_byte_level_bpe(folder)
    checkpoint.validate()
    arch, permute = GGUF_ARCHITECTURES[config.architecture]
    name_map = gguf.get_tensor_name_map(arch, config.num_layers)

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        name = checkpoint.config.get("_name_or_path") or folder.name
        _add_hyperparameters(writer, config, checkpoint.config, arch, out_type, Path(name).name or folder.name)
        add_vocab(writer, folder, config.vocab_size)
        if config.rope.type == "llama3":
            writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
        for hf_name, tensor in checkpoint.weights(torch.float32):
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # llama.cpp reuses token_embd
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise PinferError(f"{folder}: no GGUF name for tensor {hf_name!r} of a {config.architecture} model")
            if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = permute_qk(tensor, config.num_heads)
            elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = permute_qk(tensor, config.num_kv_heads)
            data, qtype = _encode(tensor.numpy(), gguf_name, out_type)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if out.is_dir():  # --force over a folder
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
