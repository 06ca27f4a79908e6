"""Pre-packed oneDNN linears (model/packed_linear.py): bit-for-bit F.linear's outputs, no
second copy of the weights, exact round trip through dense_weights() for weight writes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pinfer.model.packed_linear import PackedLinear, can_pack, dense_weights, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="torch built without oneDNN")


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 24, bias=True)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_outputs_equal_f_linear_for_any_row_count(dtype):
    torch.manual_seed(0)
    model = Tied().to(dtype).requires_grad_(False)
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert pack_linears(model) == 2
    assert isinstance(model.proj, PackedLinear) and model.proj.weight.numel() == 0  # no second copy
    assert model.head.weight.shape == (50, 16)  # tied: the embedding keeps its dense storage
    for rows in (1, 3, 64, 300):
        x = torch.randn(rows, 16, dtype=dtype)
        head = F.linear(x, dense["embed.weight"])
        if dtype == torch.bfloat16:  # F.linear is oneDNN too: bit for bit without a bias
            assert torch.equal(model.head(x), head)
        else:  # F.linear is MKL's sgemm, which sums in another order
            torch.testing.assert_close(model.head(x), head)
        # with a bias oneDNN adds it in its own order: float rounding apart
        torch.testing.assert_close(model.proj(x), F.linear(x, dense["proj.weight"], dense["proj.bias"]))


def test_dense_weights_unpacks_exactly_and_packs_the_written_values():
    torch.manual_seed(0)
    model = Tied().to(torch.bfloat16).requires_grad_(False)
    original = model.proj.weight.detach().clone()
    pack_linears(model)
    with dense_weights(model):
        assert torch.equal(model.proj.weight, original)
        model.proj.weight.mul_(2)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert model.proj.weight.numel() == 0
    torch.testing.assert_close(model.proj(x), F.linear(x, original * 2, model.proj.bias))
    with dense_weights(model, repack=False):
        pass
    assert model.proj.weight.shape == (24, 16) and model.proj.packed_weight is None
    assert torch.equal(model.proj(x), F.linear(x, original * 2, model.proj.bias))  # dense fallback
    pack_linears(model)  # packs the unpacked module again
    assert model.proj.packed_weight is not None
