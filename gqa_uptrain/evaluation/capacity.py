"""The largest batch a model can decode at a context within a memory budget (Llama 2 paper, Figure 24 style).

A smaller KV cache lets a server hold more sequences at once; this measures how many. For a budget
``M`` bytes (weights, cache and activations together) and a context ``T``:

1. **Bound by the computed cache.** ``weights + batch x KV bytes of one sequence of T + new tokens``
   must fit in ``M``: no batch above that bound is ever tried, so the search cannot ask the machine
   for more memory than the budget's cache part (``KVLayout.cache_bytes``, the figure ``gqa-eval``
   checks against what ``generate`` allocates). On CPU the budget must also be below the memory the
   machine has free, or the search refuses to start.
2. **Measured below the bound.** Batches 1, 2, 4, ... up to the bound, then a bisection between the
   largest that fitted and the smallest that did not: each probe runs the static-cache decode loop
   (prompt in chunks of ``prefill_chunk`` tokens, as servers prefill, then a few decode steps) and
   fits when its peak, weights included, stays within ``M``. On a GPU the allocator is capped at
   ``M`` for the probes (``torch.cuda.set_per_process_memory_fraction``), so a probe that needs more
   fails with an out-of-memory error that is caught, never a crash; on CPU the peak is the process's
   resident set (sampled), checked after the probe.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch

from ..errors import ConfigError
from .kv_cache import kv_layout
from .speed import _release_free_memory, _RSSPeak, _sync

logger = logging.getLogger(__name__)


def parse_bytes(text: str) -> int:
    """'20GiB' / '512 MiB' / '1.5G' / '1000000' -> bytes (binary units; a bare number is bytes)."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}  # fmt: skip
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ConfigError(f"--memory-budget takes a size like 20GiB, 512MiB or 1.5G; got {text!r}")
    return int(value * units[unit])


@dataclass
class BatchProbe:
    """One measured batch: did it fit, and its peak (weights included)."""

    batch: int
    fits: bool
    peak_bytes: int | None  # None: ran out of memory (GPU allocator cap)


@dataclass
class LargestBatch:
    """The largest batch that decodes at ``context`` within ``budget_bytes``, and how it was found."""

    context: int
    new_tokens: int
    budget_bytes: int
    weights_bytes: int
    kv_bytes_per_sequence: int  # computed: one sequence of context + new_tokens tokens
    kv_bound: int  # the largest batch whose weights + computed cache fit the budget
    largest_batch: int  # measured: 0 when not even one sequence fits
    peak_bytes: int | None  # at largest_batch, weights included
    memory_source: str
    probes: list[BatchProbe] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return asdict(self)


def _weights_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _probe(
    model: Any, batch: int, context: int, new_tokens: int, budget: int, weights: int, chunk: int
) -> BatchProbe:
    """Decode ``new_tokens`` after a ``context``-token random prompt at ``batch``; measure the peak."""
    from .static_decode import StaticDecoder

    device = next(model.parameters()).device
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    gen = torch.Generator().manual_seed(batch)
    decoder = None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
            decoder = StaticDecoder(model, batch, context + new_tokens, compile=False, prefill_chunk=chunk)
            decoder.generate(ids, new_tokens)
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device)  # weights included: they are allocated too
        else:
            _release_free_memory()
            with _RSSPeak() as rss:
                ids = torch.randint(0, vocab, (batch, context), generator=gen)
                decoder = StaticDecoder(
                    model, batch, context + new_tokens, compile=False, prefill_chunk=chunk
                )
                decoder.generate(ids, new_tokens)
            peak = weights + max(0, rss.peak - rss.start)
    except torch.OutOfMemoryError:
        logger.info("batch %d: out of memory within the budget", batch)
        return BatchProbe(batch, False, None)
    finally:
        del decoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fits = peak <= budget
    logger.info("batch %d: peak %.1f MiB (%s)", batch, peak / 2**20, "fits" if fits else "over the budget")
    return BatchProbe(batch, fits, peak)


@torch.no_grad()
def largest_batch(
    model: Any,
    context: int,
    budget_bytes: int,
    new_tokens: int = 4,
    prefill_chunk: int = 512,
    max_batch: int | None = None,
) -> LargestBatch:
    """The largest batch ``model`` decodes at ``context`` within ``budget_bytes`` (see the module doc).

    ``max_batch`` caps the search (the result is then at most that). Raises :class:`ConfigError` when
    the budget does not even hold the weights, or (CPU) exceeds the memory the machine has free.
    """
    device = next(model.parameters()).device
    layout = kv_layout(model.config, model.dtype)
    weights = _weights_bytes(model)
    per_seq = layout.cache_bytes(context + new_tokens, 1)
    if budget_bytes <= weights:
        raise ConfigError(
            f"--memory-budget {budget_bytes / 2**30:.2f} GiB does not hold the weights ({weights / 2**30:.2f} GiB)"
        )
    if device.type != "cuda":
        free = psutil.virtual_memory().available + psutil.Process().memory_info().rss
        if budget_bytes > free:
            raise ConfigError(
                f"--memory-budget {budget_bytes / 2**30:.2f} GiB is more than this machine has free "
                f"({free / 2**30:.2f} GiB); give a smaller budget"
            )
    bound = (budget_bytes - weights) // per_seq
    if max_batch is not None:
        bound = min(bound, max_batch)
    result = LargestBatch(
        context=context,
        new_tokens=new_tokens,
        budget_bytes=budget_bytes,
        weights_bytes=weights,
        kv_bytes_per_sequence=per_seq,
        kv_bound=int(bound),
        largest_batch=0,
        peak_bytes=None,
        memory_source="cuda.max_memory_allocated" if device.type == "cuda" else "weights + process RSS",
    )
    if bound < 1:
        return result
    fraction = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, budget_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        probes: dict[int, BatchProbe] = {}

        def fits(b: int) -> bool:
            if b not in probes:
                probes[b] = _probe(model, b, context, new_tokens, budget_bytes, weights, prefill_chunk)
            return probes[b].fits

        lo, hi = 0, bound + 1  # lo fits (0 trivially), hi does not (bound + 1 by the computed cache)
        b = 1
        while b <= bound:  # doubling: 1, 2, 4, ... until one fails or the bound is reached
            if not fits(b):
                hi = b
                break
            lo = b
            b *= 2
        if lo == b // 2 and hi == bound + 1 and lo < bound:
            if fits(bound):
                lo = bound
            else:
                hi = bound
        while hi - lo > 1:  # bisection between the largest fit and the smallest failure
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        result.largest_batch = lo
        result.peak_bytes = probes[lo].peak_bytes if lo else None
        result.probes = [probes[k] for k in sorted(probes)]
    finally:
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    logger.info(
        "context %d, budget %.2f GiB: largest batch %d (the computed cache allows %d)",
        context,
        budget_bytes / 2**30,
        result.largest_batch,
        bound,
    )
    return result
