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
from collections.abc import Callable, Iterator
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


# --------------------------------------------------------------------------------------------------
# Training: an error on one process ends every process, without a host sync per step
# --------------------------------------------------------------------------------------------------


class FailureWatch:
    """Ends every process of a run soon after any one of them fails, wherever the others are waiting.

    :func:`all_ranks` covers the set-up phases, where every process can stop to compare outcomes.
    Inside a training step that would cost a host sync per step, so instead:

    * the failing process (:meth:`failed`) writes ``rank``, its error and what the run was doing to
      the key-value store that ``torchrun`` / ``accelerate launch`` already run at ``MASTER_ADDR:MASTER_PORT``
      (the first failure wins), waits up to ``ack_s`` seconds for every other process to have seen
      it (so that they can name it even if the store goes away with this process), and raises;
    * every process runs a thread that polls that key every ``poll_s`` seconds. On seeing another
      process's failure it acknowledges it and gives the main thread ``grace_s`` seconds to fail on
      its own (gloo's collectives fail as soon as the failed process exits; the main thread then
      raises a :class:`ProcessError` naming the first failure). A main thread still blocked after
      that (an NCCL collective waits for its timeout, 30 minutes) is ended by the thread itself:
      one log line naming the failed process and its error, then ``os._exit(2)``.

    A process killed outright (SIGKILL, a lost node) writes nothing: gloo's peers fail at once with
    a closed connection and report themselves; the launcher ends the rest.
    """

    PREFIX = "gqa_uptrain/failure"

    def __init__(
        self,
        rank: int,
        world: int,
        store: Any,
        poll_s: float = 1.0,
        grace_s: float = 5.0,
        ack_s: float = 10.0,
    ) -> None:
        import threading

        self.rank, self.world, self.store = rank, world, store
        self.poll_s, self.grace_s, self.ack_s = poll_s, grace_s, ack_s
        # What the run is doing, for the message: a text, or a function giving it (the step).
        self.doing: str | Callable[[], str] = "setting up"
        self._stop = threading.Event()
        self._handling = threading.Lock()  # held by whichever thread handles the failure
        self._thread = threading.Thread(target=self._watch, name="gqa-failure-watch", daemon=True)

    # Keys (the launcher's store is shared by the run's processes only; a restart gets new keys).
    def _key(self, name: str) -> str:
        import os

        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return f"{self.PREFIX}/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{restart}/{name}"

    def start(self) -> FailureWatch:
        """Start polling for other processes' failures."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (the run is over on this process)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.poll_s + 1)

    def _record(self) -> tuple[int, str] | None:
        """The first failure recorded by any process: (rank, message), or ``None``."""
        key = self._key("first")
        if not self.store.check([key]):
            return None
        rank, _, message = self.store.get(key).decode().partition("\t")
        return int(rank), message

    def _acknowledge(self) -> None:
        self.store.set(self._key(f"seen/{self.rank}"), "1")

    def failed(self, error: BaseException) -> BaseException:
        """On the process where ``error`` was raised: record it, wait for the others to see it, and
        return the exception to raise instead (``error`` itself when it is a :class:`GQAError`
        that every process raises, e.g. a non-finite loss; else a :class:`ProcessError`)."""
        import time

        self._handling.acquire(blocking=False)  # the watch thread stays out of it from now on
        self._stop.set()
        error_type = f"{type(error).__module__}.{type(error).__qualname__}"
        mine = f"{type(error).__name__}: {one_line(error)}"
        doing = self.doing() if callable(self.doing) else self.doing
        value = f"{self.rank}\t{doing}\t{error_type}\t{mine}"
        try:
            first = self.store.compare_set(self._key("first"), "", value).decode()
            self._acknowledge()
        except Exception:  # the store went away with a process that is gone: report our own error
            logger.debug("could not record the failure in the launcher's store", exc_info=True)
            first = value
        rank_s, doing, first_type, message = first.split("\t", 3)
        first_rank = int(rank_s)
        if first_rank == self.rank:
            # Ours is the first failure: let the others see it before this process (and perhaps the
            # store it hosts) goes away.
            deadline = time.monotonic() + self.ack_s
            others = [self._key(f"seen/{r}") for r in range(self.world) if r != self.rank]
            while time.monotonic() < deadline:
                try:
                    if self.store.check(others):
                        break
                except Exception:
                    break
                time.sleep(0.1)
        if isinstance(error, GQAError) and not isinstance(error, ProcessError):
            return error
        if isinstance(error, ProcessError):  # already agreed by all_ranks
            return error
        if first_rank == self.rank:
            logger.debug("process %d failed while %s", self.rank, doing, exc_info=error)
            err = ProcessError(
                f"process {self.rank} of {self.world} failed while {doing}: {message} "
                "(every process stopped; -v shows the traceback)",
                rank=self.rank, phase=doing, error_type=first_type,
            )  # fmt: skip
            err.__cause__ = error  # kept for -v (failure_watch raises it "from" this)
            return err
        # Another process failed first; ours (a closed connection, most likely) follows from it.
        logger.debug("process %d: %s after process %d failed", self.rank, mine, first_rank, exc_info=error)
        return ProcessError(
            f"process {first_rank} of {self.world} failed while {doing}: {message} "
            f"(every process stopped; the log of process {first_rank} has the details)",
            rank=first_rank, phase=doing, error_type=first_type,
        )  # fmt: skip

    def _watch(self) -> None:
        import os
        import time

        while not self._stop.wait(self.poll_s):
            try:
                found = self._record()
            except Exception:  # the store's host has exited (the end of a run, or a failure)
                continue
            if found is None or found[0] == self.rank:
                continue
            with contextlib.suppress(Exception):
                self._acknowledge()
            if self._stop.wait(self.grace_s):  # the main thread failed (or finished) on its own
                return
            if not self._handling.acquire(blocking=False):
                return
            first_rank, rest = found
            doing, _error_type, message = rest.split("\t", 2)
            logger.critical(
                "process %d of %d failed while %s: %s (every process stopped; the log of process %d has the "
                "details)", first_rank, self.world, doing, message, first_rank,
            )  # fmt: skip
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            time.sleep(0.1)
            os._exit(2)


@contextlib.contextmanager
def failure_watch(accelerator: Accelerator) -> Iterator[FailureWatch | None]:
    """Run the block under a :class:`FailureWatch` (several processes), turning an exception on
    this process into the run-wide error it raises. Yields ``None`` in a single process, or where
    the launcher's store cannot be reached (the process group's timeout then applies)."""
    import os

    if accelerator.num_processes == 1:
        yield None
        return
    watch = None
    try:
        from datetime import timedelta

        import torch.distributed as dist

        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=30),
            wait_for_workers=False,
        )
        watch = FailureWatch(accelerator.process_index, accelerator.num_processes, store).start()
    except Exception as e:  # no MASTER_ADDR (an MPI launch), or no store there
        logger.debug(
            "no failure watch (%s): a failed process's peers wait for the process group's timeout", e
        )
    if watch is None:
        yield None
        return
    try:
        yield watch
    except Exception as e:
        raised = watch.failed(e)
        if raised is e:
            raise
        raise raised from raised.__cause__  # this process's own error, or None when another failed first
    finally:
        watch.stop()
