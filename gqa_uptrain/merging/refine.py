"""Layer-wise refinement: after the closed-form merge, train each merged attention module to
reproduce the original module's output, one layer at a time.

The closed-form fit (``aligned.py``) sees only second moments of each module's input: it cannot
see the softmax, so it leaves error that compounds through the layers. Refinement is block-wise
reconstruction as in post-training quantization (BRECQ, OmniQuant) and DHA's learned head fusion
(arXiv 2406.06567), applied to merged heads. For each decoder layer ``i`` in turn:

1. the original layer ``i`` runs on the hidden states of the *already converted* layers before it;
   each converted attention module's input and output are caught (the target), and the input
   moments feed the closed-form fit, so every layer is fitted to what it will really see and
   errors do not compound;
2. the closed-form merge gives the module's starting weights (as head blocks);
3. Adam trains those head blocks (the shared K/V heads, the query rows and output columns the fit
   folds maps into, biases and K norms where the family has them) to minimise
   ``‖attn'(x) − attn(x)‖² / ‖attn(x)‖²`` over the calibration batches, with a cosine learning
   rate, for a bounded number of steps and passes over the batches (in bf16 autocast where the
   hardware computes it natively and the module is wide enough to gain from it). A share of the
   calibration sequences is held out: it stops training once the error there stops falling (a
   module that has begun to fit the calibration text instead of the function stops, after
   annealing its step size to zero), picks the best weights seen, and restarts a module at a
   smaller step when the first check finds it worse than the start. The output
   projection is then solved by least squares (the output is linear in it once the rest is fixed).
   The result is kept only if it beats the closed-form start on the held-out sequences and over
   all of them, so refinement never makes a module worse;
4. the converted layer ``i`` (refined attention, original everything else) produces the next
   layer's inputs.

The converted module is the family's own attention class built from the converted config, called
through :func:`torch.func.functional_call` with the packed head blocks as its parameters: the
family's real code computes both sides, nothing of it is reimplemented here. The output is still a
plain GQA checkpoint with nothing added at inference.

Memory: one decoder layer (original and converted) plus, per calibration batch, the layer's input
states, its attention input and its attention output (3 × tokens × hidden floats; 16k tokens at
Llama-2-7B width: 0.8 GB), plus the refined head blocks of the modules done so far until the
converter streams them (spilled to a temporary folder, so RAM does not grow with depth).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..architectures import ModuleTensors, get_architecture
from ..io.checkpoint import Source
from .calibration import LayerWalk, ModuleMoments, MomentAccumulator, _skeleton, _Stop
from .memory import release_free_memory
from .methods import HeadBlocks

logger = logging.getLogger(__name__)

AUTOCAST_MIN_WIDTH = 512  # narrowest module trained in bf16 autocast (``RefineSpec.autocast``)


@dataclass(frozen=True)
class RefineSpec:
    """How hard to train each merged attention module (the refinement budget)."""

    steps: int = 300  # most optimizer steps per attention module (the early stop may end sooner)
    # ... and at most this many passes over the training batches: with little calibration text the
    # later passes fit the text rather than the function (the held-out stop catches that, but late,
    # at a step size still near its peak); the schedule is laid over the shorter budget.
    max_epochs: float = 20.0
    # Adam's peak step, relative to each tensor's RMS (cosine decay to 10% of it), for a module whose
    # input is ``reference_width`` wide; a wider module gets ``lr * sqrt(reference_width / width)``:
    # Adam moves every weight of a row by about the same amount, so the row's output moves about
    # sqrt(width) times further than one weight's share of it (the 1/sqrt(fan-in) rule of muP).
    lr: float = 0.1
    reference_width: int = 128
    batch_size: int = 4  # calibration sequences per step
    # The training forward and backward in bfloat16 autocast for modules at least
    # ``AUTOCAST_MIN_WIDTH`` wide on a CPU that computes bf16 natively (AVX512-BF16 or AMX): 12%
    # faster per SmolLM2 module there, the same result (the weights, the error checks, the kept
    # weights and the output solve stay in float32).
    autocast: bool = True
    # Early stop on held-out calibration text: every ``eval_every`` steps the module's error on the
    # held-out share is measured; after ``patience`` such checks without a ``min_gain`` gain, training
    # stops (after the anneal) and the best weights seen are kept. This stops a module that has
    # started to fit the calibration text rather than the function (a small calibration set; a wide
    # model).
    eval_every: int = 20
    patience: int = 2
    min_gain: float = 0.01  # a check "gains" when the held-out error falls by at least this share
    anneal: bool = True  # before stopping early, decay the step size to zero over ``eval_every`` steps
    validation: float = 0.125  # share of the calibration sequences held out (at least one batch)
    warmup: int = 10  # linear learning-rate warm-up steps
    backoffs: int = 2  # restarts at a third of the step size when the first check finds things worse
    # After training, the output projection is set to its least-squares optimum given the rest.
    solve_output: bool = True
    # What the converted module is trained to output: ``original``, the original module's output on
    # the original model's own hidden states (so a layer also makes up for the error of the layers
    # before it); ``same-input``, the original module's output on the converted prefix's states.
    target: str = "same-input"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"refinement steps must be >= 0, got {self.steps}")
        if self.max_epochs <= 0:
            raise ValueError(f"refinement max_epochs must be positive, got {self.max_epochs}")
        if self.lr <= 0 or self.batch_size <= 0:
            raise ValueError("refinement lr and batch size must be positive")
        if self.eval_every <= 0 or self.patience <= 0 or self.backoffs < 0 or self.reference_width <= 0:
            raise ValueError(
                "refinement eval_every, patience and reference_width must be positive, backoffs >= 0"
            )
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"refinement min_gain must be in [0, 1), got {self.min_gain}")
        if not 0 <= self.validation < 1:
            raise ValueError(f"refinement validation share must be in [0, 1), got {self.validation}")
        if self.target not in ("original", "same-input"):
            raise ValueError(f"refinement target must be 'original' or 'same-input', not {self.target!r}")


@dataclass
class ModuleReport:
    """What refinement did to one attention module (relative output error over all batches)."""

    module_name: str
    error_before: float  # closed-form start
    error_after: float  # kept result (== before when refinement was rejected)
    steps: int
    seconds: float
    kept: bool
    lr: float = math.nan  # the peak step size the kept weights were trained at (after any back-off)
    backoffs: int = 0  # restarts at a smaller step size before the kept weights
    bf16: bool = False  # trained in bfloat16 autocast (``RefineSpec.autocast``)


class BlockStore:
    """Refined head blocks waiting for the converter, spilled to a temporary folder (one file per
    module) so memory does not grow with the number of layers; each is deleted once taken."""

    PREFIX = "gqa-refine-"

    def __init__(self) -> None:
        # In the system's temporary folder (``TMPDIR`` moves it): the blocks of every layer sit here
        # until the converter streams them, in the checkpoint's dtype (2.7 GB at Llama-2-7B in bf16).
        _remove_stale_stores()
        self.folder = Path(tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def put(
        self, module_name: str, blocks: HeadBlocks, dtypes: dict[str, dict[str, torch.dtype]] | None = None
    ) -> None:
        """Keep ``blocks`` (detached; cast to ``dtypes[suffix][role]`` where given) for :meth:`take`."""
        from safetensors.torch import save_file

        dtypes = dtypes or {}
        flat = {
            f"{s}|{r}": t.detach().to(dtypes.get(s, {}).get(r, t.dtype)).contiguous()
            for s, parts in blocks.items()
            for r, t in parts.items()
        }
        save_file(flat, self.folder / f"{module_name}.safetensors")

    def take(self, module_name: str) -> HeadBlocks | None:
        """The blocks stored for ``module_name`` (removed from the store), or None."""
        from safetensors.torch import load_file

        path = self.folder / f"{module_name}.safetensors"
        if not path.exists():
            return None
        out: HeadBlocks = {}
        for key, t in load_file(path).items():
            suffix, role = key.split("|")
            out.setdefault(suffix, {})[role] = t  # type: ignore[index]
        path.unlink()
        return out

    def close(self) -> None:
        """Remove the folder and whatever is left in it."""
        self._finalizer()


def _remove_stale_stores() -> None:
    """Remove the block stores of processes that died without cleaning up (killed mid-conversion)."""
    from ..io.outputs import pid_alive

    for path in Path(tempfile.gettempdir()).glob(f"{BlockStore.PREFIX}*-*"):
        pid = path.name[len(BlockStore.PREFIX) :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


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


@dataclass
class _Caught:
    """One attention module's calls during one layer pass: per batch, its arguments and output."""

    calls: list[tuple[tuple, dict]]
    outputs: list[torch.Tensor]
    moments: MomentAccumulator


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _error_terms(
    module: torch.nn.Module, params: dict[str, torch.Tensor], caught: _Caught, batches: range | list[int]
) -> tuple[torch.Tensor | float, float]:
    """``(Σ‖attn'(x) − attn(x)‖², Σ‖attn(x)‖²)`` over ``batches`` (the first differentiable in
    ``params``; 0.0 for no batches)."""
    err: torch.Tensor | float = 0.0
    tot = 0.0
    for b in batches:
        args, kwargs = caught.calls[b]
        y = _output(torch.func.functional_call(module, params, args, kwargs))
        t = caught.outputs[b]
        err = err + (y - t).pow(2).sum()
        tot += float(t.pow(2).sum())
    return err, tot


def _relative_error(
    module: torch.nn.Module, params: dict[str, torch.Tensor], caught: _Caught, batches: range | list[int]
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
    caught: _Caught,
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
    moments), which keeps the weights in range. Returns None when the module has no separate
    output projection (BERT's lives outside its attention module).
    """
    suffix = _output_weight(unit, blocks)
    if suffix is None:
        return None
    proj = module.get_submodule(suffix[: -len(".weight")])
    b = blocks[suffix]["o"]  # [H, d, hidden]
    width = b.shape[0] * b.shape[1]
    zz = torch.zeros(width, width, dtype=torch.float64)
    zr = torch.zeros(width, b.shape[2], dtype=torch.float64)
    seen: list[torch.Tensor] = []
    hook = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            params = pack_params(unit, blocks, config)
            for k in range(len(caught.calls)) if batches is None else batches:
                args, kwargs = caught.calls[k]
                seen.clear()
                y = _output(torch.func.functional_call(module, params, args, kwargs))
                if len(seen) != 1 or seen[0].shape[-1] != width:
                    return None  # not one plain projection of the concatenated heads
                z = seen[0].reshape(-1, width).double()
                zz += z.T @ z
                zr += z.T @ (caught.outputs[k] - y).reshape(-1, b.shape[2]).double()
    finally:
        hook.remove()
    lam = ridge * float(zz.diagonal().mean()) + 1e-12
    zz.diagonal().add_(lam)
    delta = torch.linalg.solve(zz, zr).to(b.dtype)  # [H*d, hidden]: minimises ‖z Δ − r‖² + λ‖Δ‖²
    out = {s: dict(p) for s, p in blocks.items()}
    out[suffix] = {"o": (b.detach() + delta.view_as(b))}
    return out


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (faster than float32); the layer
    walk runs on the CPU, so other devices answer False."""
    if device.type == "cpu":
        # oneDNN's bf16 kernels need AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower.
        # torch exposes the check only as an operator; without it, assume emulation (float32 then).
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(torch.backends.mkldnn.is_available() and check is not None and check())
    return False


def _split(n: int, share: float, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Calibration batch indices ``(train, held_out)``: a random ``share`` held out (at least one
    batch when there are two or more and ``share`` > 0; none otherwise, then training batches judge)."""
    k = 0 if n < 2 or share <= 0 else max(1, round(n * share))
    perm = torch.randperm(n, generator=gen).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def refine_module(
    module: torch.nn.Module,
    unit: ModuleTensors,
    start: HeadBlocks,
    caught: _Caught,
    config: dict[str, Any],
    spec: RefineSpec,
) -> tuple[HeadBlocks, ModuleReport]:
    """Train ``start``'s head blocks so ``module`` (the converted attention) reproduces ``caught``'s
    outputs; returns the better of the trained and the starting blocks, and a report.

    A share of the calibration batches (``spec.validation``) is held out: it decides the early stop,
    which of the weights seen is kept, and whether refinement is kept at all; the report's errors are
    over every batch."""
    t0 = time.perf_counter()
    n = len(caught.calls)
    gen = torch.Generator().manual_seed(0)
    train, held = _split(n, spec.validation, gen)
    judge = held or train
    budget = min(spec.steps, max(1, math.ceil(spec.max_epochs * len(train))))

    # The blocks arrive in the checkpoint's dtype (bf16, fp16); the module computes in float32.
    start32 = {s: {r: t.detach().float() for r, t in p.items()} for s, p in start.items()}
    width = max((t.shape[-1] for p in start32.values() for t in p.values() if t.dim() >= 3), default=0)
    device = caught.outputs[0].device if caught.outputs else torch.device("cpu")
    # Below a few hundred wide the casts cost more than bf16 saves (twice the time at width 128).
    fast = spec.autocast and width >= AUTOCAST_MIN_WIDTH and bf16_native(device)

    def terms(b: HeadBlocks, batches: list[int]) -> tuple[float, float]:
        with torch.no_grad():
            err, tot = _error_terms(module, pack_params(unit, b, config), caught, batches)
        return float(err), tot

    def error(b: HeadBlocks, batches: list[int]) -> float:
        err, tot = terms(b, batches)
        return err / max(tot, 1e-30)

    def fit(lr: float, floor: float) -> tuple[HeadBlocks | None, float, int, bool]:
        """Adam from ``start`` at peak step ``lr``: ``(best weights seen, or None if none beat
        ``floor`` on the held-out batches; their held-out error; steps; whether the first check
        found the held-out error above the start's)``."""
        blocks = {s: {r: t.clone().requires_grad_(True) for r, t in p.items()} for s, p in start32.items()}
        leaves = [t for p in blocks.values() for t in p.values()]
        # Adam moves each weight by about ``lr`` per step whatever its scale: give each tensor a step
        # relative to its own RMS, so one setting suits models whose weights differ in scale. A short
        # second-moment memory (0.95) suits a run of a few hundred steps.
        scales = [float(t.detach().pow(2).mean().sqrt().clamp_min(1e-8)) for t in leaves]
        opt = torch.optim.Adam(
            [{"params": [t], "scale": sc} for t, sc in zip(leaves, scales, strict=True)],
            lr=lr,
            betas=(0.9, 0.95),
        )
        best: HeadBlocks | None = None
        best_err, order, stale, steps = floor, [], 0, 0
        anneal: tuple[int, float] | None = None  # (first step, step size) of the final anneal
        for step in range(budget):
            if anneal is not None:  # linear decay to zero over one check interval, then a last check
                now = anneal[1] * (1 - (step - anneal[0]) / spec.eval_every)
            else:  # warm-up, then cosine decay to 10% of the peak over the whole budget
                warm = min(1.0, (step + 1) / max(spec.warmup, 1))
                now = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / budget)))
            for group in opt.param_groups:
                group["lr"] = now * group["scale"]
            if not order:
                order = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                loss = _relative_error(module, pack_params(unit, blocks, config), caught, [order.pop()])
            if not math.isfinite(loss.item()):
                return best, best_err, steps, best is None  # diverged
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps = step + 1
            annealed = anneal is not None and steps - anneal[0] == spec.eval_every
            if steps % spec.eval_every and steps != budget and not annealed:
                continue
            # Held-out check: keep the best weights seen; stop after ``patience`` checks without a
            # ``min_gain`` gain (the module has stopped learning the function, or has started to fit the text).
            current = {s: {r: t.detach().clone() for r, t in p.items()} for s, p in blocks.items()}
            e = error(current, judge)
            if best is None and e >= floor and steps == min(spec.eval_every, budget):
                return None, floor, steps, True  # worse than the start at the first check
            stale = stale + 1 if e > (1 - spec.min_gain) * best_err else 0
            if e < best_err:
                best, best_err = current, e
            if annealed or (stale >= spec.patience and not spec.anneal):
                break
            if stale >= spec.patience and anneal is None:
                # Stopping at a step size near its peak leaves the weights noisy: decay it to zero
                # first (what a schedule that ends there does), keeping the best weights either way.
                anneal = (steps, now)
        return best, best_err, steps, False

    # The error over all batches is the judged batches' plus the rest's: each batch runs once, and the
    # targets' norms (the denominators) do not change with the weights.
    judged = set(judge)
    rest = [k for k in range(n) if k not in judged]
    judged_err, judged_tot = terms(start32, judge)
    rest_err, rest_tot = terms(start32, rest)
    judged_tot, whole_tot = max(judged_tot, 1e-30), max(judged_tot + rest_tot, 1e-30)
    before_judged, before = judged_err / judged_tot, (judged_err + rest_err) / whole_tot
    best, best_judged = start, before_judged
    lr = spec.lr * min(1.0, math.sqrt(spec.reference_width / width)) if width else spec.lr
    steps, best_lr, backoffs = 0, math.nan, 0
    for attempt in range(spec.backoffs + 1):
        found, err, done, failed = fit(lr, before_judged)
        steps += done
        if found is not None:
            best, best_judged, best_lr, backoffs = found, err, lr, attempt
        # The step size suits most models, not all: when the first check finds the held-out error
        # above the start's, start over with a third of it.
        if not failed:
            break
        lr /= 3
    if spec.solve_output and best is not start:
        solved = solve_output(module, unit, best, caught, config, batches=train)
        if solved is not None:
            e = error(solved, judge)
            if e < best_judged:
                best, best_judged = solved, e
    after = (best_judged * judged_tot + terms(best, rest)[0]) / whole_tot if best is not start else before
    kept = best is not start and best_judged < before_judged and after < before
    out = best if kept else start
    report = ModuleReport(
        unit.name,
        before,
        after if kept else before,
        steps,
        time.perf_counter() - t0,
        kept,
        best_lr if kept else math.nan,
        backoffs if kept else 0,
        fast,
    )
    return out, report


def refine_layers(
    src: Source,
    tokens: torch.Tensor,
    num_kv_heads: int,
    spec: RefineSpec,
    *,
    plan: Callable[[ModuleMoments], HeadBlocks],
    store: BlockStore,
    progress: bool = True,
) -> list[ModuleReport]:
    """Walk the layers: catch each converted module's inputs and outputs on the converted prefix's
    hidden states, ``plan`` it (closed-form fit from those inputs' moments; returns its merged head
    blocks), refine, :meth:`BlockStore.put` the result, and run the converted layer on."""
    from tqdm.auto import tqdm

    arch = get_architecture(src.config)
    hkv = arch.converted_dims(src.config).num_kv_heads
    # The original runs through the same class as the converted model (for families without
    # native GQA, ours at Hkv = H computes exactly the stock model), so both sides take the same
    # arguments and the converted module can be called with what the original one received.
    walk = LayerWalk(src, tokens, batch_size=spec.batch_size, config=arch.output_config(src.config, hkv))
    conv_model, _, _ = _skeleton(arch.output_config(src.config, num_kv_heads), src)
    conv_modules = dict(conv_model.named_modules())
    original = [s.clone() for s in walk.states] if spec.target == "original" else None
    reports: list[ModuleReport] = []
    bar = tqdm(total=len(walk.layers), desc="merging + refining", unit="layer", disable=not progress)
    for i in range(len(walk.layers)):
        layer = walk.load_layer(i)
        caught = _catch_attention(walk, i, layer, walk.states)
        if original is not None:  # targets from the original model's own stream, which moves on
            for ckpt, c in _catch_attention(walk, i, layer, original, full=True).items():
                caught[ckpt].outputs = c.outputs
        layer.to("meta")
        overrides: dict[str, torch.Tensor] = {}
        starts: dict[str, HeadBlocks] = {}
        for mname, _mod, ckpt in walk.attention[i]:
            mom = caught[ckpt].moments.moments(ckpt, walk.converted[ckpt].has_key_norm)
            starts[ckpt] = plan(mom)
            del mom
            packed = pack_params(walk.converted[ckpt], starts[ckpt], src.config)
            overrides.update({f"{mname}.{k}": v for k, v in packed.items()})
        # Only the attention modules are needed while refining; the rest of the converted layer (its
        # MLP: most of its weights) is loaded after, to run the layer on.
        attn_names = [
            f"{mname}.{n}"
            for mname, _mod, _ckpt in walk.attention[i]
            for n, _ in conv_modules[mname].named_parameters()
        ]
        walk.load_params(conv_model, attn_names, overrides)
        del overrides, packed
        for mname, _mod, ckpt in walk.attention[i]:
            unit = walk.converted[ckpt]
            if spec.steps:
                blocks, report = refine_module(
                    conv_modules[mname], unit, starts[ckpt], caught[ckpt], src.config, spec
                )
            else:
                blocks, report = starts[ckpt], ModuleReport(ckpt, math.nan, math.nan, 0, 0.0, False)
            reports.append(report)
            dtypes = {s: {r: t.dtype for r, t in p.items()} for s, p in starts[ckpt].items()}
            store.put(ckpt, blocks, dtypes)
            refined = {f"{mname}.{k}": v for k, v in pack_params(unit, blocks, src.config).items()}
            walk.load_params(conv_model, list(refined), refined)
            del blocks, refined
            logger.debug(
                "%s: relative attention error %.4f -> %.4f in %d steps (%.1fs)%s",
                ckpt,
                report.error_before,
                report.error_after,
                report.steps,
                report.seconds,
                "" if report.kept else " (not kept)",
            )
        del caught, starts
        conv_layer = walk.load_layer(i, conv_model, skip=set(attn_names))
        for b in range(len(walk.states)):
            walk.states[b] = walk.run(conv_layer, b, walk.states[b])
        conv_layer.to("meta")
        release_free_memory()
        bar.update(1)
        if reports and not math.isnan(reports[-1].error_after):
            bar.set_postfix(err=f"{reports[-1].error_before:.3f}→{reports[-1].error_after:.3f}")
    bar.close()
    return reports


def _catch_attention(
    walk: LayerWalk, i: int, layer: torch.nn.Module, states: list[torch.Tensor], *, full: bool = False
) -> dict[str, _Caught]:
    """Run ``layer`` on every batch of ``states`` and catch what each of its converted attention
    modules receives and returns. Without ``full`` the layer stops after its last such module (the
    MLP's output is not needed); with ``full`` it runs whole and ``states`` are replaced by its outputs."""
    mods = walk.attention[i]
    caught = {ckpt: _Caught([], [], MomentAccumulator()) for _m, _mod, ckpt in mods}
    hooks = []
    for k, (_m, mod, ckpt) in enumerate(mods):

        def pre(_mod, args, kwargs, c=caught[ckpt]):
            if full:
                return  # only the outputs are wanted
            c.moments.hook(_mod, args, kwargs)
            c.calls.append((args, kwargs))

        def post(_mod, _args, _kwargs, out, c=caught[ckpt], last=k == len(mods) - 1):
            c.outputs.append(_output(out).detach())
            if last and not full:
                raise _Stop

        hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        for b in range(len(states)):
            with contextlib.suppress(_Stop):
                out = walk.run(layer, b, states[b])
                if full:
                    states[b] = out
    finally:
        for h in hooks:
            h.remove()
    return caught
