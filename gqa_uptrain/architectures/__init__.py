"""Model families the converter supports, each described as data (see ``base.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from .base import (
    NO_ROPE,
    PARTIAL_ROPE,
    Architecture,
    AttentionDims,
    AttentionModule,
    FusedParam,
    ModuleTensors,
    Norm,
    Packing,
    RemoteCode,
    Rotary,
    heads,
)
from .custom import CUSTOM
from .native import NATIVE

ARCHITECTURES: tuple[Architecture, ...] = NATIVE + CUSTOM

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "AttentionDims",
    "AttentionModule",
    "FusedParam",
    "ModuleTensors",
    "NO_ROPE",
    "Norm",
    "PARTIAL_ROPE",
    "Packing",
    "RemoteCode",
    "Rotary",
    "heads",
    "get_architecture",
    "supported_model_types",
]


def supported_model_types() -> list[str]:
    """Every ``model_type`` the converter accepts."""
    return sorted(t for a in ARCHITECTURES for t in a.model_types)


def get_architecture(config: Mapping[str, Any]) -> Architecture:
    """The family of a checkpoint, from its ``config.json``; a clear error if unsupported."""
    model_type = config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise CheckpointError(
        f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported_model_types())}"
    )
