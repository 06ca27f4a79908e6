"""Read a llama.cpp GGUF file as a Checkpoint: a Hugging Face style config, weights
under Hugging Face names (dequantized, Q/K rotary permutation undone) and a tokenizer.

Parsing and dequantization use the `gguf` package (llama.cpp's own Python reader);
this module only maps names and metadata onto what the engine expects.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from pinfer.errors import ModelLoadError, UnsupportedArchitectureError
from pinfer.model.quantization import Int4Weight

# general.architecture -> (HF architectures entry, HF model_type).
# Mistral GGUFs are written as "llama".
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),  # text-only; llama.cpp writes only the text backbone
}

# GGUF tensor names -> Hugging Face names.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per layer; llama.cpp's "ffn_norm" is the pre-feedforward one.
_ARCH_BLOCK_NAMES = {
    "gemma3": {
        **_BLOCK_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"



class _TruncatedError(ValueError):
    pass


class _FastReader(gguf.GGUFReader):
    """gguf.GGUFReader with bulk parsing of metadata arrays.

    The stock reader makes a numpy memmap view per array element: ~250k views for a
    49k-token vocabulary, over 3 s. Here an array costs one plain-ndarray slice per
    element and no memmap bookkeeping. The ReaderField layout is unchanged, so
    `field.contents()` works as usual. Also checks tensor extents against the file
    size so a truncated file fails with a clear reason instead of a reshape error.
    """

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        if len(raw_itype) < 1 or len(alen) < 1:
            raise ValueError(f"metadata array header at offset {orig_offs} runs past the end of the file")
        item_type = GGUFValueType(int(raw_itype[0]))
        count = int(alen[0])
        if count == 0 or item_type == GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)

        raw = self.data.view(np.ndarray)  # plain view: slicing a memmap is ~10x slower
        pos = orig_offs + 12
        parts: list[np.ndarray] = [raw_itype, alen]
        if item_type == GGUFValueType.STRING:
            unpack_len = struct.Struct("<Q").unpack_from
            for _ in range(count):
                if pos + 8 > raw.size:
                    raise ValueError(f"metadata string array at offset {orig_offs} runs past the end of the file")
                (length,) = unpack_len(raw, pos)
                parts.append(raw[pos : pos + 8].view(np.uint64))
                parts.append(raw[pos + 8 : pos + 8 + length])
                pos += 8 + length
            if pos > raw.size:
                raise ValueError(f"metadata string array at offset {orig_offs} runs past the end of the file")
            data_idxs = list(range(3, 2 + 2 * count, 2))
        else:
            nptype = self.gguf_scalar_to_np[item_type]
            end = pos + count * np.dtype(nptype).itemsize
            if end > raw.size:
                raise ValueError(f"metadata array at offset {orig_offs} runs past the end of the file")
            values = raw[pos:end].view(nptype)
            parts += [values[i : i + 1] for i in range(count)]
            data_idxs = list(range(2, 2 + count))
            pos = end
        return pos - orig_offs, parts, data_idxs, [GGUFValueType.ARRAY, item_type]

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        file_size = int(self.data.size)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                ggml_type = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise ValueError(f"tensor {name} has unknown ggml type {int(raw_dtype[0])}") from None
            block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            n_bytes = int(np.prod(dims)) * type_size // block_size
            end = start_offs + int(offset_tensor[0]) + n_bytes
            if end > file_size:
                raise _TruncatedError(
                    f"tensor {name} ends at byte {end} but the file has only {file_size} bytes"
                )
        super()._build_tensors(start_offs, fields)


class _Metadata(Mapping[str, Any]):
    """GGUF key/values as Python values, each decoded on first access (the vocabulary
    arrays take ~0.1 s and only the tokenizer needs them)."""

    def __init__(self, fields: Mapping[str, Any]):
        self._fields = fields
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            self._cache[key] = self._fields[key].contents()
        return self._cache[key]

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


class GGUFCheckpoint:
    """A GGUF file as a Checkpoint (see checkpoint.py). Opening it parses the header
    and metadata (memory-mapped, no tensor data read); weights() dequantizes lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        self.metadata: Mapping[str, Any] = _Metadata(self._reader.fields)
        self.architecture = self._architecture()
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._check_tensor_names()
        self.config: dict = self._build_config()
        self.chat_template: str | None = self.metadata.get("tokenizer.chat_template")

    # --- weights -------------------------------------------------------------------

    def tensor_headers(self) -> list[gguf.ReaderTensor]:
        """The file's tensors in file order (name, ggml-order shape, tensor_type, n_elements,
        n_bytes), without reading their data: for tools that only describe the file."""
        return list(self._reader.tensors)

    def weights(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) in file order, dequantized to float32 then cast to dtype."""
        for tensor in self._reader.tensors:
            if tensor.name == _ROPE_FREQS:
                continue  # consumed by config["rope_scaling"]
            hf_name = hf_tensor_name(tensor.name, self.architecture)
            try:
                values = torch.from_numpy(_dequantize(tensor))
            except NotImplementedError as e:
                raise ModelLoadError(
                    f"{self.path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, "
                    f"which the gguf package cannot dequantize ({e})"
                ) from e
            values = self._unpermute(tensor.name, values)
            if self.architecture == "gemma3" and tensor.name.endswith("norm.weight"):
                # llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (ggml multiplies
                # by the weight); HF keeps the offset w. transformers' GGUF loader subtracts 1 too.
                values = values - 1
            yield hf_name, values.to(dtype)

    def int4_weights(self) -> Iterator[tuple[str, Int4Weight]]:
        """The Q4_0/Q4_1 linear weights as int4 groups of 32, exactly as stored (for
        quantization="int4"; other tensors come dequantized from weights()).

        Q4_1 (x = d*q + m) is the int4 linear's format itself; Q4_0 (x = d*(q - 8))
        is zero = -8d. The 4-bit values are kept; d and m are fp16 in the file and
        become bfloat16 in the kernel's scale table (it takes no other dtype).
        """
        for tensor in self._reader.tensors:
            if tensor.tensor_type not in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
                continue
            if tensor.name == "token_embd.weight":
                continue  # the embedding is looked up in the model dtype
            weight = _q4_blocks(tensor)
            if self.architecture == "llama" and re.fullmatch(r"blk\.\d+\.attn_[qk]\.weight", tensor.name):
                # the Q/K row permutation undone, on whole rows (scales and offsets follow their row)
                weight = weight.rows(self._unpermute(tensor.name, torch.arange(weight.qweight.shape[0])))
            yield hf_tensor_name(tensor.name, self.architecture), weight

    def _unpermute(self, name: str, values: torch.Tensor) -> torch.Tensor:
        # llama.cpp's converter reorders Q/K rows of llama models from HF's "rotate half"
        # rotary layout to ggml's interleaved one; qwen2/qwen3/gemma3 files are not permuted
        # (ggml runs those with NEOX-style rope, the same layout as HF).
        if self.architecture != "llama":
            return values
        if re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", name):
            return unpermute_qk(values, self.config["num_attention_heads"])
        if re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", name):
            return unpermute_qk(values, self.config["num_key_value_heads"])
        return values

    # --- tokenizer -----------------------------------------------------------------

    def load_tokenizer(self):
        from pinfer.loading.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(self.path, self.metadata)

    # --- metadata -> config --------------------------------------------------------

    def _architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if arch is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata has no general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{self.path}: GGUF architecture {arch!r} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)} (Mistral GGUFs use 'llama')"
            )
        return arch

    def _check_tensor_names(self) -> None:
        unknown = [name for name in self._tensors
                   if name != _ROPE_FREQS and _try_hf_name(name, self.architecture) is None]
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            raise ModelLoadError(
                f"{self.path}: unknown tensor names for a {self.architecture} model: {shown}"
            )
        if "token_embd.weight" not in self._tensors:
            raise ModelLoadError(f"{self.path}: GGUF file has no token_embd.weight tensor")

    def _arch_value(self, key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{self.architecture}.{key}"
        if full in self.metadata:
            return self.metadata[full]
        if required:
            raise ModelLoadError(f"{self.path}: GGUF metadata is missing {full}")
        return default

    def _build_config(self) -> dict:
        arch = self.architecture
        hf_arch, model_type = ARCHITECTURES[arch]
        hidden = int(self._arch_value("embedding_length", required=True))
        heads = int(self._arch_value("attention.head_count", required=True))
        kv_heads = int(self._arch_value("attention.head_count_kv", heads))
        head_dim = int(self._arch_value("attention.key_length", hidden // heads))
        vocab_size = int(self._tensors["token_embd.weight"].shape[-1])  # ggml order: [hidden, vocab]
        rope_theta = _f32(self._arch_value("rope.freq_base", 10000.0))
        config = {
            "architectures": [hf_arch],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_value("feed_forward_length", required=True)),
            "num_hidden_layers": int(self._arch_value("block_count", required=True)),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": _f32(self._arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": rope_theta,
            "rope_scaling": self._rope_scaling(head_dim, rope_theta),
            "max_position_embeddings": int(self._arch_value("context_length", 2048)),
            "vocab_size": vocab_size,
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            # qwen2 always has q/k/v biases; llama has them only if the file does.
            "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in self._tensors,
            "mlp_bias": False,
        }
        if "tokenizer.ggml.padding_token_id" in self.metadata:
            config["pad_token_id"] = self.metadata["tokenizer.ggml.padding_token_id"]
        if arch == "gemma3":
            config.update(self._gemma3_config(config))
        return config

    def _gemma3_config(self, config: dict) -> dict:
        """Gemma 3 fields llama.cpp does not store (it hardcodes them) or stores under gemma3.*."""
        layers, head_dim = config["num_hidden_layers"], config["head_dim"]
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        extra: dict[str, Any] = {
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": int(self._arch_value("attention.sliding_window", 4096)),
            # Every 6th layer is global (llama.cpp and transformers' default pattern).
            "sliding_window_pattern": 6,
            "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
            # llama.cpp: local layers always use base 10000; rope.freq_base is the global base.
            "rope_local_base_freq": 10000.0,
            # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model (62 layers):
            # 1/sqrt(hidden / heads). These are the checkpoints' query_pre_attn_scalar values
            # (transformers' GGUF loader leaves its default, 256, which equals head_dim for 270m-12B).
            "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
            "final_logit_softcapping": self._arch_value("final_logit_softcapping"),
            "attn_logit_softcapping": self._arch_value("attn_logit_softcapping"),
            "attention_bias": False,
        }
        # Chat turns end with <end_of_turn> (llama.cpp treats it as end-of-generation too).
        end_of_turn = self._token_id("<end_of_turn>")
        eos = config["eos_token_id"]
        if end_of_turn is not None and end_of_turn != eos:
            extra["eos_token_id"] = [eos, end_of_turn] if eos is not None else [end_of_turn]
        return extra

    def _token_id(self, text: str) -> int | None:
        # Scan the raw strings (decoding a 262k-token vocabulary takes ~0.5 s; this stops early).
        field = self._reader.fields.get("tokenizer.ggml.tokens")
        if field is None:
            return None
        wanted = text.encode("utf-8")
        for index, part in enumerate(field.data):
            if len(field.parts[part]) == len(wanted) and bytes(field.parts[part]) == wanted:
                return index
        return None

    def _rope_scaling(self, head_dim: int, rope_theta: float) -> dict | None:
        scaling_type = self._arch_value("rope.scaling.type")
        factor = self._arch_value("rope.scaling.factor")
        orig_ctx = self._arch_value("rope.scaling.original_context_length")
        if _ROPE_FREQS in self._tensors:
            return self._llama3_rope_scaling(head_dim, rope_theta, orig_ctx)
        if scaling_type in (None, "none") or factor is None or float(factor) == 1.0:
            return None
        if scaling_type == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if scaling_type == "yarn":
            scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
            if orig_ctx is not None:
                scaling["original_max_position_embeddings"] = int(orig_ctx)
            for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
                value = self._arch_value(f"rope.scaling.{gguf_key}")
                if value is not None:
                    scaling[hf_key] = float(value)
            return scaling
        raise ModelLoadError(
            f"{self.path}: rope scaling type {scaling_type!r} is not supported (supported: linear, yarn, "
            f"and llama3 via a rope_freqs tensor)"
        )

    def _llama3_rope_scaling(self, head_dim: int, rope_theta: float, orig_ctx: Any) -> dict:
        """Recover HF's llama3 rope_scaling from the per-frequency factors llama.cpp stores.

        llama.cpp's converter turns HF's {factor, low_freq_factor, high_freq_factor,
        original_max_position_embeddings} into `rope_freqs.weight` and keeps none of
        them in the metadata. The factors only fix the ratios context/low and
        context/high, so we take the original context from the metadata if present,
        else 8192 (the converter's own default and every Llama 3.x value), fit the
        low/high factors, and check the HF formula reproduces the stored factors.
        If not, the file uses a scheme we cannot express, and we refuse it.
        """
        stored = _dequantize(self._tensors[_ROPE_FREQS]).astype(np.float64).reshape(-1)
        old_ctx = float(orig_ctx) if orig_ctx is not None else 8192.0
        factor = float(stored.max())
        inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * math.pi / inv_freq
        candidates = [(1.0, 4.0)]  # Llama 3.x defaults
        medium = (stored > 1 + 1e-4) & (stored < factor - 1e-4)
        if factor > 1 and medium.sum() >= 2:
            # 1/stored = (1 - s)/factor + s, with s linear in old_ctx / wavelen.
            smooth = (1 / stored[medium] - 1 / factor) / (1 - 1 / factor)
            slope, intercept = np.polyfit(old_ctx / wavelen[medium], smooth, 1)
            low = -intercept / slope
            candidates.append((float(low), float(low + 1 / slope)))
        for low, high in candidates:
            if np.allclose(_llama3_factors(wavelen, factor, low, high, old_ctx), stored, rtol=1e-3, atol=1e-4):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": round(low, 6),
                    "high_freq_factor": round(high, 6),
                    "original_max_position_embeddings": int(old_ctx),
                }
        raise ModelLoadError(
            f"{self.path}: rope_freqs.weight does not follow the llama3 rope scaling formula; "
            f"cannot express it as a Hugging Face rope_scaling"
        )


def _llama3_factors(wavelen: np.ndarray, factor: float, low: float, high: float, old_ctx: float) -> np.ndarray:
    """Per-frequency divisors HF's llama3 rope applies (as llama.cpp's converter computes them)."""
    smooth = (old_ctx / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, medium))


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _open_reader(path: Path) -> _FastReader:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path}: not a GGUF file (starts with {magic!r}, expected the magic bytes b'GGUF')"
        )
    try:
        return _FastReader(path)
    except _TruncatedError as e:
        raise ModelLoadError(f"{path}: GGUF file is truncated: {e}") from e
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError on bad bytes
        raise ModelLoadError(
            f"{path}: cannot read GGUF metadata ({type(e).__name__}: {e}); the file may be truncated or corrupt"
        ) from e


def _dequantize(tensor) -> np.ndarray:
    """float32 array in torch layout [out_features, in_features] (ggml stores dims reversed)."""
    # A plain-ndarray view: dequantize() slices row groups, and memmap slices are slow.
    values = gguf.quants.dequantize(tensor.data.view(np.ndarray), tensor.tensor_type)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
        values = values.copy()
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return values.astype(np.float32, copy=False).reshape(shape)


def _q4_blocks(tensor) -> Int4Weight:
    """Decode Q4_0/Q4_1 blocks: fp16 d (and m for Q4_1), then 16 bytes holding values
    0..15 of the block in the low nibbles and 16..31 in the high ones."""
    rows = int(tensor.shape[1]) if len(tensor.shape) > 1 else 1
    cols = int(tensor.shape[0])
    raw = np.asarray(tensor.data.view(np.ndarray)).reshape(rows, cols // 32, -1)
    has_min = tensor.tensor_type == GGMLQuantizationType.Q4_1
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if has_min else -8 * d
    qs = raw[..., 4:20] if has_min else raw[..., 2:18]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols).astype(np.int32)
    return Int4Weight(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(np.ascontiguousarray(m)))


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf permute():
    w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)."""
    rows = w.shape[0]
    # The same thing as a row gather, which is much faster than copying the 4-D view.
    source_rows = torch.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(rows)
    return w.index_select(0, source_rows)


def _try_hf_name(name: str, architecture: str = "llama") -> str | None:
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    block_names = _ARCH_BLOCK_NAMES.get(architecture, _BLOCK_NAMES)
    match = _BLOCK_TENSOR.fullmatch(name)
    if match and match.group(2) in block_names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{block_names[part]}.{kind}"
    return None


def hf_tensor_name(name: str, architecture: str = "llama") -> str:
    """GGUF tensor name -> Hugging Face name, e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    hf_name = _try_hf_name(name, architecture)
    if hf_name is None:
        raise ModelLoadError(f"unknown GGUF tensor name {name!r}")
    return hf_name
