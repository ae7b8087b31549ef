"""Give the heap's freed pages back to the system once the model thread's work is done.

Bring-up and model commands parse GGUF headers, manifests and probe output: many
short-lived objects. CPython frees them, but glibc keeps the freed pages in its heap, so an
idle daemon carried megabytes it no longer used. ``malloc_trim(0)`` returns them (glibc
only; elsewhere, such as musl or macOS, only the garbage collection runs).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
