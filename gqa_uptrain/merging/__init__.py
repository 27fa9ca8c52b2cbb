"""Merging stage: how a group of K/V heads becomes one.

- :mod:`.methods`: the method protocol and the paper's methods (mean / first / random);
- :mod:`.aligned`: function-aware merging fitted on calibration text;
- :mod:`.grouping`: which heads share a group (contiguous, or by similarity), and head permutations;
- :mod:`.calibration`: running the original model layer by layer on calibration text.
"""

from __future__ import annotations

from . import aligned as _aligned  # noqa: F401  (registers "aligned" and similarity grouping)
from .methods import (
    METHODS,
    BaseMethod,
    FirstHead,
    MeanPooling,
    MergeContext,
    MergeMethod,
    MethodFactory,
    MethodOptions,
    RandomInit,
    build_method,
    get_method,
    register_method,
    register_similarity,
)

__all__ = [
    "METHODS",
    "BaseMethod",
    "FirstHead",
    "MeanPooling",
    "MergeContext",
    "MergeMethod",
    "MethodFactory",
    "MethodOptions",
    "RandomInit",
    "build_method",
    "get_method",
    "register_method",
    "register_similarity",
]
