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
   rate and an early stop when the loss stops falling; the result is kept only if its error over
   all calibration batches is below the closed-form start's, so refinement never makes a module
   worse;
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


@dataclass(frozen=True)
class RefineSpec:
    """How hard to train each merged attention module (the refinement budget)."""

    steps: int = 300  # most optimizer steps per attention module (early stop usually ends sooner)
    lr: float = 3e-2  # Adam's peak step, relative to each tensor's RMS (cosine decay to 10% of it)
    batch_size: int = 4  # calibration sequences per step
    patience: int = 20  # window of steps: stop when a window's mean loss is not 2% below the last one's
    warmup: int = 10  # linear learning-rate warm-up steps
    # What the converted module is trained to output: ``original``, the original module's output on
    # the original model's own hidden states (so a layer also makes up for the error of the layers
    # before it); ``same-input``, the original module's output on the converted prefix's states.
    target: str = "same-input"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"refinement steps must be >= 0, got {self.steps}")
        if self.lr <= 0 or self.batch_size <= 0:
            raise ValueError("refinement lr and batch size must be positive")
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


def _relative_error(
    module: torch.nn.Module, params: dict[str, torch.Tensor], caught: _Caught, batches: range | list[int]
) -> torch.Tensor:
    """``Σ‖attn'(x) − attn(x)‖² / Σ‖attn(x)‖²`` over ``batches`` (differentiable in ``params``)."""
    err = tot = 0.0
    for b in batches:
        args, kwargs = caught.calls[b]
        y = _output(torch.func.functional_call(module, params, args, kwargs))
        t = caught.outputs[b]
        err = err + (y - t).pow(2).sum()
        tot = tot + t.pow(2).sum()
    return err / max(float(tot), 1e-30)


def refine_module(
    module: torch.nn.Module,
    unit: ModuleTensors,
    start: HeadBlocks,
    caught: _Caught,
    config: dict[str, Any],
    spec: RefineSpec,
) -> tuple[HeadBlocks, ModuleReport]:
    """Train ``start``'s head blocks so ``module`` (the converted attention) reproduces ``caught``'s
    outputs; returns the better of the trained and the starting blocks, and a report."""
    t0 = time.perf_counter()
    blocks = {
        s: {r: t.detach().float().clone().requires_grad_(True) for r, t in p.items()}
        for s, p in start.items()
    }
    leaves = [t for p in blocks.values() for t in p.values()]
    n = len(caught.calls)
    with torch.no_grad():
        before = float(_relative_error(module, pack_params(unit, blocks, config), caught, range(n)))
    # Adam moves each weight by about ``lr`` per step whatever its scale: give each tensor a step
    # relative to its own RMS, so one setting suits models whose weights differ in scale.
    scales = [float(t.detach().pow(2).mean().sqrt().clamp_min(1e-8)) for t in leaves]
    opt = torch.optim.Adam(
        [{"params": [t], "scale": sc} for t, sc in zip(leaves, scales, strict=True)], lr=spec.lr
    )
    gen = torch.Generator().manual_seed(0)
    order: list[int] = []
    window: list[float] = []
    last_window = math.inf
    steps = 0
    for step in range(spec.steps):
        # Warm-up, then cosine decay to 10% of the peak: the early stop usually ends it first.
        warm = min(1.0, (step + 1) / max(spec.warmup, 1))
        lr = spec.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(spec.steps, 1))))
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"]
        if not order:
            order = torch.randperm(n, generator=gen).tolist()
        loss = _relative_error(module, pack_params(unit, blocks, config), caught, [order.pop()])
        if not math.isfinite(loss.item()):
            break  # diverged: the closed-form start is kept below
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps = step + 1
        # Early stop: minibatch losses are noisy, so compare means over windows of steps.
        window.append(loss.item())
        if len(window) == spec.patience:
            mean = sum(window) / len(window)
            if step >= spec.warmup and mean > 0.98 * last_window:
                break
            last_window, window = mean, []
    with torch.no_grad():
        after = float(_relative_error(module, pack_params(unit, blocks, config), caught, range(n)))
    kept = after < before
    out = {s: {r: t.detach() for r, t in p.items()} for s, p in blocks.items()} if kept else start
    report = ModuleReport(unit.name, before, after if kept else before, steps, time.perf_counter() - t0, kept)
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
        done = set(attn_names)
        conv_layer = walk.load_layer(i, conv_model, skip=done)
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
