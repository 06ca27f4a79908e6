"""A decode step's decoder stack in one kernel call (kernels/cpu_ops.cpp decode_layers).

When every sequence of a step feeds one token, a Llama-family layer is a fixed sequence of
pinfer's CPU kernels: add+norm, qkv GEMM, RoPE, KV store, paged decode attention, o GEMM,
add+norm, gate/up GEMM, SwiGLU, down GEMM. Run from Python, each layer also costs ~25
interpreter-level calls (module calls, views, checks): ~5 ms of a ~15 ms batch-1 token on 2
cores (less of a batch-64 step, where the matmuls dominate). decode_layers runs the same
kernels in the same order from C++, so the outputs are the module path's bits
(tests/model/test_fused_decode.py checks).

It applies only where every layer would take exactly those kernels: bf16, the paged backend,
no q/k norms (Qwen3), no experts, full-width RoPE, one kind of linear in every layer (bf16
packed for pinfer's GEMM, PackedLinear.own_kernel; int8 with its VNNI copy; or int4, whose
torch matmul it calls from C++), and no per-layer hooks (trace layer spans). Everywhere else
the modules run as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from pinfer import kernels
from pinfer.model.layers.norm import RMSNorm
from pinfer.model.packed_linear import PackedLinear
from pinfer.model.quantization import Int4Linear, Int8Linear

_NO_BIAS = torch.empty(0)
BF16, INT8, INT4 = 0, 1, 2  # the linear kinds decode_layers takes (cpu_ops.cpp LinearKind)


def _linear_tensors(linear: nn.Module) -> tuple[int, int, list[torch.Tensor]] | None:
    """(kind, int4 group size or 0, the tensors the kernel reads) of a linear whose forward is
    one of the kernel's matmuls, else None."""
    if isinstance(linear, PackedLinear) and linear.own_kernel and linear.packed_weight is not None:
        return BF16, 0, [linear.packed_weight]
    if isinstance(linear, Int8Linear) and linear.qweight_vnni.numel() and kernels.has("int8_gemm"):
        return INT8, 0, [linear.qweight_vnni, linear.qweight_sums, linear.scale]
    if isinstance(linear, Int4Linear) and not linear.batch_invariant:
        return INT4, linear.group_size, [linear.qweight, linear.scales_and_zeros]
    return None


def stack_tensors(model: nn.Module, backend) -> tuple[list, list, list, tuple[int, int], int] | None:
    """(norms, weights, biases, (linear kind, int4 group size), sliding window or 0) for
    decode_layers, or None where it does not apply. Read from the modules at every step, so
    weight updates and repacking are always seen."""
    config = model.config
    rotary = model.layers[0].self_attn.rotary
    if (backend.name != "paged" or not kernels.has("decode_layers") or config.qk_norm
            or rotary.rotary_dim != config.head_dim or config.head_dim % 16):
        return None
    norms: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    kinds, windows = set(), set()
    for index, layer in enumerate(model.layers):
        if (layer._forward_hooks or layer._forward_pre_hooks or config.is_moe_layer(index)
                or type(layer.input_layernorm) is not RMSNorm):
            return None  # traced layer spans, an expert layer, another norm
        attn, mlp = layer.self_attn, layer.mlp
        windows.add(attn.sliding_window or 0)
        norms += (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            packed = _linear_tensors(linear)
            if packed is None:
                return None
            kinds.add(packed[:2])
            weights += packed[2]
            biases.append(_NO_BIAS if linear.bias is None else linear.bias)
    norms.append(model.norm.weight)
    if len(kinds) != 1 or len(windows) != 1 or any(n.dtype != torch.bfloat16 for n in norms):
        return None
    return norms, weights, biases, kinds.pop(), windows.pop()


def decode_stack(model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, kv_caches, meta,
                 backend) -> torch.Tensor | None:
    """The final hidden states of a pure decode step from one kernel call, or None (run the modules)."""
    if not (meta.is_pure_decode and kernels.usable(hidden) and hidden.dtype == torch.bfloat16
            and kv_caches[0][0].dtype == torch.bfloat16):
        return None
    tensors = stack_tensors(model, backend)
    if tensors is None:
        return None
    norms, weights, biases, (kind, group_size), window = tensors
    config, rotary = model.config, model.layers[0].self_attn.rotary
    return torch.ops.pinfer.decode_layers(
        hidden, positions, [k for k, _ in kv_caches], [v for _, v in kv_caches], meta.slot_mapping,
        meta.block_tables, meta.context_lens, rotary.cos, rotary.sin, norms, weights, biases, kind, group_size,
        config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps,
        model.layers[0].self_attn.scale, window)
