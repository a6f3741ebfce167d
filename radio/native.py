"""The C allocator's settings for a long-running, many-threaded process (glibc; elsewhere nothing happens).

Every mount's feeder and sender threads, the engine and ffmpeg's pipe readers allocate and free
half-megabyte audio blocks all day. glibc's defaults serve that badly: each thread may get its own arena (up
to 8 per core), and after the first large block is freed the mmap threshold rises, so later large blocks are
carved from those arenas, where freed memory fragments and is rarely given back. A fixed threshold sends
large blocks to mmap (returned to the OS on free), a few arenas bound the fragmentation, and a periodic trim
returns free pages inside the heaps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

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


def trim() -> None:
    """Give free heap pages back to the OS (a few milliseconds; call now and then, e.g. once a minute)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
