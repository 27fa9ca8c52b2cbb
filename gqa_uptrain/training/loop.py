"""The uptraining loop: continue training a converted checkpoint so it recovers from conversion.

It is accelerate's own loop (``complete_nlp_example``), kept that plain so the same code runs in
one CPU process, under ``torchrun``, and under ``accelerate launch`` with DDP, FSDP or DeepSpeed::

    uptrain(cfg)
        make_accelerator -> claim_run_folder          (setup.py: the lock, a previous run, resume point)
        setup     -> Run, TrainState                  (setup.py: data, model, optimizer, prepare, load_state)
        fit       -> held-out before; train_step ...; held-out after
        train_step: grad_accum x (accumulate: forward, loss, backward); clip; optimizer, schedule step
        finish    -> final checkpoint, model/ in the checkpoint's dtype, results.json, card, push (finish.py)

Exact resume: the data order is a function of (seed, epoch) only (accelerate's seedable sampler),
a checkpoint is taken only at an optimizer-step boundary and records the data position in its
:class:`~gqa_uptrain.training.state.TrainState`, and ``load_state`` restores model, optimizer,
scheduler and RNG states. A run killed at any point and resumed therefore replays exactly the
batches the uninterrupted run would have seen.

Several processes: every set-up phase and every checkpoint save ends with the processes agreeing
on its outcome (:mod:`gqa_uptrain.training.distributed`), so an error on any one of them stops all
of them with that error. Once training runs, one all-reduce per step carries the loss, whether any
process saw a non-finite loss and whether any was asked to stop, so all stop at the same step.

Run folder (``output.dir``)::

    recipe.yaml       the resolved recipe          model/        final Hugging Face checkpoint
    checkpoints/      step_00000100/ ... (last K)   logs/         TensorBoard (or other trackers)
    cache/            datasets + tokenized blocks  results.json  evaluation before / after
    .lock             present while a run uses the folder
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, skip_first_batches
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import GQAError
from ..evaluation.perplexity import next_token_nll
from .checkpointing import save_run_checkpoint
from .config import UptrainConfig
from .finish import finish
from .losses import causal_lm_loss, kl_to_teacher
from .setup import claim_run_folder, make_accelerator, setup
from .state import Run, TrainState, UptrainResult

logger = logging.getLogger(__name__)

__all__ = ["StepMetrics", "UptrainResult", "fit", "held_out_perplexity", "train_step", "uptrain"]


def uptrain(config: UptrainConfig) -> UptrainResult:
    """Uptrain ``config.model.path`` as the recipe says; see the module docstring for the layout.

    Returns an :class:`UptrainResult`; raises :class:`GQAError` for user errors (bad model folder,
    missing text column, folder in use, non-finite loss with the step named). In a multi-process
    run an error on any process during set-up or a checkpoint save stops every process with that
    error (a :class:`~gqa_uptrain.training.distributed.ProcessError` for errors that are not a
    :class:`GQAError`).
    """
    out = Path(config.output.dir).expanduser().absolute()
    accelerator = make_accelerator(config, out)
    with claim_run_folder(config, accelerator, out) as resume_from:
        run, state = setup(config, accelerator, out, resume_from)
        result = fit(run, state)
        return finish(run, state, result)


@dataclass
class StepMetrics:
    """What one optimizer step reports (the loss and KL averaged over processes and micro-batches)."""

    loss: float
    kl: float | None  # distillation only
    grad_norm: torch.Tensor | None  # before clipping; None without clipping (read when logged)
    stop_requested: bool  # Ctrl-C / SIGTERM on any process


def train_step(
    run: Run, state: TrainState, batches: Iterator[dict[str, torch.Tensor]], stop: StopFlag
) -> StepMetrics:
    """One optimizer step: ``grad_accum`` micro-batches forward and backward, then clip and step.

    Raises :class:`GQAError` naming the step when the loss is not finite on any process, before the
    weights are updated.
    """
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    accum = cfg.optim.grad_accum
    step_loss = torch.zeros((), device=accelerator.device)
    step_kl = torch.zeros((), device=accelerator.device)
    for _ in range(accum):
        ids = next(batches)["input_ids"]  # [B, T]
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
            loss = causal_lm_loss(logits, ids)
            if run.teacher is not None:
                with torch.no_grad(), accelerator.autocast():
                    t_logits = run.teacher(input_ids=ids, use_cache=False).logits  # [B, T, V]
                kl = kl_to_teacher(logits, t_logits, cfg.distill.temperature)
                step_kl += kl.detach() / accum
                loss = loss + cfg.distill.weight * kl
            step_loss += loss.detach() / accum
            accelerator.backward(loss)
    # One collective per step: the summed loss, whether any process saw a non-finite loss, and
    # whether any process was asked to stop (all processes must agree to stop at the same step).
    flags = torch.stack([
        step_loss.float(),
        (~torch.isfinite(step_loss)).float(),
        torch.tensor(float(stop.requested), device=accelerator.device),
        step_kl.float(),
    ])  # fmt: skip
    flags = accelerator.reduce(flags, "sum") if run.world > 1 else flags
    loss_sum, non_finite, stops, kl_sum = flags
    if non_finite > 0:
        run.optimizer.zero_grad(set_to_none=True)
        where = (
            f"the last good checkpoint is {state.last_checkpoint}"
            if state.last_checkpoint
            else "no checkpoint was saved yet"
        )
        raise GQAError(
            f"loss became {step_loss.item()} at step {state.step + 1}; stopped before updating the weights, "
            f"{where}; lower optim.lr or check the data, then --resume"
        )
    grad_norm = None
    if cfg.optim.grad_clip > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += run.tokens_per_step
    state.session_tokens += run.tokens_per_step
    return StepMetrics(
        loss=loss_sum.item() / run.world,
        kl=kl_sum.item() / run.world if run.teacher is not None else None,
        grad_norm=grad_norm,
        stop_requested=bool(stops > 0),
    )


def fit(run: Run, state: TrainState) -> UptrainResult:
    """Train from ``state`` to the step budget, evaluating and checkpointing as the recipe says.

    Evaluates the held-out blocks before the first step (``eval.at_start``), every ``eval.every``
    steps and after the last. Ctrl-C (or SIGTERM) stops at the next step boundary with a checkpoint;
    the result then says ``interrupted``.
    """
    cfg, accelerator = run.cfg, run.accelerator
    if run.eval_loader is not None and cfg.eval.at_start and state.step == 0:
        state.eval_before = _evaluate(run, state.step, "held-out before:")
    run.model.train()
    batches = micro_batches(run.train_loader, state)
    bar = tqdm(total=run.total_steps, initial=state.step, desc="uptraining",
               disable=not accelerator.is_main_process, dynamic_ncols=True)  # fmt: skip
    t0 = time.perf_counter()
    with StopFlag() as stop:
        while state.step < run.total_steps:
            metrics = train_step(run, state, batches, stop)
            step, last = state.step, state.step == run.total_steps
            tokens_per_second = state.session_tokens / max(1e-9, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.loss:.3f}", tok_s=f"{tokens_per_second:,.0f}")
            if step % cfg.output.log_every == 0 or last:
                _log_step(run, state, metrics, tokens_per_second)
            if run.eval_loader is not None and cfg.eval.every and step % cfg.eval.every == 0 and not last:
                _evaluate(run, step, f"step {step}: held-out")
            if metrics.stop_requested and not last:  # at the last step, just finish normally
                save_run_checkpoint(run, state)
                state.interrupted = True
                break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not last:
                save_run_checkpoint(run, state)
    bar.close()
    seconds = time.perf_counter() - t0
    result = UptrainResult(
        output_dir=run.out, model_dir=None, steps=state.step, total_steps=run.total_steps, tokens=state.tokens,
        eval_before=state.eval_before, interrupted=state.interrupted, last_checkpoint=state.last_checkpoint,
        tokens_per_second=state.session_tokens / max(seconds, 1e-9), seconds=seconds,
        trainable_parameters=run.trainable_parameters,
    )  # fmt: skip
    if run.eval_loader is not None and not state.interrupted:
        result.eval_after = _evaluate(run, state.step, "held-out after:")
    return result


@torch.no_grad()
def held_out_perplexity(
    model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator
) -> dict[str, float]:
    """Held-out ``loss`` (mean next-token NLL, nats) and ``perplexity`` (its exp) over all held-out blocks.

    The token-weighted mean over every process's blocks, by
    :func:`~gqa_uptrain.evaluation.perplexity.next_token_nll`: the definition gqa-eval's
    perplexity uses too. (Not :func:`gqa_uptrain.evaluate`, which is gqa-eval itself.)
    """
    was_training = model.training
    model.eval()
    sums = []
    for batch in loader:
        ids = batch["input_ids"]  # [B, T]
        with accelerator.autocast():
            logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
        nll, tokens = next_token_nll(logits, ids)  # [B], [B]
        # Per block, so that gather_for_metrics can drop the blocks repeated to even out the last batch.
        sums.append(accelerator.gather_for_metrics(torch.stack([nll, tokens.float()], dim=1)))  # [B', 2]
    model.train(was_training)
    nll_sum, token_count = torch.cat(sums).cpu().double().sum(dim=0).tolist()
    loss = nll_sum / token_count
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0))}


def _evaluate(run: Run, step: int, label: str) -> dict[str, float]:
    """:func:`held_out_perplexity` on the run's held-out loader, logged to the trackers at ``step``."""
    assert run.eval_loader is not None
    result = held_out_perplexity(run.model, run.eval_loader, run.accelerator)
    run.accelerator.log({f"eval/{k}": v for k, v in result.items()}, step=step)
    logger.info("%s loss %.4f, perplexity %.2f", label, result["loss"], result["perplexity"])
    return result


def _log_step(run: Run, state: TrainState, m: StepMetrics, tokens_per_second: float) -> None:
    logs = {"train/loss": m.loss, "train/lr": run.scheduler.get_last_lr()[0],
            "train/tokens_per_s": tokens_per_second, "train/tokens": state.tokens}  # fmt: skip
    if m.grad_norm is not None:
        logs["train/grad_norm"] = float(m.grad_norm)
    if m.kl is not None:
        logs["train/kl"] = m.kl
    run.accelerator.log(logs, step=state.step)


def micro_batches(loader: DataLoader, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches from ``(state.epoch, state.batch_in_epoch)``, advancing both as it goes."""
    while True:
        loader.set_epoch(state.epoch)
        skip = state.batch_in_epoch
        for batch in skip_first_batches(loader, skip) if skip else loader:
            state.batch_in_epoch += 1
            yield batch
        if state.batch_in_epoch == 0:
            raise GQAError("the training data yielded no batch; add data or lower optim.batch_size")
        state.epoch += 1
        state.batch_in_epoch = 0


class StopFlag:
    """First Ctrl-C / SIGTERM asks the loop to stop at the next step boundary and checkpoint;
    a second Ctrl-C aborts at once. Installed only in the main thread (signal's rule)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
