"""Process settings for CPU runs that must hold before the first large allocation.

glibc's malloc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh `mmap`
pages and gives them back to the kernel on `free`. A 3D network allocates and frees activations of tens of
MiB every step, so each step page-faults all of them in again: measured 2026-12-07 on a 2-core machine, one
MPPN training step (width 8, batch 16) took 1.86 s with 225 000 minor page faults and 0.96 s of system
time, and 1.38–1.56 s with none once freed blocks stay in the heap (docs/journal/2026-12-07-malloc.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks up to this size come from (and return to) the heap; free heap memory above it is trimmed
KEEP_BYTES = 1 << 30
_done = False


def keep_freed_memory(limit: int = KEEP_BYTES) -> bool:
    """Make glibc keep freed blocks up to ``limit`` bytes for reuse (idempotent; False where not glibc).

    The cost: the resident size stays near its peak instead of shrinking between steps. Setting the
    environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` before a run overrides it.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        _done = True  # the user chose
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
    if not ok:
        log.debug("mallopt refused the thresholds; freed blocks go back to the kernel")
    _done = ok
    return ok
