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

Device: everything runs on one ``device`` (``device.py``): the layer at work, the closed-form fit
and the training; the activations stay there when they fit its budget, else in (pinned) host memory.

Layout: this module walks the layers; ``trainer.py`` trains one module; ``refine_spec.py`` holds
the budget and the report; ``blockstore.py`` the spilled results.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch

from ..architectures import get_architecture
from ..io.checkpoint import Source
from .blockstore import BlockStore, _remove_stale_stores
from .calibration import LayerWalk, ModuleMoments, MomentAccumulator, _skeleton, _Stop
from .device import CPU_AUTOCAST_MIN_WIDTH, bf16_native, use_autocast
from .memory import release_free_memory, reuse_large_blocks
from .methods import HeadBlocks
from .packed_attention import use_packed_attention
from .refine_spec import ModuleReport, RefineSpec
from .trainer import (
    Caught,
    _Caught,
    _error_terms,
    _relative_error,
    _split,
    output_of,
    pack_params,
    refine_module,
    solve_output,
)

logger = logging.getLogger(__name__)

AUTOCAST_MIN_WIDTH = CPU_AUTOCAST_MIN_WIDTH  # the name of earlier releases

__all__ = [
    "AUTOCAST_MIN_WIDTH",
    "BlockStore",
    "Caught",
    "ModuleReport",
    "RefineSpec",
    "_Caught",
    "_error_terms",
    "_relative_error",
    "_remove_stale_stores",
    "_split",
    "bf16_native",
    "pack_params",
    "refine_layers",
    "refine_module",
    "solve_output",
]


def refine_layers(
    src: Source,
    tokens: torch.Tensor,
    num_kv_heads: int,
    spec: RefineSpec,
    *,
    plan: Callable[[ModuleMoments], HeadBlocks],
    store: BlockStore,
    progress: bool = True,
    device: torch.device | None = None,
    max_device_memory: int | None = None,
) -> list[ModuleReport]:
    """Walk the layers: catch each converted module's inputs and outputs on the converted prefix's
    hidden states, ``plan`` it (closed-form fit from those inputs' moments; returns its merged head
    blocks), refine, :meth:`BlockStore.put` the result, and run the converted layer on.

    Runs on ``device`` (the CPU by default), one layer at a time; the activations stay there when
    they fit ``max_device_memory`` (default: most of a GPU's free memory), else in host memory."""
    from tqdm.auto import tqdm

    arch = get_architecture(src.config)
    hkv = arch.converted_dims(src.config).num_kv_heads
    # The original runs through the same class as the converted model (for families without
    # native GQA, ours at Hkv = H computes exactly the stock model), so both sides take the same
    # arguments and the converted module can be called with what the original one received.
    # Activations kept per calibration token: the layer's input states, each module's input and the
    # original's output (and the original model's own stream when the targets come from it).
    copies = 3 + (spec.target == "original")
    walk = LayerWalk(
        src,
        tokens,
        batch_size=spec.batch_size,
        config=arch.output_config(src.config, hkv),
        device=device,
        copies=copies,
        max_device_memory=max_device_memory,
    )
    conv_model, _, _ = _skeleton(arch.output_config(src.config, num_kv_heads), src, walk.device)
    # On a CPU the converted side (its training steps, checks and the layer run on) computes causal
    # attention with grouped heads packed into rows, in causal blocks (``packed_attention.py``):
    # the same function as SDPA's, about 0.7x its time. Families on our own attention classes keep theirs.
    if arch.native:
        use_packed_attention(conv_model, walk.device)
        use_packed_attention(walk.model, walk.device)
    # The converted layer's run on (the next layer's inputs) in bf16 autocast where training steps
    # are: these states are only the inputs the next module is fitted on, and its targets are still
    # computed from them in float32; the layer's matrix products are most of the walk's time.
    low = use_autocast(spec.autocast, walk.device, walk.states[0].shape[-1]) if walk.states else False
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
        reports += _refine_modules(walk, i, conv_model, starts, caught, src.config, spec, store, progress)
        del caught, starts
        conv_layer = walk.load_layer(i, conv_model, skip=set(attn_names))
        for b in range(len(walk.states)):
            walk.states[b] = walk.keep(walk.run(conv_layer, b, walk.states[b], bf16=low))
        conv_layer.to("meta")
        release_free_memory()
        bar.update(1)
        if reports and not math.isnan(reports[-1].error_after):
            bar.set_postfix(err=f"{reports[-1].error_before:.3f}→{reports[-1].error_after:.3f}")
    bar.close()
    return reports


def _refine_modules(
    walk: LayerWalk,
    i: int,
    conv_model: torch.nn.Module,
    starts: dict[str, HeadBlocks],
    caught: dict[str, Caught],
    config: dict,
    spec: RefineSpec,
    store: BlockStore,
    progress: bool,
) -> list[ModuleReport]:
    """Refine layer ``i``'s converted attention modules in turn from their closed-form ``starts``,
    :meth:`BlockStore.put` each result and load it into ``conv_model``; their reports."""
    modules = dict(conv_model.named_modules())
    reports: list[ModuleReport] = []
    for mname, _mod, ckpt in walk.attention[i]:
        unit = walk.converted[ckpt]
        if spec.steps:
            with reuse_large_blocks():
                blocks, report = refine_module(
                    modules[mname],
                    unit,
                    starts[ckpt],
                    caught[ckpt],
                    config,
                    spec,
                    progress=progress,
                )
        else:
            blocks, report = starts[ckpt], ModuleReport(ckpt, math.nan, math.nan, 0, 0.0, False)
        reports.append(report)
        dtypes = {s: {r: t.dtype for r, t in p.items()} for s, p in starts[ckpt].items()}
        store.put(ckpt, blocks, dtypes)
        refined = {f"{mname}.{k}": v for k, v in pack_params(unit, blocks, config).items()}
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
    return reports


def _catch_attention(
    walk: LayerWalk, i: int, layer: torch.nn.Module, states: list[torch.Tensor], *, full: bool = False
) -> dict[str, Caught]:
    """Run ``layer`` on every batch of ``states`` and catch what each of its converted attention
    modules receives and returns. Without ``full`` the layer stops after its last such module (the
    MLP's output is not needed); with ``full`` it runs whole and ``states`` are replaced by its outputs."""
    mods = walk.attention[i]
    caught = {ckpt: Caught([], [], MomentAccumulator(), walk.placement) for _m, _mod, ckpt in mods}
    hooks = []
    for k, (_m, mod, ckpt) in enumerate(mods):

        def pre(_mod, args, kwargs, c=caught[ckpt]):
            if full:
                return  # only the outputs are wanted
            c.moments.hook(_mod, args, kwargs)  # on the device, from the live input
            if args:  # the per-token input is kept where the activations live; the rest as it is
                c.calls.append(((walk.keep(args[0]), *args[1:]), kwargs))
            else:
                c.calls.append((args, {**kwargs, "hidden_states": walk.keep(kwargs["hidden_states"])}))

        def post(_mod, _args, _kwargs, out, c=caught[ckpt], last=k == len(mods) - 1):
            c.outputs.append(walk.keep(output_of(out).detach()))
            if last and not full:
                raise _Stop

        hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        for b in range(len(states)):
            with contextlib.suppress(_Stop):
                out = walk.run(layer, b, states[b])
                if full:
                    states[b] = walk.keep(out)
    finally:
        for h in hooks:
            h.remove()
    return caught
