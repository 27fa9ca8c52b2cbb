"""Handing freed memory back to the operating system between layers (merging holds one layer at a time)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _malloc_trim() -> Callable[[int], int] | None:
    return getattr(_libc(), "malloc_trim", None)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    Each module's fit allocates and frees about 1 GB of float64 working tensors at Llama-2-7B
    width. glibc serves blocks under its mmap threshold (which it raises up to 32 MB as large
    blocks are freed) from the heap, where the small fitted maps kept between modules pin freed
    pages, so without this the peak RSS crept up with depth (+55 MB per layer measured, against
    the 8 MB of maps each layer really keeps) and sat 0.3-0.5 GB higher.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# glibc's mallopt parameter: allocations of at least this many bytes are served by their own mmap.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def return_large_blocks_at_once() -> None:
    """Serve every allocation of 1 MiB or more by its own mmap, handed back to the OS when freed
    (glibc's ``mallopt(M_MMAP_THRESHOLD)``; nothing elsewhere). For the rest of the process.

    glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, so the 1-30 MB
    working tensors of a layer (a calibration sequence's activations, the fits' row blocks) come
    from the heap, where pages pinned between them stay resident: at Llama-2-7B width the peak
    RSS of ``aligned`` rose by 5 MB per layer and was 0.2 GB higher at 32 layers (1.64 GB against
    1.38 GB at 8 layers with the threshold fixed). A fixed threshold also stops that adjustment.
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def peak_rss_bytes() -> int:
    """This process's peak resident set so far, in bytes: the kernel's ``VmHWM`` for its own memory,
    or the resident set now (``VmRSS``) where that is larger: the kernel updates its high-water mark
    lazily.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the high-water mark of the memory a
    process had before ``exec`` into it, i.e. its parent's, so a conversion started by a large
    process (a test runner, a notebook) would report the parent's peak. ``ru_maxrss`` is the
    fallback where ``/proc`` is missing.
    """
    try:
        with open("/proc/self/status") as f:
            kib = [int(line.split()[1]) for line in f if line.startswith(("VmHWM:", "VmRSS:"))]
        if kib:
            return max(kib) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
