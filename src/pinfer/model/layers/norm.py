"""RMSNorm, computed in float32 and cast back like transformers does."""

from __future__ import annotations

import torch
from torch import nn

from pinfer import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.usable(x) and kernels.has("rms_norm") and x.is_contiguous() and self.weight.dtype == x.dtype:
            return torch.ops.pinfer.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a decoder layer's residual add fused with the next norm.
        The kernel writes the sum into `residual` in place."""
        if (kernels.usable(x) and kernels.has("add_rms_norm") and x.is_contiguous() and residual.is_contiguous()
                and self.weight.dtype == x.dtype):
            return torch.ops.pinfer.add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = x + residual
        return self(residual), residual
