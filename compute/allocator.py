"""Keep freed memory in the process for reuse (glibc's malloc only).

Training and attribution allocate the same megabyte-sized temporaries on every
step. By default glibc gives freed memory at the top of the heap back to the
operating system once more than a few megabytes are free, and serves large blocks
from fresh mappings, so the next step page-faults the same memory in again: on a
small CPU machine that costs up to a millisecond per tensor. Raising the trim and
mmap thresholds keeps the memory mapped (and the heap grows 64 MiB at a time);
resident size then stays at its peak instead of shrinking between steps. The CLI
and bench/dictionaries.py call it; library code does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory; False where glibc is not the allocator."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(param, value) for param, value in
               ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 2**30), (M_TOP_PAD, 64 * 2**20)))
