"""Count the tensors that torch ops create, for finding allocations in the decode loop.

    with AllocationCounter() as counter:
        engine.step()
    counter.count, counter.nbytes, counter.signatures   # {(op, shape, dtype): times}

A TorchDispatchMode sees every aten op below autograd. An op's output is counted
as a new allocation when its storage is not one of the op's inputs' storages:
views (`view`, `transpose`, slicing), in-place ops and `out=` ops reuse their
input's storage and are not counted; `empty`, `index_select`, `mm`, ... are.
Tensors made from Python data (`torch.tensor([...])`) surface as `lift_fresh`
of a new tensor and are counted too.

Debug only: the mode makes every op slower (a Python call each). Nothing in the
engine imports this file; a test or a script switches it on around a step.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# (op name, shape, dtype): e.g. ("aten::mm", (4, 576), "torch.float32")
Signature = tuple[str, tuple[int, ...], str]

# Ops whose output aliases an input only through an input we do not see as a tensor
# (lift_fresh's input is the fresh tensor torch.tensor() just built).
FRESH_OPS = ("aten::lift_fresh", "aten::lift_fresh_copy")


class AllocationCounter(TorchDispatchMode):
    """Counts tensors created by ops while active; `reset()` starts over."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.nbytes = 0  # storage bytes of the created tensors
        self.signatures: Counter[Signature] = Counter()  # signature -> times seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        inputs = {storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        fresh = name in FRESH_OPS
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (fresh or storage_ptr(t) not in inputs):
                self.count += 1
                self.nbytes += 0 if t.is_mkldnn else t.untyped_storage().nbytes()
                self.signatures[(name, tuple(t.shape), str(t.dtype))] += 1
        return out

    def largest(self, n: int = 5) -> list[tuple[Signature, int]]:
        """The n signatures with the most bytes per tensor, biggest first (for reports)."""
        def size(sig: Signature) -> int:
            numel = 1
            for d in sig[1]:
                numel *= d
            return numel * torch.empty(0, dtype=getattr(torch, sig[2].removeprefix("torch."))).element_size()
        return sorted(self.signatures.items(), key=lambda item: -size(item[0]))[:n]


def storage_ptr(t: torch.Tensor) -> int:
    # data_ptr of the storage, not the tensor: a view at an offset shares it. 0-byte storages all
    # have ptr 0, which would hide a fresh empty tensor behind an empty input; use the id then.
    # Opaque tensors (oneDNN-packed weights) have no storage to look at: the id too.
    if t.is_mkldnn:
        return id(t)
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else id(t)
