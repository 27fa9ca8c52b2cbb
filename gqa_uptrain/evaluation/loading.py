"""Loading the model (and its tokenizer) that ``gqa-eval`` measures.

A model is a local folder or a Hub id, loaded by the package's one loader,
:func:`gqa_uptrain.io.models.load_pretrained` (which registers our GQA classes and decides
``trust_remote_code``); this module wraps the result in what the measurements take.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..io.models import load_pretrained, resolve_device, resolve_dtype

__all__ = ["LoadedModel", "load_model", "max_positions", "resolve_device", "resolve_dtype", "wrap_model"]

# Config fields that give the longest sequence a model's position encoding supports, in the order
# families use them (Llama & most: max_position_embeddings; GPT-2: n_positions; BLOOM/others: the rest).
_MAX_POSITION_FIELDS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "n_ctx",
    "seq_length",
)


@dataclass
class LoadedModel:
    """A model ready for measurement, with what the reports need to name it."""

    name: str
    model: Any  # transformers.PreTrainedModel, in eval mode, on ``device``
    tokenizer: Any | None  # None when the checkpoint ships no tokenizer
    device: torch.device
    dtype: torch.dtype


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's positions support, or None (relative positions, e.g. T5)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for field in _MAX_POSITION_FIELDS:
        value = getattr(cfg, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(
    source: str | os.PathLike,
    device: str = "auto",
    dtype: str = "auto",
    *,
    trust_remote_code: bool | None = None,
) -> LoadedModel:
    """Load a causal-LM or encoder-decoder checkpoint (and its tokenizer, if it has one) for evaluation.

    ``trust_remote_code``: None decides as every entry point does
    (:func:`gqa_uptrain.io.models.trust_remote_code_for`). Raises :class:`CheckpointError` with a
    one-line message when the checkpoint cannot be loaded.
    """
    loaded = load_pretrained(source, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return LoadedModel(
        name=str(source),
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        device=loaded.device,
        dtype=loaded.model.dtype,
    )


def wrap_model(model: Any, tokenizer: Any | None = None, name: str = "model") -> LoadedModel:
    """Wrap a model already in memory (e.g. in a script) so the measurement functions accept it."""
    model.eval()
    dev = next(model.parameters()).device
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=dev, dtype=model.dtype)
