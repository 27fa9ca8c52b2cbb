"""Handing freed memory back to the operating system between layers (merging holds one layer at a time)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator


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
    global _fixed
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _fixed = True


_fixed = False  # return_large_blocks_at_once() has fixed the threshold in this process
# The threshold while a module trains: above the step's largest working tensors at the widths that
# train on a CPU (a 4 x 512-token batch at 4,096 wide is 32 MiB), so they are reused from the heap.
TRAINING_MMAP_THRESHOLD = 64 << 20


def _mallopt() -> Callable[[int, int], int] | None:
    libc = _libc()
    return getattr(libc, "mallopt", None) if libc is not None else None


@contextlib.contextmanager
def reuse_large_blocks() -> Iterator[None]:
    """While a module trains, serve its working tensors from the heap again; afterwards, back to
    :func:`return_large_blocks_at_once`'s threshold and the freed pages handed back to the OS.

    A training step allocates and frees the same few 1-30 MB tensors thousands of times; with each
    of them its own mmap, every step pays for fresh zeroed pages (page faults): at SmolLM2's width a
    refinement step took 54 ms against 46 ms, a held-out check's forward 38 ms against 27 ms. The
    heap's extra pages are the working set of one step, and ``malloc_trim`` returns them when the
    module is done, so memory stays flat with depth. Nothing happens where the threshold was never
    fixed (or the C library is not glibc)."""
    mallopt = _mallopt()
    if not _fixed or mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        release_free_memory()


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
