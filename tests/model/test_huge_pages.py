"""model/huge_pages.py: hot weights copied side by side into one 2 MiB-aligned buffer the
kernel is asked to back with huge pages, values unchanged (the model tests run with it on)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pinfer.model import huge_pages


def _modules() -> list[nn.Module]:
    gen = torch.Generator().manual_seed(0)
    modules = []
    for shape, dtype in (((48, 36, 16, 2), torch.bfloat16), ((3, 5), torch.float32), ((1000,), torch.int8)):
        module = nn.Module()
        module.register_buffer("hot", torch.randn(shape, generator=gen).to(dtype))
        modules.append(module)
    return modules


def _vma_flags(address: int) -> str:
    """The smaps entry of the mapping holding `address`."""
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(x, 16) for x in head.split("-"))
            if start <= address < end:
                return "\n".join(lines[i:i + 30])
    raise AssertionError("no mapping holds the buffer")


@pytest.mark.skipif(not huge_pages.huge_pages_available(), reason="transparent huge pages are off on this machine")
def test_tensors_move_into_one_aligned_buffer_with_their_values():
    modules = _modules()
    before = [m.hot.clone() for m in modules]
    assert huge_pages.move_to_huge_pages([(m, "hot") for m in modules])
    starts = [m.hot.data_ptr() for m in modules]
    assert starts[0] % huge_pages.HUGE_PAGE == 0
    sizes = [m.hot.numel() * m.hot.element_size() for m in modules]
    assert all(s % 64 == 0 for s in starts)
    assert all(start + size <= next_start for start, size, next_start in zip(starts, sizes, starts[1:]))
    assert starts[-1] - starts[0] < huge_pages.HUGE_PAGE  # side by side, in one buffer
    for module, want in zip(modules, before):
        assert module.hot.dtype == want.dtype and torch.equal(module.hot, want)
        assert "hot" in dict(module.named_buffers())  # still a buffer: state_dict and .to() see it
    assert "hg" in _vma_flags(starts[0]).split("VmFlags:")[1]  # madvise(MADV_HUGEPAGE) took


def test_nothing_moves_without_huge_pages(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "_THP_SETTING", setting)
    modules = _modules()
    tensors = [m.hot for m in modules]
    assert not huge_pages.move_to_huge_pages([(m, "hot") for m in modules])
    assert all(m.hot is t for m, t in zip(modules, tensors))
