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
packed for pinfer's GEMM, PackedLinear.own_kernel; int8 with its VNNI copy; or int4 with its
W4A8 copy), and no per-layer hooks (trace layer spans). Everywhere else
the modules run as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pinfer import kernels
from pinfer.model.attention.base import Int8KV
from pinfer.model.layers.norm import RMSNorm
from pinfer.model.packed_linear import PackedLinear
from pinfer.model.quantization import Int4Linear, Int8Linear

_NO_BIAS = torch.empty(0)
BF16, INT8, INT4 = 0, 1, 2  # the linear kinds decode_layers takes (cpu_ops.cpp LinearKind)
_PLAN = "_fused_decode_plan"  # where a model keeps its plan

Ref = tuple[dict, str]  # a module's _parameters / _buffers / __dict__, and a name in it


def _ref(module: nn.Module, name: str) -> Ref:
    """Where module.<name> lives (a parameter set to None, e.g. no bias, is a plain attribute)."""
    for where in (module._parameters, module._buffers, vars(module)):
        if name in where:
            return where, name
    raise AttributeError(f"{type(module).__name__} has no {name!r}")


def _linear_refs(linear: nn.Module) -> tuple[int, list[Ref], list[tuple[Ref, object]]] | None:
    """(kind, where the tensors the kernel reads live, (flag, value) pairs that must hold) of a
    linear whose forward is one of the kernel's matmuls, else None."""
    if isinstance(linear, PackedLinear) and linear.own_kernel and linear.packed_weight is not None:
        return BF16, [_ref(linear, "packed_weight")], [(_ref(linear, "own_kernel"), True)]
    if isinstance(linear, Int8Linear) and linear.qweight_vnni.numel() and kernels.has("int8_gemm"):
        return INT8, [_ref(linear, name) for name in ("qweight_vnni", "qweight_sums", "scale")], []
    if isinstance(linear, Int4Linear) and linear.qweight_w4a8.numel() and kernels.has("int4_gemm"):
        return INT4, [_ref(linear, "qweight_w4a8")], []
    return None


@dataclass
class _StackPlan:
    """Where decode_layers' tensors live in a model, found once: reading ~600 module attributes
    through nn.Module.__getattr__ at every step cost ~0.4 ms, 4-5% of a batch-1 token. The
    tensors themselves are read at every step (dict lookups), so weight updates, repacking and
    huge-page moves are seen; replacing a submodule voids the plan (`walked`)."""

    backend: str
    layers: list[nn.Module]
    walked: list[tuple[dict, str, nn.Module, type]]  # (parent's _modules, name, module, its class)
    flags: list[tuple[Ref, object]]
    norms: list[Ref]
    weights: list[Ref]
    biases: list[Ref]
    kind: int
    window: int

    def holds(self, backend) -> bool:
        return backend.name == self.backend and all(
            flag[0].get(flag[1]) == value for flag, value in self.flags) and all(
            modules.get(name) is module and type(module) is cls for modules, name, module, cls in self.walked)


def _make_plan(model: nn.Module, backend) -> _StackPlan | None:
    config = model.config
    rotary = model.layers[0].self_attn.rotary
    if (backend.name != "paged" or not kernels.has("decode_layers") or config.qk_norm
            or rotary.rotary_dim != config.head_dim or config.head_dim % 16):
        return None
    walked: list[tuple[dict, str, nn.Module, type]] = []

    def child(parent: nn.Module, name: str) -> nn.Module:
        module = parent._modules[name]
        walked.append((parent._modules, name, module, type(module)))
        return module

    layers_list = child(model, "layers")
    layers = [child(layers_list, str(i)) for i in range(len(layers_list))]
    norms: list[Ref] = []
    weights: list[Ref] = []
    biases: list[Ref] = []
    flags: list[tuple[Ref, object]] = []
    kinds, windows = set(), set()
    for index, layer in enumerate(layers):
        if config.is_moe_layer(index) or type(layer._modules["input_layernorm"]) is not RMSNorm:
            return None  # an expert layer, another norm
        attn, mlp = child(layer, "self_attn"), child(layer, "mlp")
        windows.add(attn.sliding_window or 0)
        norms += [_ref(child(layer, name), "weight") for name in ("input_layernorm", "post_attention_layernorm")]
        for parent, name in ((attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")):
            linear = child(parent, name)
            refs = _linear_refs(linear)
            if refs is None:
                return None
            kinds.add(refs[0])
            weights += refs[1]
            flags += refs[2]
            biases.append(_ref(linear, "bias"))
    norms.append(_ref(child(model, "norm"), "weight"))
    if len(kinds) != 1 or len(windows) != 1:
        return None
    return _StackPlan(backend.name, layers, walked, flags, norms, weights, biases, kinds.pop(), windows.pop())


def stack_tensors(model: nn.Module, backend) -> tuple[list, list, list, int, int] | None:
    """(norms, weights, biases, linear kind, sliding window or 0) for decode_layers, or None
    where it does not apply. The tensors are read from the modules at every step (through a
    plan of where they live, _StackPlan), so weight updates and repacking are always seen."""
    plan = model.__dict__.get(_PLAN)
    if plan is None or not plan.holds(backend):
        plan = _make_plan(model, backend)
        model.__dict__[_PLAN] = plan
        if plan is None:
            return None
    if any(layer._forward_hooks or layer._forward_pre_hooks for layer in plan.layers):
        return None  # traced layer spans
    norms = [where[name] for where, name in plan.norms]
    weights = [where[name] for where, name in plan.weights]
    if any(t is None for t in weights) or any(n.dtype != torch.bfloat16 for n in norms):
        return None
    biases = [_NO_BIAS if (bias := where[name]) is None else bias for where, name in plan.biases]
    return norms, weights, biases, plan.kind, plan.window


def decode_stack(model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, kv_caches, meta,
                 backend) -> torch.Tensor | None:
    """The final hidden states of a pure decode step from one kernel call, or None (run the modules)."""
    if not (meta.is_pure_decode and kernels.usable(hidden) and hidden.dtype == torch.bfloat16):
        return None
    k_pools, v_pools = [k for k, _ in kv_caches], [v for _, v in kv_caches]
    if isinstance(k_pools[0], Int8KV):  # int8 pools: their data and scales (the kernel's int8 attention)
        if model.config.head_dim not in (64, 128, 256) or not kernels.has("paged_decode_attention_int8"):
            return None
        k_scales, v_scales = [k.scale for k in k_pools], [v.scale for v in v_pools]
        k_pools, v_pools = [k.data for k in k_pools], [v.data for v in v_pools]
    elif k_pools[0].dtype == torch.bfloat16:
        k_scales = v_scales = []
    else:
        return None
    tensors = stack_tensors(model, backend)
    if tensors is None:
        return None
    norms, weights, biases, kind, window = tensors
    config, rotary = model.config, model.layers[0].self_attn.rotary
    return torch.ops.pinfer.decode_layers(
        hidden, positions, k_pools, v_pools, k_scales, v_scales, meta.slot_mapping,
        meta.block_tables, meta.context_lens, rotary.cos, rotary.sin, norms, weights, biases, kind,
        config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps,
        model.layers[0].self_attn.scale, window)
