"""Batch-invariant linears: a row's result never depends on the rows next to it.

oneDNN/MKL pick their GEMM kernels (and with them the order in which the K
products of a dot product are summed) from the matrix shapes, so the same row
of activations gives last-bit different outputs at batch sizes 1, 7 or 64
(measured here: float32 at every M from 2 to 33 differs from M=1; bfloat16
from M=33 on). Deterministic mode therefore feeds every linear fixed-shape
tiles of rows, zero-padded: the kernel, and so the summation order, is always
the same, and a row's position inside a tile does not change its result
(checked for float32 and bfloat16, tiles of 8 to 64 rows).

The remaining ops of the model are per row already on CPU (elementwise ops,
RMSNorm's row mean, row softmax; see tests/rl/test_deterministic.py), and
attention has its own batch-invariant backend (attention/batch_invariant.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Rows per tile: a loop of fixed [32, K] x [K, N] matmuls. Cost against one plain F.linear
# (576 -> 1728, ms, 2 cores): float32 M=1 0.87 vs 0.11, M=64 1.6 vs 1.1, M=512 13 vs 7;
# bfloat16 M=1 0.45 vs 0.25, M=64 0.71 vs 0.45, M=512 5.5 vs 2.7. (One bmm over all
# tiles would need the weight expanded per tile, which torch copies: far slower.)
TILE_ROWS = 32


def batch_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose every output row depends only on its own input row, bit for bit."""
    lead, in_features = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, in_features)
    num_rows = rows.shape[0]
    padding = -num_rows % TILE_ROWS
    if padding:
        rows = torch.cat([rows, rows.new_zeros(padding, in_features)])
    out = torch.cat([F.linear(tile, weight) for tile in rows.split(TILE_ROWS)])[:num_rows]
    if bias is not None:
        out = out + bias  # separately: a fused bias would be part of the kernel choice
    return out.view(*lead, weight.shape[0])


class BatchInvariantMode(TorchFunctionMode):
    """Inside `with BatchInvariantMode():`, F.linear (so every nn.Linear) is batch_invariant_linear."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return batch_invariant_linear(*args, **kwargs)
        return func(*args, **kwargs)
