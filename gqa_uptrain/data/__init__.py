"""Data stage: text sources, held-out split, tokenization and packing.

``DataConfig`` (the recipe's ``data:`` section) is light; the loaders (``load_text_dataset``,
``prepare_data`` ...) import ``datasets`` and are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import DataConfig

_TEXT = {
    "PackedData",
    "check_text_column",
    "load_text_dataset",
    "prepare_data",
    "split_train_eval",
    "tokenize_and_pack",
    "tokenizer_fingerprint",
}


def __getattr__(name: str) -> Any:
    """Load :mod:`.text` (``datasets``) only when one of its names is used."""
    if name in _TEXT:
        return getattr(importlib.import_module(".text", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataConfig", *sorted(_TEXT)]
