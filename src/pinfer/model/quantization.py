"""Quantized linears (CPU) and the function that puts them into a loaded model.

    int8: weights int8, one float32 scale per output row (symmetric). Activations
          are quantized to int8 on the fly, one scale per row (token), and
          multiplied with torch._int_mm (oneDNN, VNNI/AMX int8): faster than
          bfloat16 at batch 1 and batch 64, and batch-invariant (an int32 sum is
          exact, and nothing is shared between rows). With pinfer's CPU kernels the
          same arithmetic runs fused in one op, a VNNI GEMM (kernels/cpu_ops.cpp) on
          a copy of the weight packed for it (+1 byte per weight): over SmolLM2's
          121 matrices ~2x _int_mm at batch 1 (1.6x the row-major GEMV it replaced)
          and 1.6-1.8x at batch 64 (examples/kernel_microbench.py).
    int4: weights 4-bit, one scale and one offset per group of 32 inputs
          (w = scale * q + zero, q in 0..15: GGUF Q4_1's format, so a Q4_0/Q4_1
          file's blocks load as they are). bfloat16 activations (torch's int4 CPU
          kernel): fastest at batch 1, slower than bfloat16 for large batches.

Kernel timings behind these choices (ms per linear, 1 thread, weights cycled over 30
copies so they come from memory as in a real decode step; a 2-core VM shared with
other jobs, so +-30%; torch 2.13):

                      M   fp32   bf16   w8a16  w4a16  w8a8 row (int8)  w8a8 fbgemm
    qkv 576->960      1   0.22   0.16   0.06   0.03   0.08-0.11        0.03
                      64  1.29   0.64   1.43   1.24   0.44-0.58        0.36
    gate_up 576->3072 1   0.96   0.60   0.40   0.10   0.41-0.50        0.11
                      64  4.07   2.16   3.39   3.03   1.31-1.87        0.67
    down 1536->576    1   0.38   0.19   0.10   0.05   0.19-0.31        0.04
                      64  2.80   1.30   2.87   2.64   0.88-1.13        0.61
    lm_head 576->49k  1   15.1   10.9   4.27   1.56   4.1-4.3          0.85
                      64  98.0   35.6   149    65.1   23.7-32          19.1

w8a16 = torch._weight_int8pack_mm, w4a16 = torch._weight_int4pack_mm_for_cpu (both
30-60x slower again with float32 activations, hence bfloat16 inside). fbgemm's
dynamic linear (torch.ops.quantized.linear_dynamic) is the fastest, but it has one
activation scale for the whole batch: SmolLM2's perplexity on tests/data went from
16.89 to 26.26 with it, 16.90 with per-row scales. aten._dyn_quant_matmul_4bit is a
scalar reference kernel on x86 (~90 ms for the head). The whole engine:
`pinfer bench -q none,int8,int4`.

Which layers: every decoder linear (qkv_proj, o_proj, gate_up_proj, down_proj) and
lm_head (int8 in both modes: see quantize_model); a tied head gets its own quantized
copy (the embedding lookup stays in the model dtype). MoE experts (stacked parameters, not nn.Linear) and routers stay float.
Deterministic mode: int8 is batch-invariant as it is; int4 runs on fixed 32-row
tiles, like model/batch_invariant.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pinfer import kernels
from pinfer.errors import ModelLoadError, PinferError

QUANTIZATION_MODES = ("int8", "int4")
INT4_GROUP_SIZE = 32  # GGUF's Q4_0/Q4_1 block: one file block is one group
_INT4_ROW_BLOCK = 16  # the int4 CPU packing interleaves 16 output rows
_TILE_ROWS = 32  # deterministic int4: same tile height as model/batch_invariant.py
QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


# ---- quantizing a float weight ------------------------------------------------------


@dataclass
class Int8Weight:
    qweight: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]: w ~ scale * q


@dataclass
class Int4Weight:
    qweight: torch.Tensor  # int32 [N, K], values 0..15
    scale: torch.Tensor  # float32 [N, K / group]
    zero: torch.Tensor  # float32 [N, K / group]: w ~ scale * q + zero (GGUF Q4_1's d, m)

    def rows(self, index: torch.Tensor) -> Int4Weight:
        return Int4Weight(self.qweight[index], self.scale[index], self.zero[index])


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-row int8 (-127..127)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weight:
    """Asymmetric min/max int4 per group of `group_size` inputs (as llama.cpp's Q4_1)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    return Int4Weight(q.reshape(n, k), scale, lo)


def dequantize(weight: Int8Weight | Int4Weight) -> torch.Tensor:
    """float32 [N, K]: what a quantized linear multiplies by (up to its scale dtype)."""
    if isinstance(weight, Int8Weight):
        return weight.qweight.float() * weight.scale[:, None]
    n, k = weight.qweight.shape
    q = weight.qweight.float().reshape(n, weight.scale.shape[1], -1)
    return (q * weight.scale[..., None] + weight.zero[..., None]).reshape(n, k)


# ---- the linears --------------------------------------------------------------------


class _QuantizedLinear(nn.Module):
    """Common part: shapes, an optional float bias (a normal parameter, loaded by name)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, batch_invariant: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.batch_invariant = batch_invariant
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = self._matmul(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize and store a whole float weight [N, K]."""
        self.set_rows(0, weight)

    def set_rows(self, offset: int, rows: torch.Tensor | Int8Weight | Int4Weight) -> None:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantizedLinear):
    """int8 per-channel weights, int8 dynamic activations with one scale per row (token)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None,
                 batch_invariant: bool = False):
        super().__init__(in_features, out_features, bias, batch_invariant)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        # Derived from qweight, for the CPU kernels (kernels/cpu_ops.cpp), kept with it: its row
        # sums, and (when the shape allows) a copy in the layout of the VNNI GEMM, [N/16, K/4, 16, 4].
        self.register_buffer("qweight_sums", torch.zeros(out_features, dtype=torch.int32), persistent=False)
        packable = out_features % 16 == 0 and in_features % 4 == 0
        self.register_buffer("qweight_vnni", torch.zeros(
            (out_features // 16, in_features // 4, 16, 4) if packable else (0,), dtype=torch.int8), persistent=False)

    def set_rows(self, offset: int, rows: torch.Tensor | Int8Weight) -> None:
        q = rows if isinstance(rows, Int8Weight) else quantize_int8(rows)
        end = offset + q.qweight.shape[0]
        self.qweight[offset:end] = q.qweight
        self.scale[offset:end] = q.scale
        self.qweight_sums[offset:end] = q.qweight.sum(dim=1, dtype=torch.int32)
        if self.qweight_vnni.numel():  # repack the 16-row blocks that the new rows touch
            first, last = offset // 16, -(-end // 16)
            self.qweight_vnni[first:last] = kernels.pack_for_gemm(self.qweight[first * 16:last * 16])

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Per-row scales: a row's result never depends on the other rows, and the int32
        # sum is exact, so this is batch-invariant in every mode (no tiles needed).
        if kernels.usable(x) and kernels.has("quantize_rows"):
            # The same ops fused (kernels/cpu_ops.cpp), so the same bits: a VNNI GEMM on the
            # packed copy, or where the shape has none, quantize -> _int_mm -> rescale.
            x = x.contiguous()
            if self.qweight_vnni.numel() and kernels.has("int8_gemm"):
                return torch.ops.pinfer.int8_gemm(x, self.qweight_vnni, self.qweight_sums, self.scale)
            xq, x_scale = torch.ops.pinfer.quantize_rows(x)
            return torch.ops.pinfer.dequantize_rows(torch._int_mm(xq, self.qweight.t()), x_scale, self.scale, x.dtype)
        x = x.float()
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        xq = torch.round(x / x_scale).to(torch.int8)
        return torch._int_mm(xq, self.qweight.t()) * x_scale * self.scale


class Int4Linear(_QuantizedLinear):
    """int4 group-wise weights (w = scale * q + zero per group).

    With the CPU kernels, and groups of 32, the matmul is pinfer's int4_gemm on a packed copy
    (`qweight_w4a8`, +0.625 bytes a weight): the activations are quantized to int8 per row, as
    Int8Linear does and llama.cpp does for Q4 x Q8 dot products, and the group sums are exact
    in int32. Else (no kernels, deterministic mode) torch's int4 matmul with bf16 activations.
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None,
                 batch_invariant: bool = False, group_size: int = INT4_GROUP_SIZE):
        super().__init__(in_features, out_features, bias, batch_invariant)
        self.group_size = group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        # The kernel's layout [K / group, N, (scale, zero)], with w = (q - 8) * scale + zero,
        # in the activations' dtype (it refuses float32 scales with bfloat16 inputs).
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16))
        packable = group_size == 32 and out_features % 16 == 0 and in_features % 32 == 0 and not batch_invariant
        self.register_buffer("qweight_w4a8", torch.zeros(
            (out_features // 16, in_features // 32, 5, 64) if packable else (0,), dtype=torch.uint8), persistent=False)

    def set_rows(self, offset: int, rows: torch.Tensor | Int4Weight) -> None:
        q = rows if isinstance(rows, Int4Weight) else quantize_int4(rows, self.group_size)
        n = q.qweight.shape[0]
        if offset % _INT4_ROW_BLOCK or n % _INT4_ROW_BLOCK:
            raise PinferError(f"int4 rows are packed {_INT4_ROW_BLOCK} at a time; cannot write rows "
                              f"{offset}..{offset + n} on their own")
        if q.scale.shape[1] * self.group_size != self.in_features:
            raise PinferError(f"int4 weight has groups of {self.in_features // q.scale.shape[1]}, "
                              f"this linear uses {self.group_size}")
        self.qweight[offset:offset + n] = torch._convert_weight_to_int4pack_for_cpu(q.qweight.contiguous(), 1)
        self.scales_and_zeros[:, offset:offset + n, 0] = q.scale.t()
        self.scales_and_zeros[:, offset:offset + n, 1] = (q.zero + 8 * q.scale).t()
        if self.qweight_w4a8.numel():
            self.qweight_w4a8[offset // 16:(offset + n) // 16] = kernels.pack_int4(q.qweight, q.scale, q.zero)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if self.qweight_w4a8.numel() and kernels.usable(x) and kernels.has("int4_gemm"):
            return torch.ops.pinfer.int4_gemm(x.contiguous(), self.qweight_w4a8)
        if not self.batch_invariant:
            return self._int4_mm(x)
        padding = -x.shape[0] % _TILE_ROWS
        if padding:
            x = torch.cat([x, x.new_zeros(padding, x.shape[1])])
        return torch.cat([self._int4_mm(tile) for tile in x.split(_TILE_ROWS)])[: x.shape[0] - padding]

    def _int4_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scales_and_zeros)


# ---- putting them in a model ------------------------------------------------------------


def check_quantization(mode: str | None) -> None:
    if mode is not None and mode not in QUANTIZATION_MODES:
        raise PinferError(f"quantization must be None, 'int8' or 'int4', got {mode!r}")


def quantize_model(model: nn.Module, mode: str, batch_invariant: bool = False,
                   prequantized: Iterable[tuple[str, Int8Weight | Int4Weight]] = ()) -> nn.Module:
    """Swap the model's decoder linears and head for quantized ones, in place.

    `prequantized`: (HF name, weight) pairs already in the linears' format (a GGUF
    file's Q4 blocks), written as they are; all other rows are quantized from the
    float weights. Also replaces model.load_weights (see QuantizedWeightLoader) so
    live weight updates re-quantize what they write. Linears whose shape the int4
    kernel cannot take (in_features % 32, out_features % 16) stay float.
    """
    check_quantization(mode)
    linears: dict[str, _QuantizedLinear] = {}
    floats: dict[str, torch.Tensor] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in QUANTIZED_LINEARS:
            continue
        n, k = module.weight.shape
        if mode == "int4" and name != "lm_head" and (k % INT4_GROUP_SIZE or n % _INT4_ROW_BLOCK):
            continue
        # The head in int8 even for int4: SmolLM2's perplexity on tests/data is +9.6% with an
        # int4 head, +0.5% with a float one (llama.cpp's Q4_K_M also keeps output.weight at 6 bits).
        cls = Int8Linear if mode == "int8" or name == "lm_head" else Int4Linear
        quantized = cls(k, n, module.bias, batch_invariant=batch_invariant)
        floats[f"{name}.weight"] = module.weight.data  # a tied head: quantized as a copy; the embedding stays
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, quantized)
        linears[f"{name}.weight"] = quantized
    tied_head = "lm_head.weight" in linears and getattr(model.config, "tie_word_embeddings", False)
    loader = QuantizedWeightLoader(model, linears, tied_head)
    written = loader.load_quantized(prequantized)
    for name, linear in linears.items():
        if name not in written:
            linear.set_weight(floats[name])
        elif written[name] != set(range(linear.out_features)):
            raise ModelLoadError(f"{name}: the pre-quantized weights cover only some of its rows")
    model.load_weights = loader
    model.quantization = mode
    return model


def hot_quantized_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The (module, buffer name) pairs a quantized decode step streams: int8's VNNI copy, int4's
    W4A8 copy or else torch's int4 packing (model/huge_pages.py puts them on 2 MiB pages)."""
    hot = []
    for module in model.modules():
        if isinstance(module, Int8Linear):
            hot.append((module, "qweight_vnni"))
        elif isinstance(module, Int4Linear):
            hot.append((module, "qweight_w4a8") if module.qweight_w4a8.numel() else (module, "qweight"))
    return hot


class QuantizedWeightLoader:
    """model.load_weights for a quantized model: tensors for quantized linears are
    quantized into them (a fused qkv/gate_up part is a row range: int8 scales are
    per row and int4 groups run along a row, so rows quantize on their own); every
    other tensor goes to the model's own load_weights. A tied head is re-quantized
    from the embedding when the embedding changes. With validate_first, every name
    and shape is checked before anything is written, as the float model does."""

    def __init__(self, model: nn.Module, linears: dict[str, _QuantizedLinear], tied_head: bool):
        self.float_load_weights = model.load_weights  # the class's bound method
        self.model, self.linears, self.tied_head = model, linears, tied_head

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]], validate_first: bool = False) -> set[str]:
        if validate_first:
            weights = list(weights)
            quantized = [t for t in map(self._quantized_target, weights) if t is not None]
            float_items = [item for item in weights if self._quantized_target(item) is None]
            loaded = self.float_load_weights(float_items, validate_first=True)  # checks, then copies
            for key, linear, offset, tensor in quantized:
                linear.set_rows(offset, tensor)
                loaded.add(key)
        else:
            loaded = set()
            for item in weights:
                target = self._quantized_target(item)
                if target is None:
                    loaded |= self.float_load_weights([item])
                else:
                    key, linear, offset, tensor = target
                    linear.set_rows(offset, tensor)
                    loaded.add(key)
        if self.tied_head and "embed_tokens.weight@None" in loaded:
            self.linears["lm_head.weight"].set_weight(self.model.embed_tokens.weight.data)
        return loaded

    def load_quantized(self, weights: Iterable[tuple[str, Int8Weight | Int4Weight]]) -> dict[str, set[int]]:
        """Write already-quantized weights under HF names as they are; returns the rows written per linear."""
        written: dict[str, set[int]] = {}
        for hf_name, weight in weights:
            key, linear, offset, _ = self._quantized_target((hf_name, weight.qweight))
            linear.set_rows(offset, weight)
            written.setdefault(key.split("@")[0], set()).update(range(offset, offset + weight.qweight.shape[0]))
        return written

    def _quantized_target(self, item: tuple[str, torch.Tensor]):
        """(key, linear, row offset, tensor) if the HF-named tensor belongs to a quantized linear."""
        hf_name, tensor = item
        target = self.model._map_hf_name(hf_name)
        if target is None or target[0] not in self.linears:
            return None
        name, offset = target
        linear, offset = self.linears[name], offset or 0
        if tensor.dim() != 2 or tensor.shape[1] != linear.in_features \
                or offset + tensor.shape[0] > linear.out_features:
            raise ModelLoadError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, which does "
                                 f"not fit {name} ({linear.out_features} x {linear.in_features}) at row {offset}")
        return f"{name}@{target[1]}", linear, offset, tensor


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: parameters and the quantized linears' buffers."""
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(b.numel() * b.element_size() for module in model.modules()
                 if isinstance(module, _QuantizedLinear) for b in module.buffers())
    return total
