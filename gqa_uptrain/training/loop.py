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

No host synchronisation on the hot path: the loss, the non-finite flag and (with several
processes) the stop flag stay on the device and are read back only at a *sync point* (a logging,
evaluation or checkpoint step, the last step). The non-finite check stays exact without reading
back: the fused AdamW skips its update on the device when the (sticky) flag is set, the way
``GradScaler`` skips a step (``found_inf``), so the weights are those of the last finite step
when the error names the first non-finite one. An optimizer that cannot skip on the device
(DeepSpeed's, or ``optim.fused=false``) is checked every step, with a read-back.

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
from .distributed import failure_watch
from .finish import finish
from .losses import OutputHead, causal_lm_loss, chunked_lm_loss, chunked_next_token_nll, kl_to_teacher
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
    # failure_watch: an exception on one process (in a step, an evaluation, a sharded save) ends
    # every process within seconds, naming it, with no extra sync per step (distributed.FailureWatch).
    with claim_run_folder(config, accelerator, out) as resume_from, failure_watch(accelerator) as watch:
        run, state = setup(config, accelerator, out, resume_from)
        if watch is not None:
            watch.doing = lambda: f"training (step {state.step + 1} of {run.total_steps})"
        result = fit(run, state)
        if watch is not None:
            watch.doing = "saving the final checkpoint and model"
        result = finish(run, state, result)
    end_process_group()
    return result


def end_process_group() -> None:
    """Destroy this process's process group (if any) while the interpreter is whole.

    Left to the interpreter's exit, gloo's worker threads can be torn down during finalization and
    abort the process (SIGABRT, "terminate called without an active exception"), so its exit code
    no longer says what happened. :func:`uptrain` calls this when the run ends; after a failure the
    command calls it once the one-line error is printed (``cli.uptrain``): the destroy waits for this
    process's own collectives in flight, and the launcher may end the process meanwhile. A no-op in
    one process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class StepMetrics:
    """What one optimizer step reports, on the device: read back (a host sync) only when logged."""

    loss: torch.Tensor  # [] summed over processes, averaged over micro-batches
    kl: torch.Tensor | None  # [] the same; distillation only
    grad_norm: torch.Tensor | None  # before clipping; None without clipping
    stops: torch.Tensor  # [] how many processes were asked to stop (Ctrl-C / SIGTERM)
    stop_requested: bool  # this process's own flag as the step sampled it (read without a sync)


class NonFiniteGuard:
    """The first step whose loss was not finite, recorded on the device (no host sync per step).

    ``bad`` is sticky: once set, the fused optimizer skips every later update on the device
    (:func:`_skips_on_device`), so the weights stay those before the first bad step until
    :meth:`check` reads the record back at the next sync point and stops the run.
    """

    def __init__(self, device: torch.device) -> None:
        self.bad = torch.zeros((), device=device)  # 1.0 once any step was not finite
        self.step = torch.full((), -1, device=device, dtype=torch.long)  # the first such step
        self.loss = torch.zeros((), device=device)  # its loss

    def record(self, non_finite: torch.Tensor, loss: torch.Tensor, step: int) -> None:
        """Note step ``step``'s flag (the number of processes with a non-finite loss) and loss."""
        first = (non_finite > 0) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.float(), self.loss)
        self.bad = torch.maximum(self.bad, (non_finite > 0).float())

    def check(self, state: TrainState) -> None:
        """Raise :class:`GQAError` naming the first non-finite step, if there was one (a host sync)."""
        if self.bad.item() > 0:
            where = (
                f"the last good checkpoint is {state.last_checkpoint}"
                if state.last_checkpoint
                else "no checkpoint was saved yet"
            )
            raise GQAError(
                f"loss became {self.loss.item()} at step {self.step.item()}; stopped before updating the weights, "
                f"{where}; lower optim.lr or check the data, then --resume"
            )


def _skips_on_device(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer under accelerate's wrapper if it can skip a step on the device
    (a fused Adam/AdamW takes ``found_inf`` as GradScaler gives it), else ``None``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and inner.defaults.get("fused"):
        return inner
    return None


def train_step(
    run: Run, state: TrainState, batches: Iterator[dict[str, torch.Tensor]], stop: StopFlag
) -> StepMetrics:
    """One optimizer step: ``grad_accum`` micro-batches forward and backward, then clip and step.

    A non-finite loss on any process is recorded in ``run.guard`` and no weight changes from that
    step on; :meth:`NonFiniteGuard.check` raises :class:`GQAError` naming the step at the next sync
    point (at once when the optimizer cannot skip on the device).
    """
    cfg, accelerator, model, head = run.cfg, run.accelerator, run.model, run.head
    accum = cfg.optim.grad_accum
    step_loss = torch.zeros((), device=accelerator.device)
    step_kl = torch.zeros((), device=accelerator.device)
    for _ in range(accum):
        ids = next(batches)["input_ids"]  # [B, T]
        with accelerator.accumulate(model):
            with accelerator.autocast():
                # [B, T, V] logits; with the chunked loss [B, T, H] hidden states (losses.OutputHead)
                out = model(input_ids=ids, use_cache=False).logits
            t_logits = None
            if run.teacher is not None:
                with torch.no_grad(), accelerator.autocast():
                    t_logits = run.teacher(input_ids=ids, use_cache=False).logits  # [B, T, V]
            if head is not None:
                with accelerator.autocast():
                    loss, kl = chunked_lm_loss(
                        out, head.weight, head.bias, ids, head.chunk_tokens, t_logits, cfg.distill.temperature
                    )
            else:
                loss = causal_lm_loss(out, ids)
                kl = kl_to_teacher(out, t_logits, cfg.distill.temperature) if t_logits is not None else None
            if kl is not None:
                step_kl += kl.detach() / accum
                loss = loss + cfg.distill.weight * kl
            step_loss += loss.detach() / accum
            accelerator.backward(loss)
    # One collective per step: the summed loss, whether any process saw a non-finite loss, and
    # whether any process was asked to stop (all processes must agree to stop at the same step).
    stop_requested = stop.requested
    flags = torch.stack([
        step_loss.float(),
        (~torch.isfinite(step_loss)).float(),
        torch.tensor(float(stop_requested), device=accelerator.device),
        step_kl.float(),
    ])  # fmt: skip
    flags = accelerator.reduce(flags, "sum") if run.world > 1 else flags
    loss_sum, non_finite, stops, kl_sum = flags
    if run.guard is None:
        run.guard = NonFiniteGuard(accelerator.device)
    run.guard.record(non_finite, step_loss, state.step + 1)
    skipper = _skips_on_device(run.optimizer)
    if skipper is None:  # this optimizer cannot skip on the device: read the flag back now
        try:
            run.guard.check(state)
        except GQAError:
            run.optimizer.zero_grad(set_to_none=True)
            raise
    grad_norm = None
    if cfg.optim.grad_clip > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    if skipper is not None:
        skipper.found_inf = run.guard.bad  # the fused kernel leaves weights and moments alone when set
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += run.tokens_per_step
    state.session_tokens += run.tokens_per_step
    return StepMetrics(
        loss=loss_sum / run.world,
        kl=kl_sum / run.world if run.teacher is not None else None,
        grad_norm=grad_norm,
        stops=stops,
        stop_requested=stop_requested,
    )


def fit(run: Run, state: TrainState) -> UptrainResult:
    """Train from ``state`` to the step budget, evaluating and checkpointing as the recipe says.

    Evaluates the held-out blocks before the first step (``eval.at_start``), every ``eval.every``
    steps and after the last. Ctrl-C (or SIGTERM) stops at the next step boundary with a checkpoint
    (with several processes: at the next sync point, the same step on all); the result then says
    ``interrupted``. ``result.extra["sync_points"]`` lists (step, seconds since the first step) at
    each read-back (what a benchmark times a stretch of steps by), ``result.extra["train_loss"]``
    (step, loss) at each logging step.
    """
    cfg, accelerator = run.cfg, run.accelerator
    if run.eval_loader is not None and cfg.eval.at_start and state.step == 0:
        state.eval_before = _evaluate(run, state.step, "held-out before:")
    run.model.train()
    batches = micro_batches(run.train_loader, state)
    bar = tqdm(total=run.total_steps, initial=state.step, desc="uptraining",
               disable=not accelerator.is_main_process, dynamic_ncols=True)  # fmt: skip
    sync_points: list[tuple[int, float]] = []
    train_loss: list[tuple[int, float]] = []  # (step, loss) at the logging steps
    t0 = time.perf_counter()
    with StopFlag() as stop:
        while state.step < run.total_steps:
            metrics = train_step(run, state, batches, stop)
            step, last = state.step, state.step == run.total_steps
            bar.update(1)
            evaluate = (
                run.eval_loader is not None and cfg.eval.every and step % cfg.eval.every == 0 and not last
            )
            checkpoint = cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not last
            logged = step % cfg.output.log_every == 0 or last
            # One process reads its own stop flag for free; several agree on it at sync points only.
            stop_here = run.world == 1 and metrics.stop_requested
            if not (logged or evaluate or checkpoint or stop_here):
                continue
            # A sync point: the first read-back waits for the device to finish the steps so far.
            if run.guard is not None:
                run.guard.check(state)
            sync_points.append((step, time.perf_counter() - t0))
            tokens_per_second = state.session_tokens / max(1e-9, sync_points[-1][1])
            bar.set_postfix(loss=f"{metrics.loss.item():.3f}", tok_s=f"{tokens_per_second:,.0f}")
            if logged:
                train_loss.append((step, metrics.loss.item()))
                _log_step(run, state, metrics, tokens_per_second)
            if evaluate:
                _evaluate(run, step, f"step {step}: held-out")
            stop_here = metrics.stop_requested if run.world == 1 else bool(metrics.stops.item() > 0)
            if stop_here and not last:  # at the last step, just finish normally
                save_run_checkpoint(run, state)
                state.interrupted = True
                break
            if checkpoint:
                save_run_checkpoint(run, state)
    bar.close()
    seconds = time.perf_counter() - t0
    result = UptrainResult(
        output_dir=run.out, model_dir=None, steps=state.step, total_steps=run.total_steps, tokens=state.tokens,
        eval_before=state.eval_before, interrupted=state.interrupted, last_checkpoint=state.last_checkpoint,
        tokens_per_second=state.session_tokens / max(seconds, 1e-9), seconds=seconds,
        trainable_parameters=run.trainable_parameters, extra={"sync_points": sync_points, "train_loss": train_loss},
    )  # fmt: skip
    if run.eval_loader is not None and not state.interrupted:
        result.eval_after = _evaluate(run, state.step, "held-out after:")
    return result


@torch.no_grad()
def held_out_perplexity(
    model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, head: OutputHead | None = None
) -> dict[str, float]:
    """Held-out ``loss`` (mean next-token NLL, nats) and ``perplexity`` (its exp) over all held-out blocks.

    The token-weighted mean over every process's blocks, by
    :func:`~gqa_uptrain.evaluation.perplexity.next_token_nll`: the definition gqa-eval's
    perplexity uses too. (Not :func:`gqa_uptrain.evaluate`, which is gqa-eval itself.) With the
    chunked loss's ``head`` the model returns hidden states, projected here chunk by chunk.
    """
    was_training = model.training
    model.eval()
    sums = []
    for batch in loader:
        ids = batch["input_ids"]  # [B, T]
        with accelerator.autocast():
            out = model(input_ids=ids, use_cache=False).logits  # [B, T, V] (or [B, T, H] with a head)
            if head is not None:
                nll, tokens = chunked_next_token_nll(out, head.weight, head.bias, ids, head.chunk_tokens)
            else:
                nll, tokens = next_token_nll(out, ids)  # [B], [B]
        # Per block, so that gather_for_metrics can drop the blocks repeated to even out the last batch.
        sums.append(accelerator.gather_for_metrics(torch.stack([nll, tokens.float()], dim=1)))  # [B', 2]
    model.train(was_training)
    nll_sum, token_count = torch.cat(sums).cpu().double().sum(dim=0).tolist()
    loss = nll_sum / token_count
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0))}


def _evaluate(run: Run, step: int, label: str) -> dict[str, float]:
    """:func:`held_out_perplexity` on the run's held-out loader, logged to the trackers at ``step``."""
    assert run.eval_loader is not None
    result = held_out_perplexity(run.model, run.eval_loader, run.accelerator, run.head)
    run.accelerator.log({f"eval/{k}": v for k, v in result.items()}, step=step)
    logger.info("%s loss %.4f, perplexity %.2f", label, result["loss"], result["perplexity"])
    return result


def _log_step(run: Run, state: TrainState, m: StepMetrics, tokens_per_second: float) -> None:
    logs = {"train/loss": m.loss.item(), "train/lr": run.scheduler.get_last_lr()[0],
            "train/tokens_per_s": tokens_per_second, "train/tokens": state.tokens}  # fmt: skip
    if m.grad_norm is not None:
        logs["train/grad_norm"] = float(m.grad_norm)
    if m.kl is not None:
        logs["train/kl"] = m.kl.item()
    run.accelerator.log(logs, step=state.step)


def micro_batches(loader: DataLoader, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches from ``(state.epoch, state.batch_in_epoch)``, advancing both as it goes.

    Fetching leaves the global RNG alone: a DataLoader draws its workers' base seed from it when an
    iterator starts, which an uninterrupted run does at an epoch's start and a resumed one at the
    resume point, so any dropout (LoRA's) after a resume would see other random numbers.
    """
    while True:
        loader.set_epoch(state.epoch)
        skip = state.batch_in_epoch
        it = iter(skip_first_batches(loader, skip) if skip else loader)
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(it, None)
            if batch is None:
                break
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
