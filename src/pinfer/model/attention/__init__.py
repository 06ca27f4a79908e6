"""Attention backends, by name.

- "reference": per sequence, full score matrix in float32. For reading and testing.
- "blocked": online softmax over KV pages; shows how blocked attention bounds memory.
- "paged": batched decode + SDPA prefill straight from the paged pool. The default.
- "batch_invariant": fixed-split per-token attention, for deterministic mode.
"""

from __future__ import annotations

from pinfer.model.attention.base import AttentionBackend, AttentionMetadata, store_kv
from pinfer.model.attention.batch_invariant import BatchInvariantAttention
from pinfer.model.attention.blocked import BlockedAttention
from pinfer.model.attention.paged import PagedAttention
from pinfer.model.attention.reference import ReferenceAttention

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "reference": ReferenceAttention,
    "blocked": BlockedAttention,
    "paged": PagedAttention,
    "batch_invariant": BatchInvariantAttention,
}
DEFAULT_ATTENTION_BACKEND = "paged"


def get_attention_backend(name: str = DEFAULT_ATTENTION_BACKEND) -> AttentionBackend:
    """A new instance of the backend called `name`."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]()


__all__ = [
    "ATTENTION_BACKENDS",
    "DEFAULT_ATTENTION_BACKEND",
    "AttentionBackend",
    "AttentionMetadata",
    "BatchInvariantAttention",
    "BlockedAttention",
    "PagedAttention",
    "ReferenceAttention",
    "get_attention_backend",
    "store_kv",
]
