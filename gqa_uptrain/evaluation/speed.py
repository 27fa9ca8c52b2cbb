"""Decode speed and peak memory of greedy generation.

One timed ``model.generate`` call per repeat. A logits processor (called once per generated token,
right after the forward pass that produced it) stamps the time of every step, so one run gives:

- time to first token: from the call to the first step (prefill of the whole context);
- decode tokens/s: ``batch x (new_tokens - 1)`` tokens over the time from the first to the last
  step (the cost per token once the cache exists, which is what GQA speeds up).

Warm-up runs (not timed) come first so one-off costs (allocator growth, kernel selection) are not
counted; the median over repeats is reported. Generation is forced to produce exactly
``new_tokens`` tokens (``min_new_tokens``) so an early EOS cannot make a model look fast.

Two decode paths (``path``): ``eager`` times ``model.generate`` as above; ``static`` times
:class:`~gqa_uptrain.evaluation.static_decode.StaticDecoder` (transformers' static cache, a compiled
decode step, CUDA graphs on a GPU), stamping the same moments, so both paths' figures mean the same.
The static path always gets at least one warm-up run: the first run compiles.

Peak memory: on a GPU, ``torch.cuda.max_memory_allocated`` during the run minus what was allocated
before it (weights); on CPU, the peak resident set size sampled by a background thread minus the
RSS before the run (torch's CPU allocations are invisible to ``tracemalloc``). On glibc the heap's
free pages are handed back to the OS (``malloc_trim``) before each run: otherwise a run reuses the
pages an earlier run left resident and its RSS barely moves, and the figure depends on run order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

logger = logging.getLogger(__name__)


def _load_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None on other C libraries (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_free_memory() -> None:
    """Return freed heap pages to the OS so the next run's RSS growth is its own."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A logits processor that leaves the scores alone and records when each step finished."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)  # the forward pass is finished only when the GPU says so
        self.stamps.append(time.perf_counter())
        return scores


class _RSSPeak:
    """Samples this process's resident set size in a thread; ``peak`` is the highest seen."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> _RSSPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


@dataclass
class SpeedResult:
    """Greedy generation at one (context, batch): medians over ``repeats`` timed runs."""

    context: int
    batch: int
    new_tokens: int
    repeats: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    total_time_s: float
    peak_memory_bytes: int  # above the memory in use before generation (weights, buffers)
    memory_source: str  # "cuda.max_memory_allocated" or "process RSS"
    path: str = "eager"  # "eager": model.generate; "static": static cache + compiled decode step

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return asdict(self)


def _one_run(run: Any, device: torch.device) -> tuple[float, float, float, int]:
    """One generation ``run(clock)``; returns (time to first token, decode seconds, total seconds, peak extra bytes)."""
    clock = _StepClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        _release_free_memory()
    _sync(device)
    with _RSSPeak() as rss:
        start = time.perf_counter()
        run(clock)
        _sync(device)
        end = time.perf_counter()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = max(0, rss.peak - rss.start)
    ttft = clock.stamps[0] - start
    decode = clock.stamps[-1] - clock.stamps[0]
    return ttft, decode, end - start, peak


@torch.no_grad()
def measure_speed(
    model: Any,
    context: int,
    batch: int,
    new_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    path: str = "eager",
    compile_backend: str = "inductor",
) -> SpeedResult:
    """Time greedy generation of ``new_tokens`` tokens after a ``context``-token prompt, batch ``batch``.

    The prompt is random token ids (speed does not depend on the text). Encoder-decoder models get
    the prompt as encoder input. Returns medians over ``repeats`` runs after ``warmup`` runs.
    ``path``: ``eager`` (``model.generate``) or ``static`` (static cache and compiled decode step;
    decoder-only models; ``compile_backend``: ``inductor`` or ``cudagraphs``, see
    :class:`~gqa_uptrain.evaluation.static_decode.StaticDecoder`).
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 to time decoding")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    device = next(model.parameters()).device
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)  # (B, T)
    gen_cfg = model.generation_config
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "use_cache": True,
        # Models without a pad token warn on every call; any id works since nothing is padded.
        "pad_token_id": gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else 0,
    }
    if path == "eager":

        def run(clock: _StepClock) -> None:
            model.generate(**kwargs, logits_processor=[clock])

    elif path == "static":
        from .static_decode import StaticDecoder

        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("the static decode path is for decoder-only models; use --decode-path eager")
        decoder = StaticDecoder(model, batch, context + new_tokens, backend=compile_backend)
        warmup = max(1, warmup)  # the first run compiles the decode step

        def run(clock: _StepClock) -> None:
            decoder.generate(ids, new_tokens, stamps=clock.stamps)

    else:
        raise ValueError(f"decode path must be eager or static, got {path!r}")
    for _ in range(warmup):
        _one_run(run, device)
    runs = [_one_run(run, device) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    total = statistics.median(r[2] for r in runs)
    result = SpeedResult(
        context=context,
        batch=batch,
        new_tokens=new_tokens,
        repeats=repeats,
        time_to_first_token_s=ttft,
        decode_tokens_per_s=batch * (new_tokens - 1) / decode if decode > 0 else float("inf"),
        total_time_s=total,
        # The peak is the worst run's: memory must be there for every run.
        peak_memory_bytes=max(r[3] for r in runs),
        memory_source="cuda.max_memory_allocated" if device.type == "cuda" else "process RSS",
        path=path,
    )
    logger.info(
        "%s path, context %d batch %d: first token %.1f ms, %.1f tokens/s",
        path,
        context,
        batch,
        1000 * ttft,
        result.decode_tokens_per_s,
    )
    return result
