"""`pinfer inspect MODEL`: what a checkpoint holds and what it costs to run, from its
metadata and tensor headers only (no weight is read or dequantized, so it takes a second).

    pinfer inspect smollm2-135m
    pinfer inspect ./my-hf-folder --json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pinfer.config import ModelConfig
from pinfer.loading.checkpoint import Checkpoint

# Weight-only quantization estimates, as model/quantization.py holds them: every decoder linear
# and lm_head (a tied head gets its own quantized copy) become int8 with one float32 scale per
# output row, or int4 (two per byte) with a float32 scale and offset per INT4_GROUP_SIZE inputs;
# the embedding and norms stay bfloat16.
INT4_GROUP_SIZE = 32
SCALE_BYTES = 4
ENGINE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_LAYER_INDEX = re.compile(r"(?<=layers\.)\d+(?=\.)")
_ROPE_FREQS = "rope_freqs.weight"  # a GGUF table of RoPE factors, not a model parameter


@dataclass
class TensorInfo:
    name: str  # Hugging Face name
    shape: tuple[int, ...]  # torch order: [out_features, in_features]
    dtype: str  # safetensors dtype (F32, BF16) or GGUF type (Q4_1, F32)
    num_bytes: int  # as stored in the file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class TensorGroup:
    """Tensors of one kind: every layer's q_proj is one row, shown once with its count."""

    name: str  # with the layer index as "*": model.layers.*.self_attn.q_proj.weight
    shape: list[int]
    dtype: str
    count: int


@dataclass
class TypeCount:
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0


@dataclass
class ModelReport:
    path: str
    format: str  # "gguf" | "safetensors"
    architecture: str
    num_parameters: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # rows of the embedding
    context_length: int
    tie_word_embeddings: bool
    tensor_groups: list[TensorGroup]
    tensor_types: dict[str, TypeCount]
    has_tokenizer: bool
    tokenizer: str | None  # e.g. "gpt2 (pre: smollm)" or "tokenizer.json"
    tokenizer_vocab_size: int | None
    has_chat_template: bool
    file_bytes: int  # size on disk of the weight files
    weight_bytes: dict[str, int] = field(default_factory=dict)  # file, float32, bfloat16, int8, int4
    kv_bytes_per_token: dict[str, int] = field(default_factory=dict)  # float32, bfloat16


def inspect_model(model: str | Path) -> ModelReport:
    from pinfer.loading.loader import open_checkpoint

    checkpoint = open_checkpoint(model)
    if checkpoint.path.is_file():
        tensors, tokenizer = _gguf_tensors(checkpoint), _gguf_tokenizer(checkpoint)
        files = [checkpoint.path]
    else:
        tensors, tokenizer = _safetensors_tensors(checkpoint), _folder_tokenizer(checkpoint.path)
        files = checkpoint.files
    config = ModelConfig.from_hf_config(checkpoint.config)
    if config.tie_word_embeddings:  # some folders also store the tied copy; it is one parameter
        tensors = [t for t in tensors if t.name != "lm_head.weight"]
    has_tokenizer, tokenizer_name, tokenizer_vocab, has_chat_template = tokenizer
    return ModelReport(
        path=str(checkpoint.path),
        format="gguf" if checkpoint.path.is_file() else "safetensors",
        architecture=config.architecture,
        num_parameters=sum(t.numel for t in tensors),
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        context_length=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        tensor_groups=group_tensors(tensors),
        tensor_types=_count_types(tensors),
        has_tokenizer=has_tokenizer,
        tokenizer=tokenizer_name,
        tokenizer_vocab_size=tokenizer_vocab,
        has_chat_template=has_chat_template,
        file_bytes=sum(f.stat().st_size for f in files),
        weight_bytes=weight_bytes(tensors, config.tie_word_embeddings),
        kv_bytes_per_token=kv_bytes_per_token(config),
    )


# --- tensors -------------------------------------------------------------------------


def _gguf_tensors(checkpoint: Checkpoint) -> list[TensorInfo]:
    from pinfer.loading.gguf_loader import hf_tensor_name

    return [
        TensorInfo(
            name=hf_tensor_name(t.name, checkpoint.architecture),
            shape=tuple(int(d) for d in reversed(t.shape.tolist())),  # ggml lists dims innermost first
            dtype=t.tensor_type.name,
            num_bytes=int(t.n_bytes),
        )
        for t in checkpoint.tensor_headers()
        if t.name != _ROPE_FREQS
    ]


def _safetensors_tensors(checkpoint: Checkpoint) -> list[TensorInfo]:
    from safetensors import safe_open

    tensors = []
    for file in checkpoint.files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)  # header only
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                numel = 1
                for d in shape:
                    numel *= d
                tensors.append(TensorInfo(name, shape, dtype, numel * _SAFETENSORS_ITEMSIZE.get(dtype, 4)))
    return tensors


_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                         "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def group_tensors(tensors: list[TensorInfo]) -> list[TensorGroup]:
    groups: dict[tuple, TensorGroup] = {}
    for t in tensors:
        name = _LAYER_INDEX.sub("*", t.name)
        key = (name, t.shape, t.dtype)
        if key in groups:
            groups[key].count += 1
        else:
            groups[key] = TensorGroup(name, list(t.shape), t.dtype, 1)
    return list(groups.values())


def _count_types(tensors: list[TensorInfo]) -> dict[str, TypeCount]:
    counts: dict[str, TypeCount] = {}
    for t in tensors:
        c = counts.setdefault(t.dtype, TypeCount())
        c.tensors += 1
        c.parameters += t.numel
        c.bytes += t.num_bytes
    return counts


# --- memory --------------------------------------------------------------------------


def _is_quantizable_linear(t: TensorInfo) -> bool:
    return len(t.shape) == 2 and t.name.endswith(".weight") and "embed_tokens" not in t.name


def weight_bytes(tensors: list[TensorInfo], tie_word_embeddings: bool = False) -> dict[str, int]:
    """Bytes of the weights as stored in the file and as the engine would hold them."""
    total = sum(t.numel for t in tensors)
    linears = [t for t in tensors if _is_quantizable_linear(t)]
    rest_bf16 = (total - sum(t.numel for t in linears)) * 2
    if tie_word_embeddings:  # the quantized head is a copy of the (bfloat16) embedding
        linears += [TensorInfo("lm_head.weight", t.shape, t.dtype, 0) for t in tensors if "embed_tokens" in t.name]
    int8 = rest_bf16 + sum(t.numel + t.shape[0] * SCALE_BYTES for t in linears)
    int4 = rest_bf16 + sum(
        (t.numel + 1) // 2 + t.shape[0] * -(-t.shape[1] // INT4_GROUP_SIZE) * 2 * SCALE_BYTES for t in linears
    )
    return {"file": sum(t.num_bytes for t in tensors), "float32": total * 4, "bfloat16": total * 2,
            "int8": int8, "int4": int4}


def kv_bytes_per_token(config: ModelConfig) -> dict[str, int]:
    from pinfer.engine.model_runner import kv_bytes_per_block

    return {name: kv_bytes_per_block(config, 1, dtype) for name, dtype in ENGINE_DTYPES.items()}


# --- tokenizer -----------------------------------------------------------------------


def _gguf_tokenizer(checkpoint: Checkpoint) -> tuple[bool, str | None, int | None, bool]:
    metadata = checkpoint.metadata
    has_chat_template = "tokenizer.chat_template" in metadata
    if "tokenizer.ggml.tokens" not in metadata:
        return False, None, None, has_chat_template
    kind = metadata.get("tokenizer.ggml.model", "?")
    if "tokenizer.ggml.pre" in metadata:
        kind += f" (pre: {metadata['tokenizer.ggml.pre']})"
    return True, kind, len(metadata["tokenizer.ggml.tokens"]), has_chat_template


def _folder_tokenizer(folder: Path) -> tuple[bool, str | None, int | None, bool]:
    tokenizer_config = {}
    if (folder / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    has_chat_template = bool(
        tokenizer_config.get("chat_template")
        or (folder / "chat_template.jinja").is_file()
        or (folder / "chat_template.json").is_file()
    )
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        return True, "tokenizer.json", vocab, has_chat_template
    for name in ("tokenizer.model", "vocab.json"):  # present, but sizing it needs the slow tokenizer
        if (folder / name).is_file():
            return True, name, None, has_chat_template
    return False, None, None, has_chat_template


# --- output --------------------------------------------------------------------------


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_report(r: ModelReport) -> str:
    lines = [
        f"{r.path}",
        f"  format          {r.format}",
        f"  architecture    {r.architecture}",
        f"  parameters      {r.num_parameters:,} ({r.num_parameters / 1e6:.1f}M)",
        f"  layers          {r.num_layers} x (hidden {r.hidden_size}, ffn {r.intermediate_size}, "
        f"heads {r.num_heads}, kv heads {r.num_kv_heads}, head dim {r.head_dim})",
        f"  vocab           {r.vocab_size}{' (tied embeddings)' if r.tie_word_embeddings else ''}",
        f"  context length  {r.context_length}",
        "  tokenizer       " + (f"{r.tokenizer}, {r.tokenizer_vocab_size or '?'} tokens" if r.has_tokenizer else "none"),
        f"  chat template   {'yes' if r.has_chat_template else 'no'}",
        "",
        "tensors (per-layer kinds shown once)",
    ]
    width = max(len(g.name) for g in r.tensor_groups)
    lines.append(f"  {'name':<{width}}  {'count':>5}  {'shape':<14}  type")
    for g in r.tensor_groups:
        lines.append(f"  {g.name:<{width}}  {g.count:>5}  {'x'.join(map(str, g.shape)):<14}  {g.dtype}")
    lines += ["", "tensor types"]
    for dtype, c in r.tensor_types.items():
        lines.append(f"  {dtype:<8} {c.tensors:>5} tensors  {c.parameters:>13,} params  {format_bytes(c.bytes):>10}")
    w = r.weight_bytes
    lines += [
        "",
        "memory",
        f"  weights   file {format_bytes(w['file'])} (on disk {format_bytes(r.file_bytes)}); in the engine: "
        f"float32 {format_bytes(w['float32'])}, bfloat16 {format_bytes(w['bfloat16'])}, "
        f"int8 {format_bytes(w['int8'])}, int4 {format_bytes(w['int4'])}",
        "  KV cache  per token: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in r.kv_bytes_per_token.items())
        + f"; full context ({r.context_length}): "
        + ", ".join(f"{k} {format_bytes(v * r.context_length)}" for k, v in r.kv_bytes_per_token.items()),
    ]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_model(args.model)
    if args.json:
        json.dump(asdict(report), sys.stdout, indent=2)
        print()
    else:
        print(format_report(report))
    return 0


def add_inspect_parser(subparsers) -> None:
    """Register `inspect` on the `pinfer` command's subparsers."""
    parser = subparsers.add_parser(
        "inspect", help="describe a checkpoint: architecture, parameters, tensors, memory (reads headers only)"
    )
    parser.add_argument("model", help="alias, Hugging Face checkpoint folder, or .gguf file")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=cmd_inspect)
