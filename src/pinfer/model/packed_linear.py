"""Linear weights pre-packed for oneDNN, the CPU analogue of a GPU engine's weight layout.

F.linear on a bf16 CPU tensor hands oneDNN a plain row-major weight, which it re-lays out
into its blocked format inside every call. Packing once at load (what inductor's freezing
does) removes that work: measured on the AMD EPYC (1 thread, SmolLM2-135M's 30 layers of
qkv/o/gate_up/down weights, too big for the caches), bf16 batch 1 17.5-18 ms instead of
31-32 ms, batch 64 78-80 ms instead of 98 ms; float32 batch 64 150 vs 194 ms. In bf16
without a bias the outputs are bit-for-bit those of F.linear, which is oneDNN as well
(checked at 1, 3, 64 and 700 rows); with a bias (Qwen2's qkv), and in float32, where
F.linear is MKL's sgemm, they agree to float rounding (other summation orders).

The packed copy replaces the dense weight, so memory does not grow: each packed module's
weight Parameter keeps its shape in `dense_shape` and holds an empty tensor; state_dict()
gives the dense values. Code that writes weights (the model's load_weights, behind
update_weights and wake_up's reload; sleep's release) runs inside dense_weights(model),
which unpacks (exact: the packed tensor's to_dense()) and packs again afterwards. A weight
shared with another module (a tied lm_head is the embedding) keeps its dense storage.

With pinfer's CPU kernels (kernels/), bf16 weights are packed for their own GEMM instead,
[N/16, K/2, 16, 2] (pairs of k for 16 columns: the vdpbf16ps operand): it streams the
weight at batch 1 at the machine's read rate, 1.7x faster than oneDNN there and ~1.2x at
batch 64 (examples/kernel_microbench.py); its outputs are oneDNN's bits except where
oneDNN splits K differently (a few in 10^4 elements, one bf16 rounding apart).

On CPUs without AVX-512, oneDNN cannot pack bf16 weights: with AVX2 the own GEMM takes them
(kernels/cpu_ops_avx2.cpp), else they stay dense for F.linear.

Not used with deterministic mode (its batch-invariant matmuls replace aten's at dispatch,
which the packed op bypasses), tensor parallelism, quantized linears (their own kernels),
or off the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pinfer import kernels
from pinfer.model.huge_pages import move_to_huge_pages

PACK_BATCH_HINT = 64  # oneDNN picks the blocked layout for this many rows; measured as good for 1 too


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and torch.backends.mkldnn.is_available()


def onednn_packs(dtype: torch.dtype) -> bool:
    """oneDNN refuses bf16 weights on CPUs without AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT."""
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Linear):
    """nn.Linear whose forward runs oneDNN on a pre-packed copy of the weight (see the module doc)."""

    packed_weight: torch.Tensor | None = None
    dense_shape: torch.Size | None = None
    owns_weight: bool = True  # False: the weight is shared (tied) and stays dense
    own_kernel: bool = False  # packed for kernels/cpu_ops.cpp's bf16_gemm, else for oneDNN

    def pack(self) -> None:
        weight = self.weight.detach()
        n, k = self.dense_shape = weight.shape
        self.own_kernel = (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and n % 16 == 0
                           and k % 2 == 0 and kernels.has("bf16_gemm"))
        if self.own_kernel:
            self.packed_weight = kernels.pack_for_gemm(weight).contiguous()
        elif onednn_packs(weight.dtype):
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        else:  # bf16 on a CPU where neither our GEMM nor oneDNN takes it: F.linear on the dense weight
            return
        if self.owns_weight:
            self.weight.data = weight.new_empty(0)

    def unpack(self) -> None:
        if self.packed_weight is None:
            return
        if self.owns_weight:
            self.weight.data = self._dense()
        self.packed_weight = None

    def _dense(self) -> torch.Tensor:
        if self.own_kernel:
            return kernels.unpack_from_gemm(self.packed_weight)
        return self.packed_weight.to_dense()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed_weight is not None and self.owns_weight:  # the dense values, not the empty placeholder
            destination[prefix + "weight"] = self._dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is None:
            return F.linear(x, self.weight, self.bias)
        if self.own_kernel:  # the layout is the kernel's, so it runs whether or not kernels.active()
            out = torch.ops.pinfer.bf16_gemm(x.reshape(-1, x.shape[-1]).contiguous(), self.packed_weight, self.bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Turn every plain nn.Linear of `model` into a packed PackedLinear (and pack unpacked ones
    again), in place; returns how many."""
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    modules = []
    for module in model.modules():
        if type(module) is nn.Linear or (isinstance(module, PackedLinear) and module.packed_weight is None):
            module.__class__ = PackedLinear  # keeps the parameters and their names
            module.owns_weight = id(module.weight) not in shared
            modules.append(module)
    _pack(modules)
    return len(modules)


def _pack(modules: list[PackedLinear]) -> None:
    for module in modules:
        module.pack()
    # pinfer's own layout is a plain tensor: into one buffer of 2 MiB pages (huge_pages.py)
    move_to_huge_pages([(m, "packed_weight") for m in modules if m.own_kernel])


def packed_modules(model: nn.Module) -> list[PackedLinear]:
    return [m for m in model.modules() if isinstance(m, PackedLinear) and m.packed_weight is not None]


@contextlib.contextmanager
def dense_weights(model: nn.Module, repack: bool = True) -> Iterator[None]:
    """Dense, writable weights inside the block; packed again after it (repack=False: left dense)."""
    modules = packed_modules(model)
    for module in modules:
        module.unpack()
    try:
        yield
    finally:
        if repack:
            _pack(modules)
