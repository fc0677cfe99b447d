"""Keep freed tensor memory for reuse in processes that allocate and free the same large tensors over and over.

glibc's ``malloc`` serves a block above its mmap threshold by a fresh ``mmap`` and returns it to the kernel when
freed, and gives the top of its heap back once more than its trim threshold is free. Both thresholds adapt
(the mmap threshold rises to the largest block freed so far, the trim threshold to twice that), so a loop over
batches whose activations are a few MiB each keeps crossing them: a large share of its tensors land in memory
the kernel has just handed out again, and every page of them costs a page fault and a zeroing on first touch.
On the 2-core machine of docs/benchmarks.md one row-wise int8 linear of the masked-LM encoder (2,048 × 384 →
1,536) took 12.6 ms with glibc's defaults and 3.8 ms with fixed thresholds, and the masked-LM augmentation job
ran 16 % more sentences a second.

:func:`retain_freed_memory` fixes the thresholds (``mallopt``, which also turns their adaptation off): blocks up
to ``mmap_threshold`` come from the heap, and up to ``trim_threshold`` of free memory stays with the process.
The price is memory: a process keeps up to that much more resident than it uses at the moment. It is for
processes that do one repetitive job (the augmentation workers); a library function never calls it on a user's
process. It does nothing off glibc, or where the user set ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` (their choice stands).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's upper bound on the mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``): larger blocks
are always mmapped."""

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def retain_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 512 << 20) -> bool:
    """Fix glibc's mmap threshold at ``mmap_threshold`` bytes (at most :data:`MMAP_THRESHOLD_MAX`) and its trim
    threshold at ``trim_threshold`` bytes for this process; returns whether they were set (False off Linux/glibc,
    when ``mallopt`` refuses, or when the user set either threshold by its environment variable)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX or not 0 <= trim_threshold < 2 ** 31:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD_MAX}] and trim_threshold in [0, 2^31), "
                         f"got {mmap_threshold} and {trim_threshold}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not done:
        logger.debug("mallopt refused the thresholds (%d, %d)", mmap_threshold, trim_threshold)
    return done
