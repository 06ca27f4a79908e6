"""Sparse mixture-of-experts MLP: Qwen3-MoE, Qwen2-MoE (with a gated shared
expert) and Mixtral, from one block.

router linear -> softmax (float32) -> top-k experts -> optional renormalisation
-> weighted sum of the chosen experts' SwiGLU MLPs.

Expert weights are stacked, each expert's gate and up fused like the dense MLP:
  experts.gate_up_proj  [E * 2I, H]   rows e*2I .. e*2I+I are expert e's gate, then its up
  experts.down_proj     [E * H, I]    rows e*H .. e*H+H are expert e's down
Stored flat (2-D) so a per-expert checkpoint tensor is a row slice (the loader
narrows dim 0), and a fused 3-D [E, ...] tensor is a reshape of the whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pinfer.config import ModelConfig


class Experts(nn.Module):
    """E SwiGLU experts; forward runs each token through its chosen experts, one matmul per expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts * 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts * hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        top_k = topk_ids.shape[1]
        gate_up = self.gate_up_proj.view(self.num_experts, 2 * self.intermediate_size, self.hidden_size)
        down = self.down_proj.view(self.num_experts, self.hidden_size, self.intermediate_size)
        # Sort the (token, slot) assignments by expert so each expert reads one contiguous run.
        flat_ids = topk_ids.flatten()
        order = flat_ids.argsort(stable=True)
        token_idx = order // top_k
        weights = topk_weights.flatten()[order]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # one host sync per layer
        routed = x.index_select(0, token_idx)
        expert_out = torch.empty_like(routed)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            gate, up = F.linear(routed[rows], gate_up[e]).chunk(2, dim=-1)
            expert_out[rows] = (F.linear(F.silu(gate) * up, down[e]) * weights[rows, None]).to(x.dtype)
            start += n
        return torch.zeros_like(x).index_add_(0, token_idx, expert_out)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's shared expert behind a sigmoid gate)."""

    def __init__(self, config: ModelConfig, dense_mlp_cls: type[nn.Module]):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = dense_mlp_cls(config, intermediate_size=config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:  # Mixtral always; Qwen when the config says so
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, topk_ids, topk_weights)
        if self.shared_expert is not None:
            # sigmoid over a 64-wide copy of the [T, 1] logit: CPU kernels run scalar code on short
            # tensors and SIMD on long ones (last-bit different), so a narrow [T, 1] would make a
            # token's gate depend on the batch size; 64 per row always takes the SIMD path.
            gate = torch.sigmoid(self.shared_expert_gate(x).expand(-1, 64).contiguous())[:, :1]
            out = out + gate * self.shared_expert(x)
        return out
