"""Keep freed memory in the process heap on glibc (CPU inference speed).

glibc serves every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed, so each activation tensor of every batch is
page-faulted and zeroed by the kernel again. Measured on the 2-core build machine with the default
ensemble (batch 8, bf16): 0.68 s/image with 14 s of system time per 24 images, 0.30 s/image and
0.2 s of system time with the thresholds raised. The cost is that freed blocks stay mapped (the
resident set holds the largest working set seen, which the 4 GB container bound already has to allow).

Trimming is switched off (-1, glibc's documented value for that), not merely set to its largest int:
with a 2 GB threshold, batches that free more than 2 GB at once (training at batch 16 on a 2-core
CPU) had the heap's top given back and faulted in again every batch (test/test_allocator.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold and switch off trimming, once per process; True when applied (Linux glibc only)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, _INT_MAX), (_M_TRIM_THRESHOLD, -1),
                                              (_M_TOP_PAD, 64 << 20)))
    return _done
