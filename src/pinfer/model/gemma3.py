"""Gemma 3 (text): the Llama-family layout with Gemma's differences.

- embeddings scaled by sqrt(hidden_size), the scale rounded to the model dtype;
- RMSNorm weights stored as an offset, applied as x * (1 + w) in float32;
- four norms per layer (around attention and around the MLP) and q/k norms per head;
- GeGLU MLP (tanh-approximated GELU on the gate);
- attention scale query_pre_attn_scalar ** -0.5;
- local (sliding-window) and global layers, each with its own RoPE base;
- optional tanh soft-capping of the final logits.

The flattened-batch forward, fused qkv / gate_up projections and the weight
loading contract (HF names, `name@offset` keys) are the ones of llama.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pinfer.config import ModelConfig, RopeConfig
from pinfer.errors import UnsupportedArchitectureError
from pinfer.model.attention.base import AttentionBackend, AttentionMetadata, store_and_attend
from pinfer.model.layers.rotary import RotaryEmbedding
from pinfer.model.llama import LlamaForCausalLM

SLIDING, FULL = "sliding_attention", "full_attention"

# HF activation name -> the `approximate` argument of torch's GELU.
GELU_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


def gemma3_layer_types(config: ModelConfig) -> list[str]:
    """Per layer: sliding (local) or full (global) attention, from layer_types or the pattern
    (transformers' default: every `sliding_window_pattern`-th layer, 6, is global)."""
    if config.layer_types:
        if len(config.layer_types) != config.num_layers:
            raise UnsupportedArchitectureError(
                f"layer_types has {len(config.layer_types)} entries for {config.num_layers} layers"
            )
        unknown = set(config.layer_types) - {SLIDING, FULL}
        if unknown:
            raise UnsupportedArchitectureError(f"unsupported Gemma 3 layer types {sorted(unknown)}")
        return list(config.layer_types)
    pattern = config.sliding_window_pattern or 6
    return [SLIDING if (i + 1) % pattern else FULL for i in range(config.num_layers)]


class GemmaRMSNorm(nn.Module):
    """RMSNorm with the weight stored as an offset from 1: (x * (1 + w)) in float32, then cast."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        scalar = config.query_pre_attn_scalar if config.query_pre_attn_scalar is not None else config.head_dim
        self.scale = float(scalar) ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.qkv_bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = rotary
        self.sliding_window = sliding_window

    def forward(self, hidden, positions, kv_cache, meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = store_and_attend(q, k, v, kv_cache, meta, backend, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(-1, self.q_size))


class Gemma3MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)), with gate and up fused."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.approximate = GELU_ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate=self.approximate) * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.self_attn = Gemma3Attention(config, rotary, sliding_window)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.mlp = Gemma3MLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, hidden, positions, kv_cache, meta, backend) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden), positions, kv_cache, meta, backend)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Inherits the weight side from LlamaForCausalLM (HF names, fused qkv / gate_up,
    load_weights, expected_weight_keys, tie_weights); builds its own layers."""

    def __init__(self, config: ModelConfig, max_positions: int):
        nn.Module.__init__(self)  # not LlamaForCausalLM.__init__: different layers
        if config.attn_logit_softcapping is not None:
            raise UnsupportedArchitectureError(
                f"{config.architecture}: attn_logit_softcapping (Gemma 2 style attention soft-capping) "
                f"is not implemented"
            )
        if config.hidden_act not in GELU_ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"unsupported activation {config.hidden_act!r} for {config.architecture}; "
                f"supported: {', '.join(GELU_ACTIVATIONS)}"
            )
        self.config = config
        self.layer_types = gemma3_layer_types(config)
        if SLIDING in self.layer_types and not config.sliding_window:
            raise UnsupportedArchitectureError(f"{config.architecture}: sliding layers but no sliding_window set")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        # Two rotary tables shared by the layers of each kind: local layers use their own
        # base (rope_local_base_freq) and no scaling; global ones use rope_theta + rope_scaling.
        local_rope = config.rope_local or RopeConfig(theta=10000.0)
        rotaries = {
            SLIDING: RotaryEmbedding(config.head_dim, max_positions, local_rope),
            FULL: RotaryEmbedding(config.head_dim, max_positions, config.rope),
        }
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, rotaries[kind], config.sliding_window if kind == SLIDING else None)
            for kind in self.layer_types
        )
        # Global layers read the whole context, so no KV block can be freed early -- unless none is global.
        self.shared_sliding_window = config.sliding_window if FULL not in self.layer_types else None
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # final hidden states [num_tokens, hidden]
        hidden = self.embed_tokens(input_ids)
        # As transformers: the scale is a float32 scalar cast to the weights' dtype first.
        hidden = hidden * torch.tensor(self.embed_scale, dtype=torch.float32).to(hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(hidden, positions, kv_cache, meta, backend)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
