"""Several processes, one outcome: an error on any process during a set-up phase stops them all.

Every set-up phase (output folder, data, model, resume) and every checkpoint save runs inside
:func:`all_ranks`, which ends with the processes agreeing on its outcome. Without it a process that
fails alone leaves the others blocked in the next collective (a barrier, a broadcast, DDP's first
all-reduce) until the process group times out, or forever.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from accelerate import Accelerator

from ..errors import GQAError

logger = logging.getLogger(__name__)


class ProcessError(GQAError):
    """An error (not a :class:`GQAError`) on one process of a multi-process run, raised on every
    process so that none is left waiting in a collective for the one that failed.

    ``rank`` is the process that failed first, ``phase`` what the run was doing, ``error_type`` the
    qualified name of the original exception (chained as ``__cause__`` on the failing process).
    """

    def __init__(self, message: str, *, rank: int, phase: str, error_type: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.phase = phase
        self.error_type = error_type

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields: rebuild from them, not from ``args`` (Exception's default).
        return (_rebuild_process_error, (str(self), self.rank, self.phase, self.error_type))


def _rebuild_process_error(message: str, rank: int, phase: str, error_type: str) -> ProcessError:
    return ProcessError(message, rank=rank, phase=phase, error_type=error_type)


@dataclass
class Outcome:
    """What one process reports at the end of a phase: ok (with a small shared value) or its error."""

    rank: int
    share: Any = None
    error: BaseException | None = None  # the exception itself, when it survives pickling
    error_type: str = ""  # qualified type name; set exactly when the phase failed here
    message: str = ""


@dataclass
class Phase:
    """Handle of :func:`all_ranks`: set ``share`` inside the block; read ``shared`` after it."""

    name: str
    share: Any = None
    shared: list[Any] = field(default_factory=list)


def one_line(e: BaseException, limit: int = 500) -> str:
    """An exception's message on one line, at most ``limit`` characters (its type name if empty)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def all_ranks(accelerator: Accelerator, name: str) -> Iterator[Phase]:
    """Run a set-up phase on every process, then agree on its outcome before anyone goes on.

    Each process reports ok or its exception to all the others (``all_gather_object``). If any
    failed, every process raises: a failing process its own error, the others the first failure
    (the same :class:`GQAError` subclass and message, or a :class:`ProcessError` naming the rank and
    the original type). In a single process this is a plain block.

    The block itself must not contain collectives: a process that fails before one would leave the
    others waiting in it. Ctrl-C (``KeyboardInterrupt``) is not exchanged: the launcher delivers it
    to every process.
    """
    phase = Phase(name)
    world = accelerator.num_processes
    if world == 1:
        yield phase
        phase.shared = [phase.share]
        return
    rank = accelerator.process_index
    failure: Exception | None = None
    try:
        yield phase
    except Exception as e:
        failure = e
    mine = Outcome(rank=rank, share=None if failure else phase.share)
    if failure is not None:
        mine.error_type = f"{type(failure).__module__}.{type(failure).__qualname__}"
        mine.message = one_line(failure)
        with contextlib.suppress(Exception):
            # Sent as the object itself so that it arrives typed; one that does not survive
            # pickling (local classes, unpicklable attributes) arrives as its type name and text.
            pickle.loads(pickle.dumps(failure))
            mine.error = failure
    import torch.distributed as dist

    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, mine)
    failed = [o for o in outcomes if o.error_type]
    if not failed:
        phase.shared = [o.share for o in outcomes]
        return
    if failure is not None:
        if isinstance(failure, GQAError):
            raise failure
        # One line on every process; the traceback is for --verbose.
        logger.debug("process %d failed while %s", rank, name, exc_info=failure)
        raise ProcessError(
            f"process {rank} of {world} failed while {name}: {type(failure).__name__}: {mine.message} "
            "(every process stopped; -v shows the traceback)",
            rank=rank, phase=name, error_type=mine.error_type,
        ) from failure  # fmt: skip
    first = failed[0]
    if isinstance(first.error, GQAError):
        raise first.error from None
    short_type = first.error_type.rsplit(".", 1)[-1]
    raise ProcessError(
        f"process {first.rank} of {world} failed while {name}: {short_type}: {first.message} "
        f"(every process stopped; the log of process {first.rank} has the details)",
        rank=first.rank, phase=name, error_type=first.error_type,
    ) from None  # fmt: skip
