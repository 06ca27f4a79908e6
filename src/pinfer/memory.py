"""Host memory housekeeping."""

from __future__ import annotations

import ctypes


def return_freed_memory_to_os() -> None:
    """glibc keeps freed heap memory below its (adaptive) mmap threshold for reuse, so freed
    weights (sleep, or copies moved elsewhere) stay resident without this. No-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
