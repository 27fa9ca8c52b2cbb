"""Uptraining stage: the recipe (typed config from YAML), and the accelerate training loop.

``gqa_uptrain.training.config`` is light (no torch, no ``datasets``); the loop loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "UptrainConfig": "config",
    "dump_recipe": "config",
    "load_recipe": "config",
    "UptrainResult": "loop",
    "uptrain": "loop",
}


def __getattr__(name: str) -> Any:
    """Import the named part on first use, so reading a recipe never loads torch."""
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
