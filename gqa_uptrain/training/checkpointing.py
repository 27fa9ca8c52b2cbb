"""The run folder: its lock, its resumable checkpoints (save, rotate, find the newest, resume).

A checkpoint is accelerate's ``save_state`` (model, optimizer, scheduler, RNG states) plus
``trainer_state.json`` (:meth:`Run.checkpoint_record`), taken only at an optimizer-step boundary.
It is written into a temporary folder and renamed into place once every process is done, so a kill
during the save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..errors import CheckpointError, ConfigError, OutputExistsError
from ..io.outputs import pid_alive
from .config import UptrainConfig
from .distributed import all_ranks, one_line
from .state import Run, TrainState

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the duration of a run; refuse a folder another live run holds.

    A lock left by a dead process on this host (a crash, ``kill -9``) is taken over with a
    warning; one from another host cannot be checked and must be removed by hand.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not pid_alive(pid):
                logger.warning("removing stale lock of dead run (pid %s) in %s", pid, out)
                lock.unlink(missing_ok=True)
                continue
            raise OutputExistsError(
                f"output folder {out} is in use by another run (pid {pid} on {host}); wait for it, "
                f"choose another output.dir, or delete {lock} if that run is dead"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (with a trainer state), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run in ``output_dir``, or ``None``."""
    found = _checkpoints(Path(output_dir) / "checkpoints")
    return found[-1] if found else None


def prepare_output(cfg: UptrainConfig, out: Path) -> Path | None:
    """On the main process: refuse a folder with a previous run, clear it, or pick the checkpoint to resume from."""
    ckpt = latest_checkpoint(out)
    has_run = ckpt is not None or any((out / p).exists() for p in ("model", "adapters", "recipe.yaml"))
    if cfg.output.resume:
        if ckpt is None:
            logger.warning("output.resume: no checkpoint in %s yet; starting from the beginning", out)
        return ckpt
    if has_run:
        if not cfg.output.overwrite:
            raise OutputExistsError(
                f"output folder {out} holds a previous run; pass --resume to continue it or --overwrite to start over"
            )
        for sub in ("checkpoints", "model", "adapters", "logs"):  # adapters/: a LoRA run's
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in ("recipe.yaml", "results.json"):
            (out / f).unlink(missing_ok=True)
    return None


def writes_checkpoints(accelerator: Accelerator, save_on_each_node: bool) -> bool:
    """Whether this process creates, renames and rotates checkpoint folders.

    One process per filesystem: the run's main process when all nodes share one (the default: two
    nodes renaming and deleting the same folders race), each node's first process when every node
    has its own disk (``checkpoint.save_on_each_node``, accelerate's ``save_on_each_node``).
    """
    return accelerator.is_local_main_process if save_on_each_node else accelerator.is_main_process


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    record: dict[str, Any],
    keep_last: int,
    save_on_each_node: bool = False,
) -> Path:
    """``save_state`` into ``root/step_<record["step"]>`` with ``record`` as its trainer state; drop
    all but the newest ``keep_last`` checkpoints.

    Saved into a temporary folder renamed into place once every process is done. Folder operations
    happen once per filesystem (:func:`writes_checkpoints`); an error in them or in the save stops
    every process with that error (:func:`~gqa_uptrain.training.distributed.all_ranks`).
    """
    from accelerate.utils import DistributedType

    step = record["step"]
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    writer = writes_checkpoints(accelerator, save_on_each_node)
    with all_ranks(accelerator, f"creating checkpoint folder {tmp}"):
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # Sharded saves are collectives: they cannot run inside all_ranks (see its docstring).
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
    else:
        with all_ranks(accelerator, f"saving checkpoint {tmp}"):
            accelerator.save_state(str(tmp))
    with all_ranks(accelerator, f"publishing checkpoint {final}"):
        if writer:
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in _checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def save_run_checkpoint(run: Run, state: TrainState) -> Path:
    """Checkpoint ``run`` at ``state`` into ``checkpoints/`` of its folder; record it in ``state``."""
    c = run.cfg.checkpoint
    state.last_checkpoint = save_checkpoint(
        run.accelerator,
        run.out / "checkpoints",
        run.checkpoint_record(state),
        c.keep_last,
        c.save_on_each_node,
    )
    return state.last_checkpoint


def resume(run: Run, state: TrainState, checkpoint: Path) -> None:
    """Restore model, optimizer, scheduler, RNG states (accelerate) and ``state`` from ``checkpoint``.

    Refuses a checkpoint of other data (tokenizer, block size); warns when the batch layout
    differs, since the data order then cannot match the original run.
    """
    accelerator = run.accelerator
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    # A sharded load_state is a collective, which all_ranks cannot wrap (see its docstring).
    with all_ranks(accelerator, f"resuming from {checkpoint}"):
        try:
            saved = json.loads((checkpoint / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {checkpoint} cannot be read ({one_line(e)}); delete it to resume from the one "
                "before, or start over with --overwrite"
            ) from None
        expected = run.checkpoint_record(state)
        if saved.get("data_fingerprint") != expected["data_fingerprint"]:
            raise ConfigError(
                f"recipe key data: differs from the run in {checkpoint.parent.parent} (other data, tokenizer or "
                "block size); resume with the same data settings or start over with --overwrite"
            )
        if (
            saved.get("global_batch") != expected["global_batch"]
            or saved.get("grad_accum") != expected["grad_accum"]
        ):
            logger.warning(
                "batch layout differs from the checkpoint's: the data order will not match the original run"
            )
        if not sharded:
            accelerator.load_state(str(checkpoint))
    if sharded:
        accelerator.load_state(str(checkpoint))
    state.restore(saved)
    state.last_checkpoint = checkpoint
    logger.info("resumed from %s at step %d", checkpoint, state.step)
