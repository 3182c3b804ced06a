"""Give the C allocator's free memory back to the operating system.

Why: on Linux, glibc serves tensors above its mmap threshold from mmap and returns them on free, but it
raises that threshold to the largest block freed so far, so after the first steps of a search the large
activation buffers of a big encoder come from the heap, whose free pages are kept. A ViT-L/14-sized scan's
peak resident set then grows with the steps (2,708 MiB at 10 steps, 3,041 at 40, 3,266 at 100, with the
same tensors alive; `BENCHMARKS.md`, "Scan time and peak memory against encoder size"). ``malloc_trim(0)``
hands every whole free page back (madvise): 2,763 MiB at 40 steps. Fixing the threshold instead
(``MALLOC_MMAP_THRESHOLD_``) maps and zeroes every large tensor anew: 2,493 MiB but 30 % slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    """glibc's ``malloc_trim``, or None where there is none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the allocator's free pages to the operating system; False where the platform cannot."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
