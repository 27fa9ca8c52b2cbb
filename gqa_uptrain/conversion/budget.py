"""What the calibrated path will cost, known before it runs: peak host and device memory from the
checkpoint's shapes, and the time from a few timed refinement steps at the real width.

``gqa-convert --dry-run --calibration TEXT`` prints it (:func:`estimate_calibrated`), so a user
knows before a 70B conversion starts whether it fits and how long it takes.

The memory model follows the calibrated path phase by phase (``merging.calibration``,
``merging.aligned``, ``merging.refine``); its peak is the largest phase plus the process's own
footprint (Python, torch, transformers):

- catching layer 0's inputs: the embedding matrix (read in the checkpoint's dtype, then float32)
  and the calibration activations ``A = tokens x hidden x 4`` bytes;
- calibrating a layer: the layer in float32, ``A``, one forward batch's intermediates (attention
  scores, the MLP's hidden activations) and the float64 moment sums of its attention modules;
- the closed-form fit: the ``[hidden+1]^2`` float64 moments and their roots, the module's weights
  in float64;
- refining a module: ``A`` per copy the refinement keeps (the layer's input states, the module's
  inputs, the original's outputs), the converted module's weights with their gradients, Adam's two
  moments and the best and current copies, and one training batch's forward and backward
  intermediates.

Every term is an upper bound of what the code allocates (tests/test_dry_run_plan.py measures a real
conversion's peak against it); the time is an estimate, labelled as one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..io.tensors import TensorInfo, dtype_itemsize

F32, F64 = 4, 8

# The process before any weight: the interpreter, torch, transformers, tokenizers (measured 0.25-0.58
# GB RSS on Linux with the CPU wheel); a CUDA process also maps the CUDA libraries and its context.
BASE_HOST_BYTES = 550_000_000
BASE_HOST_CUDA_BYTES = 2_500_000_000
# What the allocator holds beyond the live tensors (fragmentation, the caching allocator's rounding).
SLACK = 1.15

# Work the closed-form fit does per module, in multiples of hidden^3 float64 operations (eigen
# decompositions and products of [hidden+1]^2 matrices), from its measured time at Llama-2-7B width
# (README, Benchmarks: about 25 s of the 35 s per layer on 2 cores).
FIT_WORK_PER_CUBE = 15.0

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class StepTiming:
    """Seconds measured for refinement's work at the real width (see :func:`estimate_calibrated`)."""

    step_seconds: float  # one Adam step of one attention module on one batch
    steps_timed: int
    what: str  # e.g. "3 refinement steps of one synthetic Llama layer, width 4096, on cuda:0"
    forward_seconds: float | None = None  # one decoder layer's forward on one batch, when timed
    peak_device_bytes: int | None = None  # what the timing itself used on the device


@dataclass
class CalibratedEstimate:
    """The calibrated path's cost, estimated from the shapes (memory) and a timing (time)."""

    device: str
    layers: int
    modules: int
    tokens: int
    seq_len: int
    refine_steps: int  # most Adam steps per module (the early stop may end sooner)
    host_peak_bytes: int
    device_peak_bytes: int | None  # None on the CPU (host memory is the device)
    activations_on_device: bool
    activation_bytes: int  # one copy of the calibration activations (tokens x hidden x 4)
    phases: dict[str, int] = field(default_factory=dict)  # bytes of each phase, base excluded
    seconds: float | None = None
    seconds_per_layer: float | None = None
    timing: StepTiming | None = None


@dataclass(frozen=True)
class _Shapes:
    hidden: int
    num_heads: int
    head_dim: int
    intermediate: int
    layers: int
    layer_params: int  # the largest decoder layer's parameters
    max_tensor_bytes: int  # the largest tensor as stored (a read buffer)
    embed_params: int
    embed_itemsize: int
    attn_params_before: int  # one converted attention module, before merging
    attn_params_after: int


def _shapes(config: dict[str, Any], infos: list[TensorInfo], plan: Any) -> _Shapes:
    """The sizes the memory model needs, from the tensor headers and the plan."""
    per_layer: dict[int, int] = {}
    outer: list[TensorInfo] = []
    for i in infos:
        m = _LAYER_INDEX.search(i.name)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + math.prod(i.shape)
        else:
            outer.append(i)
    embed = max(outer, key=lambda i: math.prod(i.shape), default=None)
    hidden = int(
        config.get("hidden_size")
        or config.get("n_embd")
        or config.get("d_model")
        or plan.num_heads * plan.head_dim
    )
    layers = len(per_layer) or 1
    modules = max(plan.converted_modules, 1)
    saved = plan.params_before - plan.params_after  # what merging removes, all modules together
    # One module's parameters: Q, K, V and O (biases and norms are small next to them).
    kv_before = plan.num_kv_heads_before * plan.head_dim * hidden
    attn_before = 2 * plan.num_heads * plan.head_dim * hidden + 2 * kv_before
    return _Shapes(
        hidden=hidden,
        num_heads=plan.num_heads,
        head_dim=plan.head_dim,
        intermediate=int(
            config.get("intermediate_size") or config.get("n_inner") or config.get("d_ff") or 4 * hidden
        ),
        layers=layers,
        layer_params=max(per_layer.values(), default=0),
        max_tensor_bytes=max((i.nbytes for i in infos), default=0),
        embed_params=math.prod(embed.shape) if embed is not None else 0,
        embed_itemsize=dtype_itemsize(embed.dtype) if embed is not None else F32,
        attn_params_before=attn_before,
        attn_params_after=max(attn_before - saved // modules, 0),
    )


def _forward_bytes(s: _Shapes, batch: int, seq_len: int) -> int:
    """One decoder layer's forward intermediates on ``batch`` sequences (float32): attention scores
    and their softmax (the eager path materialises them), the MLP's hidden activations, and the
    hidden-width tensors around them."""
    tokens = batch * seq_len
    scores = batch * s.num_heads * seq_len * seq_len * F32
    mlp = 3 * tokens * s.intermediate * F32
    around = 2 * tokens * s.hidden * F32
    return scores + mlp + around


def _fit_bytes(s: _Shapes) -> int:
    """The closed-form fit's float64 working set: moments, roots, the module's weights."""
    square = (s.hidden + 1) ** 2 * F64
    return 5 * square + 2 * s.attn_params_before * F64


def memory_phases(
    s: _Shapes,
    tokens: int,
    seq_len: int,
    *,
    refine: bool,
    batch_size: int = 8,
    refine_batch: int = 4,
    copies: int = 3,
) -> dict[str, int]:
    """Bytes each phase of the calibrated path holds at its peak (the process's base excluded)."""
    act = tokens * s.hidden * F32
    layer = s.layer_params * F32 + s.max_tensor_bytes
    moments = 2 * (s.hidden + 1) ** 2 * F64 + 3 * batch_size * seq_len * (s.hidden + 1) * F64
    phases = {
        "embeddings": s.embed_params * (F32 + s.embed_itemsize)
        + act
        + 2 * batch_size * seq_len * s.hidden * F32,
        # The moment hook's transient (the input in float64 and its product) comes before the MLP
        # runs: the two do not add up.
        "calibration": layer + act + max(_forward_bytes(s, batch_size, seq_len), moments),
        "fit": _fit_bytes(s) + (copies if refine else 1) * act,
        # One module's tensors as read and in float32 while its fit is applied.
        "streaming": _fit_bytes(s) + s.attn_params_before * F32,
    }
    if refine:
        module = s.attn_params_after * F32
        backward = 3 * _forward_bytes(s, refine_batch, seq_len) // 2
        phases["refinement"] = copies * act + 8 * module + backward + layer
    return phases


def estimate_calibrated(
    config: dict[str, Any],
    infos: list[TensorInfo],
    plan: Any,
    *,
    tokens: int,
    seq_len: int,
    refine_steps: int,
    device: str = "cpu",
    device_budget: int | None = None,
    timing: StepTiming | None = None,
    max_epochs: float = 20.0,
    refine_batch: int = 4,
    validation: float = 0.125,
    eval_every: int = 20,
) -> CalibratedEstimate:
    """The calibrated path's peak host and device memory for ``plan``, and its time from ``timing``.

    ``tokens`` and ``seq_len`` are the calibration budget (the tokens used are at most ``tokens``:
    an upper bound); ``refine_steps`` 0 means the closed-form fit only. On a CUDA ``device`` the
    activations are kept on the device when ``copies x A`` plus the largest phase fit
    ``device_budget`` (as the layer walk decides), else in host memory.
    """
    s = _shapes(config, infos, plan)
    seq_len = max(1, min(seq_len, tokens))
    refine = refine_steps > 0
    copies = 3 if refine else 1
    phases = memory_phases(s, tokens, seq_len, refine=refine, refine_batch=refine_batch, copies=copies)
    act = tokens * s.hidden * F32
    work = max(phases.values())
    on_gpu = device.startswith("cuda")
    if not on_gpu:
        host = BASE_HOST_BYTES + int(SLACK * work)
        dev, on_device = None, True
    else:
        without = work - copies * act  # the device's share when the activations stay on the host
        on_device = device_budget is None or work <= device_budget
        dev = int(SLACK * (work if on_device else without + act // max(1, tokens // (8 * seq_len))))
        # The host reads each tensor in the checkpoint's dtype and converts it to float32 first; it
        # keeps the activations when the device cannot.
        host_work = s.embed_params * (F32 + s.embed_itemsize) + 2 * s.max_tensor_bytes
        host = BASE_HOST_CUDA_BYTES + int(SLACK * (host_work + (0 if on_device else copies * act)))
    est = CalibratedEstimate(
        device=device,
        layers=s.layers,
        modules=plan.converted_modules,
        tokens=tokens,
        seq_len=seq_len,
        refine_steps=refine_steps,
        host_peak_bytes=host,
        device_peak_bytes=dev,
        activations_on_device=on_device,
        activation_bytes=act,
        phases=phases,
        timing=timing,
    )
    if timing is not None:
        est.seconds_per_layer = _seconds_per_layer(
            s, plan, tokens, seq_len, refine_steps, timing, max_epochs, refine_batch, validation, eval_every
        )
        est.seconds = est.seconds_per_layer * s.layers
    return est


def _seconds_per_layer(
    s: _Shapes,
    plan: Any,
    tokens: int,
    seq_len: int,
    refine_steps: int,
    timing: StepTiming,
    max_epochs: float,
    refine_batch: int,
    validation: float,
    eval_every: int,
) -> float:
    """One layer's time: its calibration forward passes, the fits, and refinement's steps (each Adam
    step timed; a held-out check or an error measurement costs about a third of a step per batch)."""
    blocks = max(1, tokens // seq_len)
    batches = max(1, math.ceil(blocks / refine_batch))
    held = max(1, round(batches * validation)) if validation else 0
    train = max(1, batches - held)
    modules = max(1, plan.converted_modules // s.layers)
    step = timing.step_seconds
    # A layer's forward on one batch: timed, or the attention step scaled by the layer's size (the
    # forward is about a third of a forward and backward).
    attn_params = max(1, s.attn_params_after)
    forward = timing.forward_seconds or step / 3 * max(1.0, s.layer_params / attn_params)
    forwards = 2 * batches * forward  # the original layer's pass and the converted one's
    fit = modules * FIT_WORK_PER_CUBE * s.hidden**3 / _FLOAT64_RATE
    if refine_steps <= 0:
        return forwards + fit
    budget = min(refine_steps, max(1, math.ceil(max_epochs * train)))
    checks = math.ceil(budget / eval_every) * held + 2 * batches  # held-out checks, errors before/after
    return forwards + fit + modules * (budget * step + checks * step / 3)


# Float64 work per second the fit's time is scaled by (2 CPU cores, measured; GPUs do the fit faster:
# the estimate is then an upper bound).
_FLOAT64_RATE = 40e9


def _seq_len(config: dict[str, Any], want: int) -> int:
    """The calibration block length a run would use (as ``merging.calibration`` caps it)."""
    limit = config.get("max_position_embeddings") or config.get("n_positions") or want
    window = config.get("sliding_window") or limit
    return int(min(want, limit, window))


def plan_calibrated(
    config: dict[str, Any],
    infos: list[TensorInfo],
    plan: Any,
    *,
    tokens: int,
    seq_len: int,
    refine_steps: int,
    device: str | None = None,
    max_device_memory: str | int | None = None,
    time_steps: bool = True,
) -> CalibratedEstimate:
    """:func:`estimate_calibrated` on the device a run would use (``auto``: the first GPU if any),
    with its memory budget, and the refinement step timed there when ``time_steps``."""
    from ..merging.device import device_budget, parse_memory, resolve_device

    dev = resolve_device(device)
    budget = device_budget(dev, parse_memory(max_device_memory)) if dev.type == "cuda" else None
    seq = _seq_len(config, seq_len)
    timing = time_refinement_steps(config, plan.num_kv_heads_after, dev, seq) if time_steps else None
    return estimate_calibrated(
        config,
        infos,
        plan,
        tokens=tokens,
        seq_len=seq,
        refine_steps=refine_steps,
        device=str(dev),
        device_budget=budget,
        timing=timing,
    )


def time_refinement_steps(config: dict[str, Any], num_kv_heads: int, device: Any, seq_len: int) -> StepTiming:
    """A few refinement steps of one synthetic layer of ``config`` at its real width, timed on ``device``
    (``merging.timing``: the refinement's own training step on random weights; no checkpoint read)."""
    from ..merging.timing import time_refinement_steps as timed

    t = timed(config, num_kv_heads, device, seq_len)
    return StepTiming(
        step_seconds=t.seconds_per_step,
        steps_timed=t.steps,
        what=f"{t.steps} timed refinement steps of one synthetic layer at width "
        f"{config.get('hidden_size') or config.get('n_embd') or config.get('d_model')} on {device}"
        + (" (bf16 autocast)" if t.bf16 else ""),
        forward_seconds=t.layer_forward_seconds,
        peak_device_bytes=t.peak_device_bytes,
    )
