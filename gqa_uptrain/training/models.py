"""The models of a run: the checkpoint's dtype and which parameters train.

Student and teacher load through the one loader of our entry points
(:func:`gqa_uptrain.io.models.load_pretrained`, see :mod:`.setup`), which checks the path and
decides ``trust_remote_code`` as gqa-eval does.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..architectures.trainable import attention_parameter_kinds, trained_by
from ..errors import ConfigError

logger = logging.getLogger(__name__)


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _as_dtype(value: Any) -> torch.dtype | None:
    """A config's dtype entry (``"bfloat16"``, ``"torch.float16"``) as a floating torch dtype."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def _header_dtype(weights: Path) -> torch.dtype | None:
    """The dtype of the first floating tensor in a safetensors file's header (no tensor is read)."""
    with open(weights, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # header length, then the JSON header
        header = json.loads(f.read(n))
    for name, info in header.items():
        if name != "__metadata__" and info.get("dtype") in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[info["dtype"]]
    return None


def checkpoint_dtype(path: str, revision: str | None = None) -> torch.dtype:
    """The dtype a checkpoint is stored in, read from its files before the model is loaded.

    ``config.json``'s ``dtype`` (or the legacy ``torch_dtype``), else the first floating tensor in
    the safetensors header, else float32. It has to be read first: loading in float32 (the master
    weights) rewrites ``model.config.dtype`` to float32.
    """
    from transformers.utils import cached_file

    def fetch(name: str) -> Path | None:
        with contextlib.suppress(OSError, ValueError):
            found = cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False)
            return Path(found) if found else None
        return None

    with contextlib.suppress(OSError, ValueError, TypeError):
        cfg_file = fetch("config.json")
        if cfg_file is not None:
            raw = json.loads(cfg_file.read_text())
            found = _as_dtype(raw.get("dtype")) or _as_dtype(raw.get("torch_dtype"))
            if found is not None:
                return found
        weights = fetch("model.safetensors")
        if weights is None and (index := fetch("model.safetensors.index.json")) is not None:
            first_shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
            weights = fetch(first_shard)
        if weights is not None and (found := _header_dtype(weights)) is not None:
            return found
    logger.warning("could not read the dtype of %s; the uptrained model is saved in float32", path)
    return torch.float32


def select_trainable(model: torch.nn.Module, mode: str) -> list[str]:
    """Set ``requires_grad`` for freeze ``mode`` and return the names of trainable parameters.

    ``attention``: parameters inside attention modules; ``kv``: only K/V projections (and K norms).
    Which names those are is the model family's (:mod:`gqa_uptrain.architectures.trainable`). A
    fused QKV parameter cannot be split for autograd, so under ``kv`` it trains whole.
    """
    if mode == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    named = list(model.named_parameters())
    kinds = attention_parameter_kinds(getattr(model.config, "model_type", None), (n for n, _ in named))
    chosen: list[str] = []
    fused: list[str] = []
    for name, p in named:
        keep = trained_by(mode, kinds.get(name))  # type: ignore[arg-type]
        p.requires_grad_(keep)
        if keep:
            chosen.append(name)
            if mode == "kv" and kinds[name] == "fused_qkv":
                fused.append(name)
    if not chosen:
        sample = ", ".join(n for n, _ in named[:6])
        raise ConfigError(
            f"recipe key freeze.mode: {mode!r} matches no parameter of this model (names like {sample}); use freeze.mode=none"
        )
    if fused:
        logger.warning(
            "freeze.mode=kv: %d fused QKV tensor(s) (e.g. %s) train whole, query rows included",
            len(fused),
            fused[0],
        )
    return chosen
