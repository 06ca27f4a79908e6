"""Pre-packed linears (model/packed_linear.py), for oneDNN or (bf16, with the CPU kernels) for
pinfer's own GEMM: F.linear's outputs, no second copy of the weights, exact round trip
through dense_weights() for weight writes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pinfer import kernels
from pinfer.model.packed_linear import PackedLinear, can_pack, dense_weights, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="torch built without oneDNN")


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 48, bias=True)  # 48 outputs: packs for the own kernel in bf16
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
    own = dtype == torch.bfloat16 and kernels.has("bf16_gemm")
    assert model.proj.own_kernel == own and not model.head.own_kernel  # 50 outputs: not a multiple of 16
    for rows in (1, 3, 64, 300):
        x = torch.randn(rows, 16, dtype=dtype)
        head = F.linear(x, dense["embed.weight"])
        if dtype == torch.bfloat16:  # F.linear is oneDNN too: bit for bit without a bias
            assert torch.equal(model.head(x), head)
        else:  # F.linear is MKL's sgemm, which sums in another order
            torch.testing.assert_close(model.head(x), head)
        # with a bias oneDNN adds it in its own order: float rounding apart (the own kernel likewise)
        torch.testing.assert_close(model.proj(x), F.linear(x, dense["proj.weight"], dense["proj.bias"]))
        assert model.proj(x.view(rows, 1, 16)).shape == (rows, 1, 48)


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
    assert model.proj.weight.shape == (48, 16) and model.proj.packed_weight is None
    assert torch.equal(model.proj(x), F.linear(x, original * 2, model.proj.bias))  # dense fallback
    pack_linears(model)  # packs the unpacked module again
    assert model.proj.packed_weight is not None


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576)])  # SmolLM2's qkv, down
def test_own_bf16_gemm_is_onednn_up_to_one_rounding(rows, in_features, out_features):
    """The own kernel sums each output in float32 in k order, as oneDNN does unless it splits K;
    where it does, the two differ by one bf16 rounding, in few elements."""
    if not (kernels.has("bf16_gemm")):
        pytest.skip(f"no bf16 GEMM kernel here ({kernels.status()})")
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    ref = F.linear(x, linear.weight)
    exact = F.linear(x.double(), linear.weight.double())
    model = nn.Sequential(linear)
    pack_linears(model)
    assert model[0].own_kernel
    out = model[0](x)
    assert (out == ref).float().mean() > 0.999
    ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp(min=1e-3)
    assert ((out.float() - ref.float()).abs() <= ulp).all()
    assert (out.double() - exact).abs().max() <= (ref.double() - exact).abs().max() * 1.01 + 1e-6
