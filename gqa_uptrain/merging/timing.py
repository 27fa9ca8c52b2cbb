"""How long refinement's steps take at a model's real width, measured on one synthetic layer.

``gqa-convert --dry-run`` plans a calibrated conversion before it runs: it needs the seconds one
refinement step of one converted attention module takes on the chosen device, and the memory that
takes. :func:`time_refinement_steps` builds the converted model's first decoder layer from the config
alone (on the meta device, then random weights on the device: no checkpoint is read), catches what
its attention module receives on one batch of random tokens, and times a few Adam steps of the same
code refinement runs (:meth:`~.trainer.ModuleTrainer.train_step`). Seconds, not minutes, even at
Llama-2-7B width on a CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from ..architectures import get_architecture
from .calibration import MomentAccumulator, _skeleton, _Stop
from .device import peak_device_bytes, resolve_device
from .memory import peak_rss_bytes, reuse_large_blocks
from .packed_attention import use_packed_attention
from .refine_spec import RefineSpec
from .trainer import Caught, ModuleTrainer, output_of

# A step shorter than this gets more warm-up and more timed steps (see time_refinement_steps).
SHORT_STEP_SECONDS = 0.5


@dataclass(frozen=True)
class StepTiming:
    """What :func:`time_refinement_steps` measured."""

    seconds_per_step: float  # one Adam step of one converted attention module on one batch
    steps: int  # steps timed (after the warm-up)
    layer_forward_seconds: float  # one forward pass of the whole decoder layer on one batch
    peak_device_bytes: int | None  # CUDA peak allocated while timing (None on the CPU)
    peak_host_bytes: int  # the process's peak resident memory so far (VmHWM)
    bf16: bool  # the steps ran in bf16 autocast
    batch_tokens: int  # tokens per step (batch size × sequence length)


def _minimal_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with one decoder layer and a tiny vocabulary: the layer is the real width."""
    out = dict(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in out:
            out[key] = 1
    for key in ("vocab_size",):
        if key in out:
            out[key] = 256
    out.pop("layer_types", None)  # per-layer lists sized for the full depth
    return out


def time_refinement_steps(
    config: dict[str, Any],
    num_kv_heads: int,
    device: str | torch.device | None = None,
    seq_len: int = 512,
    *,
    spec: RefineSpec | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    seed: int = 0,
) -> StepTiming:
    """Time ``steps`` refinement steps (after ``warmup``) of the first converted attention module of
    a checkpoint with ``config`` (its ``config.json`` as a dict) converted to ``num_kv_heads``, on
    ``device``, on batches of ``spec.batch_size`` random sequences of ``seq_len`` tokens.

    By default the counts follow the step's size: one warm-up step, then, where it took under
    :data:`SHORT_STEP_SECONDS`, two more and 5 timed steps (a short step's first few carry the
    allocator's and the kernels' first-call costs: 3 steps after one warm-up read 68 ms at SmolLM2's
    width where a run's steps take 58), else 3 timed steps (a 7B-width step on a CPU is seconds).

    Nothing is read from a checkpoint: the layer is built from the config with random weights
    (the time of a step does not depend on the values). Also times one forward pass of the decoder
    layer (what calibration and the layer walk cost per batch) and reports the peak memory seen.
    """
    spec = spec or RefineSpec()
    dev = resolve_device(device)
    arch = get_architecture(config)
    small = _minimal_config(config)
    out_config = arch.output_config(small, num_kv_heads)
    gen = torch.Generator().manual_seed(seed)
    model, _, layers = _skeleton(out_config, SimpleNamespace(config=config), dev)  # type: ignore[arg-type]
    from accelerate.utils import set_module_tensor_to_device

    for name, p in list(model.named_parameters()):
        value = torch.randn(p.shape, generator=gen) * 0.02 if p.dim() > 1 else torch.ones(p.shape)
        set_module_tensor_to_device(model, name, dev, value=value)
    if arch.native:  # as refinement runs it: on a CPU, causal attention with grouped heads packed into rows
        use_packed_attention(model, dev)
    units = arch.attention_modules([n for n, _ in model.named_parameters()], converted_only=True)
    if not units:
        raise ValueError(f"{config.get('model_type')!r}: no converted attention module in the config's layer")
    unit = next(iter(units.values()))
    module = model.get_submodule(unit.name)
    dims = unit.module.dims(out_config)
    named = dict(model.named_parameters())
    start = {
        s: unit.module.tensors[s].unpack(torch.cat([named[n].detach().cpu() for n in names]), dims)
        for s, names in unit.tensors.items()
    }

    # Catch the module's arguments on two batches (one trains, one is "held out").
    batch = min(spec.batch_size, 4096)
    vocab = int(getattr(model.config, "vocab_size", 256) or 256)
    tokens = torch.randint(0, vocab, (2, batch, seq_len), generator=gen)
    caught = Caught([], [], MomentAccumulator())

    def pre(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        caught.calls.append((args, kwargs))

    def post(_m: torch.nn.Module, _a: tuple, _k: dict, out: Any) -> None:
        caught.outputs.append(output_of(out).detach() * 1.01)
        raise _Stop

    hooks = [
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post, with_kwargs=True),
    ]
    layer_args: list[tuple[tuple, dict]] = []
    hooks.append(
        layers[0].register_forward_pre_hook(lambda _m, a, k: layer_args.append((a, k)), with_kwargs=True)
    )
    try:
        with torch.no_grad():
            for ids in tokens:
                with contextlib.suppress(_Stop):
                    model(input_ids=ids.to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    # One forward pass of the whole decoder layer on one batch.
    args, kwargs = layer_args[0]
    with torch.no_grad():
        layers[0](*args, **kwargs)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        layers[0](*args, **kwargs)
        _sync(dev)
    layer_seconds = time.perf_counter() - t0

    trainer = ModuleTrainer(module, unit, start, caught, out_config, spec)
    blocks = {
        s: {r: t.clone().requires_grad_(True) for r, t in p.items()} for s, p in trainer.start32.items()
    }
    opt = trainer.optimizer(blocks, spec.lr)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    per_step, steps = _time_steps(
        lambda: trainer.train_step(blocks, opt, 1e-3, trainer.train[0]), dev, steps, warmup
    )
    return StepTiming(
        seconds_per_step=per_step,
        steps=steps,
        layer_forward_seconds=layer_seconds,
        peak_device_bytes=peak_device_bytes(dev),
        peak_host_bytes=peak_rss_bytes(),
        bf16=trainer.bf16,
        batch_tokens=batch * seq_len,
    )


def _time_steps(
    step: Callable[[], object], dev: torch.device, steps: int | None, warmup: int | None
) -> tuple[float, int]:
    """Seconds per ``step`` call and how many calls were timed, after the warm-up (see
    :func:`time_refinement_steps` for the default counts), with the working tensors reused from the
    heap as refinement does while a module trains."""
    with reuse_large_blocks():
        t0 = time.perf_counter()
        step()
        _sync(dev)
        short = time.perf_counter() - t0 < SHORT_STEP_SECONDS
        for _ in range((warmup if warmup is not None else 3 if short else 1) - 1):
            step()
        steps = steps if steps is not None else 5 if short else 3
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(dev)
        return (time.perf_counter() - t0) / max(steps, 1), steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
