"""Deployment precision: round a model's weights as a bf16 or a llama.cpp Q8_0 file would store them.

A converted model is only useful if it survives the precision it is deployed in. :func:`round_trip`
rounds, in place, the weights that llama.cpp's converter (``convert_hf_to_gguf.py``) writes in the
target type, and puts them back in the model's own dtype, so the rounded model can be measured with
the usual float code (perplexity, generation):

- **which tensors**: the weight of every ``torch.nn.Linear`` and transformers ``Conv1D``, the input
  token embedding and the output embedding (``lm_head``). With ``--outtype q8_0`` (or ``bf16``)
  llama.cpp stores ``token_embd`` and ``output`` in that type too, so leaving them out would
  understate the damage. Tied input/output embeddings are rounded once. Left in their own precision,
  as llama.cpp leaves them in F32: 1-D tensors (norms, biases), position and token-type embeddings,
  and any other parameter that is not one of the above.
- **bf16**: each weight through ``torch.bfloat16`` and back (round to nearest even).
- **q8_0**: llama.cpp's Q8_0, via ``gguf.quants.quantize`` / ``dequantize`` (numpy, bit-exact with
  ``ggml-quants.c``): blocks of 32 consecutive values along the *input* dimension (a ``Linear``'s
  rows; a ``Conv1D``'s weight is ``[in, out]`` and is transposed first, as llama.cpp's GPT-2
  converter does), each stored as int8 ``round(x / d)`` (half away from zero) with one float16 scale
  ``d = max|x| / 127`` per block. A weight whose rows are not a multiple of 32 long cannot be Q8_0;
  llama.cpp's converter writes it as F16 instead. Here it is **left as it is** and listed in
  :attr:`RoundTripReport.skipped`, so a reader knows which tensors the figure does not cover.

Only weights are rounded: activations stay in the model's dtype (float32 on CPU), so this isolates
what the stored weights lose, the part that a conversion's weight magnitudes can make worse.
:func:`weight_stats` reports those magnitudes (the largest ``|w|`` of the attention projections and of
all linear weights): a fold that blows up weight scale shows there first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)

RoundTripFormat = Literal["bf16", "q8_0"]
FORMATS: tuple[str, ...] = ("bf16", "q8_0")
Q8_0_BLOCK = 32  # values per Q8_0 block (ggml's QK8_0)


@dataclass
class RoundTripReport:
    """What :func:`round_trip` did to a model."""

    fmt: str
    rounded: list[str] = field(default_factory=list)
    """Parameter names rounded (a tied tensor under its first name)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Parameter name -> why it was left as it was (rows not a multiple of the Q8_0 block)."""
    elements: int = 0
    """Weights rounded."""
    max_abs_change: float = 0.0
    """Largest ``|w_rounded - w|`` over the rounded weights."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return asdict(self)

    def summary(self) -> str:
        """One line: how many tensors were rounded, and which were left."""
        line = f"{self.fmt}: {len(self.rounded)} weight tensors ({self.elements:,} values) rounded"
        if self.skipped:
            names = ", ".join(sorted(self.skipped)[:3]) + (", ..." if len(self.skipped) > 3 else "")
            line += f"; {len(self.skipped)} left as they are (rows not a multiple of {Q8_0_BLOCK}: {names})"
        return line


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency; be tolerant of moves
        return None
    return Conv1D


def _targets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, bool]]:
    """``(name, weight, transposed)`` of every weight a llama.cpp file stores in the target type.

    ``transposed``: the weight is ``[in, out]`` (``Conv1D``), so its blocks run down its columns.
    """
    conv1d = _conv1d_class()
    embeddings: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            module = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            module = None
        if module is not None:
            embeddings.add(id(module))
    out: list[tuple[str, torch.nn.Parameter, bool]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        is_conv1d = conv1d is not None and isinstance(module, conv1d)
        if not (isinstance(module, torch.nn.Linear) or is_conv1d or id(module) in embeddings):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or id(weight) in seen:
            continue
        seen.add(id(weight))  # tied embeddings: one tensor, rounded once
        out.append((f"{name}.weight" if name else "weight", weight, is_conv1d))
    return out


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    """``w`` (float, rows a multiple of 32 long) through llama.cpp's Q8_0 and back, as float32."""
    import gguf  # lazy: only this format needs it

    qtype = gguf.GGMLQuantizationType.Q8_0
    a = w.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    back = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
    return torch.from_numpy(back.reshape(a.shape))


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown round-trip format {fmt!r}; choose one of {', '.join(FORMATS)}")


@torch.no_grad()
def round_trip(model: torch.nn.Module, fmt: RoundTripFormat) -> RoundTripReport:
    """Round ``model``'s linear and embedding weights in place through ``fmt`` (``bf16`` or ``q8_0``).

    See the module docstring for which tensors and how. The weights keep their dtype and device.
    Raises :class:`ConfigError` for an unknown format.
    """
    _check_format(fmt)
    report = RoundTripReport(fmt=fmt)
    for name, weight, transposed in _targets(model):
        w = weight.T if transposed else weight  # blocks run along the input dimension
        if fmt == "q8_0":
            if w.shape[-1] % Q8_0_BLOCK:
                report.skipped[name] = f"rows of {w.shape[-1]} values, not a multiple of {Q8_0_BLOCK}"
                continue
            new = _q8_0(w)
        else:
            new = w.to(torch.bfloat16)
        new = new.to(device=w.device, dtype=w.dtype)
        report.max_abs_change = max(report.max_abs_change, float((new - w).abs().max()) if w.numel() else 0.0)
        w.copy_(new)
        report.rounded.append(name)
        report.elements += w.numel()
    if report.skipped:
        logger.warning(
            "%s round trip: %d weight(s) left as they are (rows not a multiple of %d; llama.cpp "
            "writes them as F16): %s",
            fmt,
            len(report.skipped),
            Q8_0_BLOCK,
            ", ".join(report.skipped),
        )
    logger.info("%s", report.summary())
    return report


@contextmanager
def rounded(model: torch.nn.Module, fmt: RoundTripFormat) -> Iterator[RoundTripReport]:
    """Round ``model`` through ``fmt`` for the body of a ``with`` block, then restore its weights.

    Keeps a copy of each rounded weight meanwhile (the linear and embedding weights: most of the
    model), so measuring a model in several precisions needs no reload.
    """
    _check_format(fmt)
    saved = [(weight, weight.detach().clone()) for _, weight, _ in _targets(model)]
    try:
        yield round_trip(model, fmt)
    finally:
        with torch.no_grad():
            for weight, copy in saved:
                weight.copy_(copy)


def _attention_weight_ids(model: torch.nn.Module) -> set[int] | None:
    """Ids of the attention projections' 2-D weights, by the family's own tensor layout; None if unknown."""
    from ..architectures import get_architecture
    from ..errors import GQAError

    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        arch = get_architecture(config.to_dict())
    except GQAError:
        return None
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = arch.attention_modules(params)
    names = {n for mod in modules.values() for group in mod.tensors.values() for n in group}
    return {id(p) for n, p in params.items() if n in names and p.dim() == 2}


@torch.no_grad()
def weight_stats(model: torch.nn.Module) -> dict[str, Any]:
    """Largest weight magnitudes: ``attention_max_abs`` (Q/K/V/O projections, ``None`` when the family
    is not one the converter knows), ``linear_max_abs`` (every Linear/Conv1D weight, a tied output
    embedding included) and ``embedding_max_abs`` (input/output embeddings that are not Linear
    layers), with the name of the tensor that holds each (``*_argmax``) and tensor counts.
    """
    conv1d = _conv1d_class()
    attention = _attention_weight_ids(model)
    linear_ids = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) or (conv1d is not None and isinstance(m, conv1d))
    }
    stats: dict[str, Any] = {
        "attention_max_abs": None,
        "attention_tensors": 0,
        "linear_max_abs": None,
        "linear_tensors": 0,
        "embedding_max_abs": None,
        "attention_argmax": None,
        "linear_argmax": None,
        "embedding_argmax": None,
    }

    def bump(kind: str, value: float, name: str) -> None:
        if stats[f"{kind}_max_abs"] is None or value > stats[f"{kind}_max_abs"]:
            stats[f"{kind}_max_abs"], stats[f"{kind}_argmax"] = value, name

    for name, weight, _ in _targets(model):
        m = float(weight.detach().abs().max()) if weight.numel() else 0.0
        if id(weight) in linear_ids:
            bump("linear", m, name)
            stats["linear_tensors"] += 1
        else:
            bump("embedding", m, name)
        if attention is not None and id(weight) in attention:
            bump("attention", m, name)
            stats["attention_tensors"] += 1
    return stats
