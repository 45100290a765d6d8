"""The C heap's policy for freed memory: keep it for the next allocation instead of handing it back.

A prefill allocates and frees the same large temporaries chunk after chunk and layer after layer (a Q8_0
matrix dequantized to bf16 for the GEMM: 32-64 MB; attention's activations; torch's outputs). glibc serves
every allocation above its mmap threshold (at most 32 MB by default) with fresh pages and unmaps them on free,
and trims free memory above 128 KB off the top of the heap, so the next chunk faults them in again, one 4 KB
page at a time, each zeroed by the kernel: a flash-slice-few 512-token prompt took ~200,000 page faults (~0.3 s of
~1.8 s on 2 Zen 5 cores). llama.cpp allocates its compute buffers once; this is the allocator-level equivalent.

Allocations up to 256 MB come from the heap and up to 1 GB of free memory stays on top of it, so the retained
memory is bounded (a memory budget still holds: tests/memory/test_rss.py); bigger blocks are mapped as before.
The top's allowance is larger than the largest block because glibc, once the free top passes it, hands all of it
back: with 256 MB, a float32 flash-slice-few 512-token prompt (its temporaries twice bf16's) faulted 8,000-83,000
pages in again each time (292 tok/s, median of 6 alternated rounds), with 1 GB 0-7,700 (305 tok/s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
KEPT_BYTES = 256 << 20  # the largest allocation served from the heap
TOP_BYTES = 1 << 30     # the free memory kept on top of it


def retain_freed_memory() -> bool:
    """Set glibc's mmap threshold to KEPT_BYTES and its trim threshold to TOP_BYTES for this process (idempotent).
    True when set; False off glibc (macOS, musl), or when the environment says DS4PY_KEEP_HEAP=0. The results of
    every computation are the same either way: this changes only where memory comes from."""
    if os.environ.get("DS4PY_KEEP_HEAP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEPT_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TOP_BYTES))
