"""What an uptraining run holds: its progress, what set-up built, and what it reports.

* :class:`TrainState`: where the run is (step, data position, tokens); its saved fields go into
  every checkpoint's ``trainer_state.json`` and come back on resume.
* :class:`Run`: everything :func:`~gqa_uptrain.training.setup.setup` built for this session (the
  accelerator, model, optimizer, loaders...); fixed once training starts.
* :class:`UptrainResult`: what :func:`~gqa_uptrain.training.loop.uptrain` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # the annotations only: reading a result or a state loads no torch
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from ..data.text import PackedData
    from .config import UptrainConfig


@dataclass
class TrainState:
    """Progress of a run. The fields in :attr:`SAVED` are checkpointed; the others are this session's.

    The data position is ``(epoch, batch_in_epoch)``: the data order is a function of (seed, epoch)
    only, so a resumed run skips ``batch_in_epoch`` micro-batches of ``epoch`` and then sees exactly
    what the uninterrupted run would have.
    """

    SAVED: ClassVar[tuple[str, ...]] = ("step", "epoch", "batch_in_epoch", "tokens", "eval_before")

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` consumed
    tokens: int = 0  # tokens trained on, all processes together
    eval_before: dict[str, float] | None = None  # held-out loss / perplexity before step 1
    # This session only:
    last_checkpoint: Path | None = None  # the newest checkpoint, saved or resumed from
    session_tokens: int = 0
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM before the last step

    def saved(self) -> dict[str, Any]:
        """The checkpointed fields, as ``trainer_state.json`` holds them."""
        return {name: getattr(self, name) for name in self.SAVED}

    def restore(self, saved: dict[str, Any]) -> None:
        """Take the checkpointed fields from a ``trainer_state.json`` (those it has)."""
        for name in self.SAVED:
            if name in saved:
                setattr(self, name, saved[name])


@dataclass
class Run:
    """What set-up built for one session of a run; the training loop only reads it."""

    cfg: UptrainConfig
    accelerator: Accelerator
    out: Path  # the run folder (output.dir, absolute)
    tokenizer: Any
    data: PackedData
    model: torch.nn.Module  # prepared (wrapped for DDP / FSDP / DeepSpeed where launched so)
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    eval_loader: DataLoader | None
    total_steps: int
    save_dtype: torch.dtype  # the checkpoint's own dtype: the final model is saved in it
    trainable_parameters: int  # how many weights train (freeze.mode)
    trackers: list[str]
    head: Any = None  # losses.OutputHead when the chunked loss is in use (the model returns hidden states)
    guard: Any = None  # loop.NonFiniteGuard: the device-side record of a non-finite loss

    @property
    def world(self) -> int:
        """Number of processes."""
        return self.accelerator.num_processes

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step, all processes and accumulated micro-batches together."""
        o = self.cfg.optim
        return o.batch_size * self.cfg.data.block_size * self.world * o.grad_accum

    def checkpoint_record(self, state: TrainState) -> dict[str, Any]:
        """``trainer_state.json`` of a checkpoint at ``state``: the progress, and what resuming checks."""
        o = self.cfg.optim
        return {
            **state.saved(),
            "data_fingerprint": self.data.fingerprint,
            "global_batch": o.batch_size * self.world,
            "grad_accum": o.grad_accum,
            "total_steps": self.total_steps,
        }


@dataclass
class UptrainResult:
    """What a finished (or interrupted) run reports."""

    output_dir: Path
    model_dir: Path | None
    steps: int
    total_steps: int
    tokens: int
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    interrupted: bool = False
    last_checkpoint: Path | None = None
    tokens_per_second: float = 0.0
    seconds: float = 0.0
    trainable_parameters: int = 0
    hub_url: str | None = None  # where output.push_to_hub uploaded the model (main process only)
    extra: dict[str, Any] = field(default_factory=dict)
