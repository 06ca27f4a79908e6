"""Megatron-style tensor parallelism for a loaded Llama-family model, applied in place.

Every rank holds a 1/N slice of each big matrix; two collectives per layer put the
pieces back together:

    qkv_proj, gate_up_proj   column-parallel: this rank's q heads + kv heads / intermediate
                             rows; no communication (the activations stay sharded)
    o_proj, down_proj        row-parallel: this rank's input columns; partial sums are
                             all-reduced, so every rank has the full hidden state again
    embed_tokens             vocab-parallel: this rank's rows; ids outside them give 0,
                             then an all-reduce
    lm_head                  vocab-parallel: this rank's rows; logits gathered on rank 0

Each rank keeps the q heads whose kv heads it owns (GQA groups are never split), so
attention, the KV pool and the backends run unchanged on fewer heads.

The simple, honest version: every rank loads the whole checkpoint (load_model) and then
slices it, so each rank briefly holds the full model. A production loader would read
only its shard from the safetensors/GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pinfer.config import ModelConfig
from pinfer.errors import PinferError


@dataclass(frozen=True)
class ShardInfo:
    rank: int
    world_size: int

    def range(self, total: int) -> tuple[int, int]:
        """[start, end) of this rank's equal share of `total` rows/columns/heads."""
        per = total // self.world_size
        return self.rank * per, (self.rank + 1) * per


def check_tensor_parallel(config: ModelConfig, tp: int, quantization: str | None = None) -> None:
    """Refuse, before any process starts or weight loads, what cannot be split `tp` ways."""
    if tp == 1:
        return
    if config.architecture.startswith("Gemma3"):
        raise PinferError(f"tensor_parallel_size={tp}: Gemma 3 is not supported with tensor parallelism yet "
                          f"(only dense Llama-family models); use tensor_parallel_size=1")
    if config.num_experts:
        raise PinferError(f"tensor_parallel_size={tp}: mixture-of-experts models ({config.architecture}) are not "
                          f"supported with tensor parallelism yet; use tensor_parallel_size=1")
    if quantization is not None:
        raise PinferError(f"tensor_parallel_size={tp} with quantization={quantization!r} is not supported; "
                          f"quantize or split, not both")
    sizes = {"attention heads (num_attention_heads)": config.num_heads,
             "KV heads (num_key_value_heads)": config.num_kv_heads,
             "vocabulary (vocab_size)": config.vocab_size,
             "MLP width (intermediate_size)": config.intermediate_size}
    uneven = [f"{name} = {n}" for name, n in sizes.items() if n % tp]
    if uneven:
        raise PinferError(
            f"tensor_parallel_size={tp} must divide the model's {', '.join(uneven)} "
            f"({config.architecture}: {config.num_heads} heads, {config.num_kv_heads} KV heads, "
            f"vocab {config.vocab_size}, intermediate {config.intermediate_size}); pick a size that divides them all"
        )


# ---- layers that talk to the other ranks ---------------------------------------------


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard @ W[:, shard].T) (+ bias once): the input arrives sharded."""

    def __init__(self, linear: nn.Linear, shard: ShardInfo):
        super().__init__()
        start, end = shard.range(linear.in_features)
        self.weight = nn.Parameter(linear.weight.data[:, start:end].contiguous(), requires_grad=False)
        self.bias = linear.bias  # added after the reduce, so it counts once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """This rank's vocabulary rows; every rank looks up all ids, zeroes those it does not own,
    and the all-reduce adds the one rank's row that is not zero."""

    def __init__(self, embedding: nn.Embedding, shard: ShardInfo):
        super().__init__()
        self.start, self.end = shard.range(embedding.num_embeddings)
        self.weight = nn.Parameter(embedding.weight.data[self.start:self.end].contiguous(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < self.start) | (input_ids >= self.end)
        local = (input_ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill_(outside[:, None], 0)
        dist.all_reduce(out)
        return out


class VocabParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary slice, gathered on rank 0 (the only one that samples).
    Returns [n, vocab] on rank 0 and None on the others."""

    def __init__(self, weight: nn.Parameter, shard: ShardInfo):
        super().__init__()
        self.weight = weight  # already sliced: the (tied) embedding's, or the head's own
        self.shard = shard

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        local = F.linear(hidden, self.weight).contiguous()
        if self.shard.rank != 0:
            dist.gather(local, dst=0)
            return None
        parts = [torch.empty_like(local) for _ in range(self.shard.world_size)]
        dist.gather(local, parts, dst=0)
        return torch.cat(parts, dim=-1)


# ---- sharding a loaded model ---------------------------------------------------------


def _keep_rows(linear: nn.Linear, ranges: list[tuple[int, int]]) -> None:
    """Keep only the given row ranges of a (fused) linear's weight and bias, in order."""
    linear.weight = nn.Parameter(torch.cat([linear.weight.data[a:b] for a, b in ranges]), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.cat([linear.bias.data[a:b] for a, b in ranges]), requires_grad=False)
    linear.out_features = linear.weight.shape[0]


def _shard_attention(attn: nn.Module, shard: ShardInfo) -> None:
    d, q_size, kv_size = attn.head_dim, attn.q_size, attn.kv_size
    h0, h1 = shard.range(attn.num_heads)
    k0, k1 = shard.range(attn.num_kv_heads)
    # fused rows [q | k | v]: this rank's q heads, then its k heads, then its v heads
    _keep_rows(attn.qkv_proj, [(h0 * d, h1 * d), (q_size + k0 * d, q_size + k1 * d),
                               (q_size + kv_size + k0 * d, q_size + kv_size + k1 * d)])
    attn.o_proj = RowParallelLinear(attn.o_proj, shard)
    attn.num_heads, attn.num_kv_heads = h1 - h0, k1 - k0
    attn.q_size, attn.kv_size = attn.num_heads * d, attn.num_kv_heads * d


def _shard_mlp(mlp: nn.Module, shard: ShardInfo) -> None:
    width = mlp.intermediate_size
    i0, i1 = shard.range(width)
    _keep_rows(mlp.gate_up_proj, [(i0, i1), (width + i0, width + i1)])  # fused rows [gate | up]
    mlp.down_proj = RowParallelLinear(mlp.down_proj, shard)
    mlp.intermediate_size = i1 - i0


@torch.no_grad()
def shard_model(model: nn.Module, rank: int, world_size: int) -> nn.Module:
    """Slice a loaded dense Llama-family model to rank `rank`'s share, in place.

    check_tensor_parallel() must have accepted the config. Afterwards forward() and
    compute_logits() are collectives: every rank must call them with the same shapes.
    """
    shard = ShardInfo(rank, world_size)
    for layer in model.layers:
        _shard_attention(layer.self_attn, shard)
        _shard_mlp(layer.mlp, shard)
    tied = model.lm_head.weight is model.embed_tokens.weight
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, shard)
    head_weight = model.embed_tokens.weight if tied else nn.Parameter(
        model.lm_head.weight.data[slice(*shard.range(model.config.vocab_size))].contiguous(), requires_grad=False)
    model.lm_head = VocabParallelLMHead(head_weight, shard)
    return model
