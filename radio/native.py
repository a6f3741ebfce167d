"""The C allocator's settings for a long-running, many-threaded process (glibc; elsewhere nothing happens).

Every mount's feeder and sender threads, the engine and ffmpeg's pipe readers allocate and free
half-megabyte audio blocks all day. glibc's defaults serve that badly: each thread may get its own arena (up
to 8 per core), and after the first large block is freed the mmap threshold rises, so later large blocks are
carved from those arenas, where freed memory fragments and is rarely given back. A fixed threshold sends
large blocks to mmap (returned to the OS on free), a few arenas bound the fragmentation, and a periodic trim
returns free pages inside the heaps.

oneDNN (PyTorch's CPU kernels for bf16 matmuls and the packed linear layers) compiles a kernel per shape and
caches it twice, in PyTorch's cache and its own, 1,024 entries each by default and about 0.28 MB an entry. A
daemon's shapes keep changing (batch rows, KV buffer widths), so those caches filled over hours: ~570 MB that
looked like a leak. ``bound_kernel_caches`` makes them small.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

KERNEL_CACHE_ENTRIES = 128  # a decode step meets ~20 shapes; a new one costs ~1 ms to compile, once per chunk
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt  # noqa: B018 - glibc only
            libc.malloc_trim  # noqa: B018
        except (OSError, AttributeError):
            return None
        _libc = libc
    return _libc


def tune_allocator(mmap_threshold: int = 256 * 1024, arenas: int = 4) -> bool:
    """Call early (before threads start). Returns whether the settings took."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_ARENA_MAX, arenas))
    logger.debug("allocator: mmap threshold %d, %d arenas (%s)", mmap_threshold, arenas, "ok" if ok else "refused")
    return ok


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Bound oneDNN's two kernel caches to ``entries`` each (about 0.28 MB an entry). They read their size once,
    at the first compiled kernel: call before any model runs. An operator's own setting of the variables wins."""
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(entries))


def trim() -> None:
    """Give free heap pages back to the OS (a few milliseconds; call now and then, e.g. once a minute)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
