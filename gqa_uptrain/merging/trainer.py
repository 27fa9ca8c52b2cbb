"""Training one merged attention module to reproduce the original's output (refinement's inner loop).

:func:`refine_module` is called by the layer walk (``refine.py``) once per converted attention
module with what it caught: the module's inputs and the original module's outputs, per calibration
batch (:class:`Caught`). The steps, top to bottom:

1. split the batches into training and held-out ones (:func:`split_batches`);
2. measure the closed-form start on both (:meth:`ModuleTrainer.terms`);
3. train with Adam from the start (:meth:`ModuleTrainer.fit`): one step per training batch
   (:meth:`ModuleTrainer.train_step`, in bf16 autocast where :func:`~.device.use_autocast` says),
   a held-out check every few steps that keeps the best weights seen and stops the module early,
   restarting at a third of the step size when the first check is worse than the start;
4. solve the output projection by least squares given the rest (:func:`solve_output`);
5. keep the result only if it beats the start on the held-out batches and over all of them.

Everything runs on the device the caught tensors are used on; the weights, the error checks and the
least-squares solve stay in float32 / float64 whatever the training steps use.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..architectures import ModuleTensors
from . import device as _device
from .calibration import MomentAccumulator
from .device import Placement
from .methods import HeadBlocks
from .refine_spec import ModuleReport, RefineSpec


@dataclass
class Caught:
    """One attention module's calls during one layer pass: per batch, its arguments and the original
    module's output. The per-token tensors (the module's input, the output) live where ``placement``
    keeps activations; :meth:`call` and :meth:`target` hand them over on the compute device."""

    calls: list[tuple[tuple, dict]]
    outputs: list[torch.Tensor]
    moments: MomentAccumulator
    placement: Placement | None = None
    _low: dict[tuple[int, torch.dtype], tuple[tuple, dict]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.calls)

    def call(self, b: int) -> tuple[tuple, dict]:
        """Batch ``b``'s positional and keyword arguments, its input on the compute device."""
        args, kwargs = self.calls[b]
        if self.placement is None:
            return args, kwargs
        if args:
            return (self.placement.use(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.placement.use(kwargs["hidden_states"])}

    def low_precision_call(self, b: int, dtype: torch.dtype) -> tuple[tuple, dict]:
        """:meth:`call` with the other floating-point arguments (rotary tables, position biases) in
        ``dtype``, as a model in that dtype passes them; the per-token input stays as it is (autocast
        casts it where it is used) and so does any tensor with values a ``dtype`` cannot hold (an
        additive mask's large negative fill): see :func:`_lowered`. The cast arguments are kept per
        batch (they are small; the input is not kept)."""
        args, kwargs = self.call(b)
        key = (b, dtype)
        if key not in self._low:
            if args:
                self._low[key] = (_lowered(args[1:], dtype), _lowered(kwargs, dtype))
            else:
                self._low[key] = (
                    (),
                    _lowered({k: v for k, v in kwargs.items() if k != "hidden_states"}, dtype),
                )
        rest, low_kwargs = self._low[key]
        if args:
            return (args[0], *rest), low_kwargs
        return args, {**low_kwargs, "hidden_states": kwargs["hidden_states"]}

    def target(self, b: int) -> torch.Tensor:
        """Batch ``b``'s target output on the compute device."""
        t = self.outputs[b]
        return t if self.placement is None else self.placement.use(t)

    def compute_device(self) -> torch.device:
        """The device the module runs on."""
        if self.placement is not None:
            return self.placement.device
        return self.outputs[0].device if self.outputs else torch.device("cpu")


_Caught = Caught  # the name tests and scripts of earlier releases use

# Largest magnitude a tensor may hold to be passed in a low precision: bf16 keeps float32's range but
# an additive mask filled with float32's lowest value would round to -inf (and a fully masked row to NaN).
_LOWERED_MAX = 1e4


def _lowered(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` (tensors in nested tuples, lists and dicts) with each floating-point tensor whose values
    are finite and at most :data:`_LOWERED_MAX` in magnitude cast to ``dtype``; the rest as it is."""
    if isinstance(obj, torch.Tensor):
        if (
            obj.is_floating_point()
            and obj.dtype != dtype
            and obj.numel()
            and bool(torch.isfinite(obj).all())
            and float(obj.abs().max()) <= _LOWERED_MAX
        ):
            return obj.to(dtype)
        return obj
    if isinstance(obj, tuple):
        return tuple(_lowered(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_lowered(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _lowered(v, dtype) for k, v in obj.items()}
    return obj


def output_of(out: Any) -> torch.Tensor:
    """A module's output tensor (attention modules return a tuple whose first entry it is)."""
    return out[0] if isinstance(out, tuple) else out


def _param_names(suffix: str, n: int) -> list[str]:
    """Module-relative parameter names a packed tensor of ``suffix`` fills (per-head templates: one each)."""
    return [suffix.replace("{i}", str(j)) for j in range(n)] if "{i}" in suffix else [suffix]


def pack_params(unit: ModuleTensors, blocks: HeadBlocks, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Head ``blocks`` packed into the module's parameters ``{name inside the module: tensor}``
    (differentiable: packing only reshapes and concatenates)."""
    dims = unit.module.dims(config)
    out = {}
    for suffix, parts in blocks.items():
        t = unit.module.tensors[suffix].pack(parts, dims)
        if "{i}" in suffix:
            rows = t.view(-1, dims.head_dim).unbind(0)
            out.update(zip(_param_names(suffix, len(rows)), rows, strict=True))
        else:
            out[suffix] = t
    return out


def _error_terms(
    module: torch.nn.Module, params: dict[str, torch.Tensor], caught: Caught, batches: range | list[int]
) -> tuple[torch.Tensor | float, float]:
    """``(Σ‖attn'(x) − attn(x)‖², Σ‖attn(x)‖²)`` over ``batches`` (the first differentiable in
    ``params``; 0.0 for no batches)."""
    err: torch.Tensor | float = 0.0
    tot = 0.0
    for b in batches:
        args, kwargs = caught.call(b)
        y = output_of(torch.func.functional_call(module, params, args, kwargs))
        t = caught.target(b)
        err = err + (y - t).pow(2).sum()
        tot += float(t.pow(2).sum())
    return err, tot


def _relative_error(
    module: torch.nn.Module, params: dict[str, torch.Tensor], caught: Caught, batches: range | list[int]
) -> torch.Tensor:
    """``Σ‖attn'(x) − attn(x)‖² / Σ‖attn(x)‖²`` over ``batches`` (differentiable in ``params``)."""
    err, tot = _error_terms(module, params, caught, batches)
    assert isinstance(err, torch.Tensor), "no batches to measure"
    return err / max(tot, 1e-30)


def _output_weight(unit: ModuleTensors, blocks: HeadBlocks) -> str | None:
    """The suffix of the module's output-projection weight among ``blocks`` (``o_proj.weight``), if any."""
    for suffix, parts in blocks.items():
        packing = unit.module.tensors[suffix]
        if (
            packing.kind == "heads"
            and packing.role == "o"
            and "{i}" not in suffix
            and unit.module.tensor_kind(suffix) == "weight"
            and suffix.endswith(".weight")
            and set(parts) == {"o"}
        ):
            return suffix
    return None


def solve_output(
    module: torch.nn.Module,
    unit: ModuleTensors,
    blocks: HeadBlocks,
    caught: Caught,
    config: dict[str, Any],
    *,
    batches: list[int] | None = None,
    ridge: float = 1e-3,
) -> HeadBlocks | None:
    """``blocks`` with the output projection replaced by its least-squares optimum given the rest.

    With the queries, keys and values fixed, the module's output is linear in the output
    projection: ``y = z @ B + b`` with ``z`` the heads' concatenated outputs ``[tokens, H*d]`` and
    ``B`` the ``o`` blocks as ``[H*d, hidden]``. So ``B`` has a closed form: the ridge regression of
    the target on ``z``, pulled toward the current ``B`` (``ridge`` x the mean of ``z``'s second
    moments), which keeps the weights in range. The normal equations are accumulated and solved in
    float64 on the module's device. Returns None when the module has no separate output projection
    (BERT's lives outside its attention module).
    """
    found = solve_output_terms(module, unit, blocks, caught, config, batches=batches, ridge=ridge)
    return None if found is None else found[0]


def solve_output_terms(
    module: torch.nn.Module,
    unit: ModuleTensors,
    blocks: HeadBlocks,
    caught: Caught,
    config: dict[str, Any],
    *,
    batches: list[int] | None = None,
    ridge: float = 1e-3,
) -> tuple[HeadBlocks, float, float] | None:
    """:func:`solve_output`'s blocks and the squared output error over ``batches`` before and after
    the solve, ``(solved, Σ‖r‖², Σ‖r − zΔ‖²)``, read off the normal equations (no second pass).

    ``r`` is the residual ``target − y`` of ``blocks``: the error before is ``Σ‖r‖²`` and, for the
    update ``Δ``, the error after is ``Σ‖r‖² − 2⟨Δ, zᵀr⟩ + ⟨Δ, zᵀz Δ⟩``."""
    suffix = _output_weight(unit, blocks)
    if suffix is None:
        return None
    proj = module.get_submodule(suffix[: -len(".weight")])
    b = blocks[suffix]["o"]  # [H, d, hidden]
    width = b.shape[0] * b.shape[1]
    dev = b.device
    zz = torch.zeros(width, width, dtype=torch.float64, device=dev)
    zr = torch.zeros(width, b.shape[2], dtype=torch.float64, device=dev)
    rr = 0.0
    seen: list[torch.Tensor] = []
    hook = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            params = pack_params(unit, blocks, config)
            for k in range(len(caught.calls)) if batches is None else batches:
                args, kwargs = caught.call(k)
                seen.clear()
                y = output_of(torch.func.functional_call(module, params, args, kwargs))
                if len(seen) != 1 or seen[0].shape[-1] != width:
                    return None  # not one plain projection of the concatenated heads
                z = seen[0].reshape(-1, width).float()
                r = (caught.target(k) - y).reshape(-1, b.shape[2]).float()
                # One batch's products in float32 (a few thousand rows: relative error ~1e-6, well
                # under the ridge), summed over batches in float64: a float64 product of the
                # batch costs 4x as much on a CPU.
                zz += (z.T @ z).double()
                zr += (z.T @ r).double()
                rr += float(r.double().pow(2).sum())
    finally:
        hook.remove()
    lam = ridge * float(zz.diagonal().mean()) + 1e-12
    gram = zz.clone()
    gram.diagonal().add_(lam)
    delta = torch.linalg.solve(gram, zr)  # [H*d, hidden]: minimises ‖z Δ − r‖² + λ‖Δ‖²
    after = rr - 2 * float((delta * zr).sum()) + float((delta * (zz @ delta)).sum())
    out = {s: dict(p) for s, p in blocks.items()}
    out[suffix] = {"o": (b.detach() + delta.to(b.dtype).view_as(b))}
    return out, rr, max(after, 0.0)


def split_batches(n: int, share: float, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Calibration batch indices ``(train, held_out)``: a random ``share`` held out (at least one
    batch when there are two or more and ``share`` > 0; none otherwise, then training batches judge)."""
    k = 0 if n < 2 or share <= 0 else max(1, round(n * share))
    perm = torch.randperm(n, generator=gen).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


_split = split_batches  # the name of earlier releases


def _clone(blocks: HeadBlocks) -> HeadBlocks:
    return {s: {r: t.detach().clone() for r, t in p.items()} for s, p in blocks.items()}


def _to_host(blocks: HeadBlocks) -> HeadBlocks:
    return {s: {r: t.detach().cpu() for r, t in p.items()} for s, p in blocks.items()}


@dataclass
class _Fit:
    """One training run from the start: the best weights seen (None if none beat the floor), their
    held-out error, the steps taken, and whether the first check found things worse than the start."""

    best: HeadBlocks | None
    error: float
    steps: int
    failed: bool


@dataclass
class _Schedule:
    """The step size: linear warm-up, cosine decay to 10% over the budget, and, once the early stop
    has fired, a linear anneal to zero over one check interval (``anneal``: its first step and size)."""

    peak: float
    budget: int
    warmup: int
    interval: int
    anneal: tuple[int, float] | None = field(default=None)

    def at(self, step: int) -> float:
        if self.anneal is not None:
            first, size = self.anneal
            return size * (1 - (step - first) / self.interval)
        warm = min(1.0, (step + 1) / max(self.warmup, 1))
        return self.peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / self.budget)))


class ModuleTrainer:
    """Refinement of one merged attention module: ``module`` (the converted attention, called with
    packed head blocks as its parameters) is trained from ``start`` to reproduce ``caught``'s outputs."""

    def __init__(
        self,
        module: torch.nn.Module,
        unit: ModuleTensors,
        start: HeadBlocks,
        caught: Caught,
        config: dict[str, Any],
        spec: RefineSpec,
        *,
        progress: bool = False,
    ):
        self.module, self.unit, self.caught, self.config, self.spec = module, unit, caught, config, spec
        self.progress = progress
        self.device = caught.compute_device()
        self.gen = torch.Generator().manual_seed(0)
        self.train, held = split_batches(len(caught), spec.validation, self.gen)
        self.judge = held or self.train
        self.budget = min(spec.steps, max(1, math.ceil(spec.max_epochs * len(self.train))))
        # The blocks arrive in the checkpoint's dtype (bf16, fp16) and on the host; the module
        # computes in float32 on the device.
        self.start = start
        self.start32 = {
            s: {r: t.detach().to(self.device, torch.float32) for r, t in p.items()} for s, p in start.items()
        }
        self.width = max(
            (t.shape[-1] for p in self.start32.values() for t in p.values() if t.dim() >= 3), default=0
        )
        self.bf16 = _device.use_autocast(spec.autocast, self.device, self.width)
        # Each batch's squared target norm (the loss's denominator): measured once, not every step.
        with torch.no_grad():
            self.norms = [float(caught.target(b).pow(2).sum()) for b in range(len(caught))]

    # -- measuring ----------------------------------------------------------------------------
    def terms(self, blocks: HeadBlocks, batches: list[int]) -> tuple[float, float]:
        """``(squared error, squared target norm)`` of ``blocks`` over ``batches``, in float32."""
        params = pack_params(self.unit, blocks, self.config)
        err = 0.0
        with torch.no_grad():
            for b in batches:
                err += float(self.squared_error(params, b))
        return err, sum(self.norms[b] for b in batches)

    def squared_error(
        self, params: dict[str, torch.Tensor], batch: int, *, low: bool = False
    ) -> torch.Tensor:
        """``‖attn'(x) − attn(x)‖²`` on ``batch`` with the packed ``params`` (differentiable); ``low``:
        the call's other floating-point arguments in bfloat16 (the training steps under autocast)."""
        if low:
            args, kwargs = self.caught.low_precision_call(batch, torch.bfloat16)
        else:
            args, kwargs = self.caught.call(batch)
        y = output_of(torch.func.functional_call(self.module, params, args, kwargs))
        return (y - self.caught.target(batch)).pow(2).sum()

    def error(self, blocks: HeadBlocks, batches: list[int]) -> float:
        """Relative output error of ``blocks`` over ``batches``."""
        err, tot = self.terms(blocks, batches)
        return err / max(tot, 1e-30)

    # -- training -----------------------------------------------------------------------------
    def optimizer(self, blocks: HeadBlocks, lr: float) -> torch.optim.Adam:
        """Adam over ``blocks``' tensors, each with a step relative to its own RMS: Adam moves each
        weight by about ``lr`` per step whatever its scale, so one setting suits models whose weights
        differ in scale. A short second-moment memory (0.95) suits a run of a few hundred steps."""
        leaves = [t for p in blocks.values() for t in p.values()]
        scales = [float(t.detach().pow(2).mean().sqrt().clamp_min(1e-8)) for t in leaves]
        return torch.optim.Adam(
            [{"params": [t], "scale": sc} for t, sc in zip(leaves, scales, strict=True)],
            lr=lr,
            betas=(0.9, 0.95),
        )

    def train_step(self, blocks: HeadBlocks, opt: torch.optim.Adam, size: float, batch: int) -> float:
        """One Adam step of ``blocks`` on training ``batch`` at step ``size``: the batch's loss (not
        finite: the step is not taken)."""
        for group in opt.param_groups:
            group["lr"] = size * group["scale"]
        params = pack_params(self.unit, blocks, self.config)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            # The other float arguments (rotary tables) in bf16 too, as a bf16 model passes them:
            # autocast leaves them in float32, and their float32 products with bf16 queries and keys
            # cost about a tenth of a step.
            loss = self.squared_error(params, batch, low=self.bf16) / max(self.norms[batch], 1e-30)
        value = loss.item()
        if not math.isfinite(value):
            return value
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return value

    def fit(self, lr: float, floor: float) -> _Fit:
        """Adam from the start at peak step ``lr``; the best weights whose held-out error beats
        ``floor``. Every ``eval_every`` steps a held-out check keeps the best weights seen; after
        ``patience`` checks without a ``min_gain`` gain (the module has stopped learning the function,
        or has started to fit the text) the step size anneals to zero over one more interval, then
        training stops."""
        spec = self.spec
        blocks = {
            s: {r: t.clone().requires_grad_(True) for r, t in p.items()} for s, p in self.start32.items()
        }
        opt = self.optimizer(blocks, lr)
        sched = _Schedule(lr, self.budget, spec.warmup, spec.eval_every)
        best, best_err, order, stale, steps = None, floor, [], 0, 0
        bar = self._bar()
        try:
            for step in range(self.budget):
                if not order:
                    order = [
                        self.train[i] for i in torch.randperm(len(self.train), generator=self.gen).tolist()
                    ]
                size = sched.at(step)
                if not math.isfinite(self.train_step(blocks, opt, size, order.pop())):
                    return _Fit(best, best_err, steps, best is None)  # diverged
                steps = step + 1
                bar.update(1)
                annealed = sched.anneal is not None and steps - sched.anneal[0] == spec.eval_every
                if steps % spec.eval_every and steps != self.budget and not annealed:
                    continue
                current = _clone(blocks)
                e = self.error(current, self.judge)
                if best is None and e >= floor and steps == min(spec.eval_every, self.budget):
                    return _Fit(None, floor, steps, True)  # worse than the start at the first check
                stale = stale + 1 if e > (1 - spec.min_gain) * best_err else 0
                if e < best_err:
                    best, best_err = current, e
                if annealed or (stale >= spec.patience and not spec.anneal):
                    break
                if stale >= spec.patience and sched.anneal is None:
                    # Stopping at a step size near its peak leaves the weights noisy: decay it to
                    # zero first (what a schedule that ends there does).
                    sched.anneal = (steps, size)
        finally:
            bar.close()
        return _Fit(best, best_err, steps, False)

    def _bar(self) -> Any:
        """A progress bar over this module's step budget (with its ETA), when ``progress``."""
        from tqdm.auto import tqdm

        return tqdm(
            total=self.budget, desc=f"  {self.unit.name}", unit="step", leave=False, disable=not self.progress
        )

    # -- the whole refinement -----------------------------------------------------------------
    def run(self) -> tuple[HeadBlocks, ModuleReport]:
        """Train, solve the output projection, and return the better of the result and the start
        (on the host, float32 or the start's dtype) with a report."""
        t0 = time.perf_counter()
        spec = self.spec
        # The error over all batches is the judged batches' plus the rest's: each batch runs once,
        # and the targets' norms (the denominators) do not change with the weights.
        judged = set(self.judge)
        rest = [k for k in range(len(self.caught)) if k not in judged]
        judged_err, judged_tot = self.terms(self.start32, self.judge)
        rest_err, rest_tot = self.terms(self.start32, rest)
        judged_tot, whole_tot = max(judged_tot, 1e-30), max(judged_tot + rest_tot, 1e-30)
        before_judged, before = judged_err / judged_tot, (judged_err + rest_err) / whole_tot
        best, best_judged = None, before_judged
        lr = spec.lr * min(1.0, math.sqrt(spec.reference_width / self.width)) if self.width else spec.lr
        steps, best_lr, backoffs = 0, math.nan, 0
        for attempt in range(spec.backoffs + 1):
            found = self.fit(lr, before_judged)
            steps += found.steps
            if found.best is not None:
                best, best_judged, best_lr, backoffs = found.best, found.error, lr, attempt
            # The step size suits most models, not all: when the first check finds the held-out
            # error above the start's, start over with a third of it.
            if not found.failed:
                break
            lr /= 3
        # The error of the kept weights on the batches not judged: the solve reads it off its normal
        # equations when those batches are the ones it solves on (no second pass over them).
        rest_after: float | None = None
        if spec.solve_output and best is not None:
            solve = solve_output_terms(
                self.module, self.unit, best, self.caught, self.config, batches=self.train
            )
            if solve is not None:
                solved, rest_unsolved, rest_solved = solve
                e = self.error(solved, self.judge)
                if e < best_judged:
                    best, best_judged, rest_after = solved, e, rest_solved
                else:
                    rest_after = rest_unsolved
                if rest != self.train:
                    rest_after = None
        if best is not None and rest_after is None:
            rest_after = self.terms(best, rest)[0]
        after = (best_judged * judged_tot + rest_after) / whole_tot if best is not None else before
        kept = best is not None and best_judged < before_judged and after < before
        out = _to_host(best) if kept else self.start  # type: ignore[arg-type]
        report = ModuleReport(
            self.unit.name,
            before,
            after if kept else before,
            steps,
            time.perf_counter() - t0,
            kept,
            best_lr if kept else math.nan,
            backoffs if kept else 0,
            self.bf16,
        )
        return out, report


def refine_module(
    module: torch.nn.Module,
    unit: ModuleTensors,
    start: HeadBlocks,
    caught: Caught,
    config: dict[str, Any],
    spec: RefineSpec,
    *,
    progress: bool = False,
) -> tuple[HeadBlocks, ModuleReport]:
    """Train ``start``'s head blocks so ``module`` (the converted attention) reproduces ``caught``'s
    outputs; returns the better of the trained and the starting blocks (on the host), and a report.

    A share of the calibration batches (``spec.validation``) is held out: it decides the early stop,
    which of the weights seen is kept, and whether refinement is kept at all; the report's errors are
    over every batch. ``progress`` shows a bar over the module's steps (with its ETA)."""
    return ModuleTrainer(module, unit, start, caught, config, spec, progress=progress).run()
