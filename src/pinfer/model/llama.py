"""The Llama-family decoder: Llama 2/3, SmolLM, Mistral, Qwen2 (qkv bias) and
Qwen3 (q/k RMSNorm) from one code path.

The model runs on a flattened batch: the new tokens of all sequences in one
[num_tokens] tensor, with positions and attention metadata saying who is who.
Q/K/V and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pinfer import kernels
from pinfer.config import ModelConfig
from pinfer.errors import ModelLoadError
from pinfer.model.attention.base import AttentionBackend, AttentionMetadata, store_and_attend
from pinfer.model.fused_decode import decode_stack
from pinfer.model.layers.norm import RMSNorm
from pinfer.model.layers.rotary import RotaryEmbedding
from pinfer.model.moe import SparseMoeBlock
from pinfer.model.packed_linear import dense_weights


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window  # Mistral: every layer attends to the last W tokens
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = store_and_attend(q, k, v, kv_cache, meta, backend, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(-1, self.q_size))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused gate/up projection [..., 2 * I] -> [..., I]."""
    if kernels.usable(gate_up) and kernels.has("silu_mul") and gate_up.is_contiguous():
        return torch.ops.pinfer.silu_mul(gate_up)  # the same bits, one pass (kernels/cpu_ops.cpp)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        # intermediate_size: Qwen2-MoE's shared expert has its own width.
        self.intermediate_size = intermediate_size or config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # MoE models may interleave dense layers (decoder_sparse_step, mlp_only_layers).
        self.mlp = SparseMoeBlock(config, MLP) if config.is_moe_layer(layer_idx) else MLP(config)

    def forward(self, hidden, residual, positions, kv_cache, meta, backend) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous layer's MLP output, residual: the stream before it (None at the
        first layer, whose input is the embedding). Returns the same pair for the next layer:
        each residual add is fused with the norm after it (RMSNorm.add_and_norm)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(hidden, positions, kv_cache, meta, backend)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # One rotary table shared by all layers (not a parameter, not per layer).
        rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope)
        self.layers = nn.ModuleList(DecoderLayer(config, rotary, i) for i in range(config.num_layers))
        # The window every layer shares (Mistral), if any: KV blocks before it can be freed early.
        self.shared_sliding_window = config.sliding_window
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Tied embeddings: the head is the embedding matrix (re-done after to_empty, which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # final hidden states [num_tokens, hidden]
        hidden, residual = self.embed_tokens(input_ids), None
        fused = decode_stack(self, hidden, positions, kv_caches, meta, backend)  # model/fused_decode.py
        if fused is not None:
            return fused
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, positions, kv_cache, meta, backend)
        return self.norm.add_and_norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # ---- weights -------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], validate_first: bool = False) -> set[str]:
        """Copy Hugging Face-named tensors into the fused parameters, in place.

        Returns the `name@offset` keys written. Used both for loading a
        checkpoint (streamed, one tensor at a time) and for live weight updates
        (validate_first: check every name and shape before changing anything).
        """
        with dense_weights(self):  # pre-packed linears (model/packed_linear.py): unpack, write, pack
            params = dict(self.named_parameters())
            targets = ((self._destination(params, hf_name, tensor), tensor) for hf_name, tensor in weights)
            if validate_first:
                targets = list(targets)  # every name and shape resolved (and checked) before any copy
            loaded: set[str] = set()
            for found, tensor in targets:
                if found is not None:
                    keys, dest = found
                    dest.copy_(tensor)
                    loaded |= keys
        return loaded

    def _destination(self, params: dict, hf_name: str, tensor: torch.Tensor) -> tuple[set[str], torch.Tensor] | None:
        """The slice of a parameter an HF-named tensor goes to, and the keys it covers
        (None: not stored, e.g. a tied head)."""
        target = self._map_hf_name(hf_name)
        if target is None:
            return None
        name, offset = target
        if name not in params:
            raise ModelLoadError(f"checkpoint tensor {hf_name!r} has no place in {self.config.architecture}")
        param = params[name]
        dest = param.data if offset is None else param.data.narrow(0, offset, tensor.shape[0])
        if tensor.dim() == 3 and dest.dim() == 2 and dest.shape[0] % tensor.shape[0] == 0:
            # Experts fused as [E, rows, cols] (transformers 5 in memory): our [E * rows, cols].
            dest = dest.view(tensor.shape[0], -1, dest.shape[1])
        if dest.shape != tensor.shape:
            raise ModelLoadError(
                f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
            )
        # A whole-parameter write (e.g. Phi-3's fused qkv_proj, fused experts) covers all its parts.
        keys = self._part_keys(name) if offset is None else {f"{name}@{offset}"}
        return keys, dest

    def expected_weight_keys(self) -> set[str]:
        """The `name@offset` keys load_weights must have written for a complete checkpoint."""
        return {key for name, _ in self.named_parameters() for key in self._part_keys(name)}

    def _part_keys(self, name: str) -> set[str]:
        """Keys of the per-tensor parts (in HF's unfused naming) that make up our parameter `name`."""
        return {"{}@{}".format(*self._map_hf_name(hf_name)) for hf_name in self._hf_names_for(name)}

    def _qkv_offsets(self) -> dict[str, int]:
        attn = self.layers[0].self_attn
        return {"q_proj": 0, "k_proj": attn.q_size, "v_proj": attn.q_size + attn.kv_size}

    # Mixtral's names -> the Qwen-style names the rest of the mapping uses.
    _MIXTRAL_RENAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                        (".w2.", ".down_proj."))

    def _map_hf_name(self, hf_name: str) -> tuple[str, int | None] | None:
        """HF name -> (our parameter name, row offset into a fused parameter or None)."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        name = hf_name.removeprefix("model.")
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None  # tied: the embedding is the head
        if ".block_sparse_moe." in name:
            for old, new in self._MIXTRAL_RENAMES:
                name = name.replace(old, new)
        match = re.fullmatch(r"(layers\.\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", name)
        if match:
            layer, proj, kind = match.groups()
            return f"{layer}.self_attn.qkv_proj.{kind}", self._qkv_offsets()[proj]
        # Dense MLP or Qwen2-MoE's shared expert: gate/up fused into one parameter.
        match = re.fullmatch(r"(layers\.\d+\.mlp(?:\.shared_expert)?)\.(gate_proj|up_proj)\.weight", name)
        if match:
            prefix, proj = match.groups()
            width = self.config.shared_expert_intermediate_size if prefix.endswith("shared_expert") \
                else self.config.intermediate_size
            return f"{prefix}.gate_up_proj.weight", 0 if proj == "gate_proj" else width
        # One expert's tensor: a row slice of the stacked expert parameters (see moe.py).
        match = re.fullmatch(r"(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if match:
            prefix, expert, proj = match.groups()
            e, inter, hidden = int(expert), self.config.moe_intermediate_size, self.config.hidden_size
            if proj == "down_proj":
                return f"{prefix}.down_proj", e * hidden
            return f"{prefix}.gate_up_proj", 2 * inter * e + (0 if proj == "gate_proj" else inter)
        return name, None

    def _hf_names_for(self, name: str) -> list[str]:
        if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
            kind = name.rsplit(".", 1)[1]
            base = name.removesuffix(f"qkv_proj.{kind}")
            return [f"model.{base}{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj")]
        if name.endswith("gate_up_proj.weight"):
            base = name.removesuffix("gate_up_proj.weight")
            return [f"model.{base}gate_proj.weight", f"model.{base}up_proj.weight"]
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            base, proj = name.rsplit(".", 1)
            projs = ("down_proj",) if proj == "down_proj" else ("gate_proj", "up_proj")
            return [f"model.{base}.{e}.{p}.weight" for e in range(self.config.num_experts) for p in projs]
        if name == "lm_head.weight":
            return [name]
        return [f"model.{name}"]
