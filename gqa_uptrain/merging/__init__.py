"""Merging stage: how a group of K/V heads becomes one.

- :mod:`.methods`: the method protocol and the paper's methods (mean / first / random);
- :mod:`.aligned`: function-aware merging fitted on calibration text;
- :mod:`.grouping`: which heads share a group (contiguous, or by similarity), and head permutations;
- :mod:`.calibration`: running the original model layer by layer on calibration text.
"""

from __future__ import annotations

from .methods import METHODS, FirstHead, MeanPooling, MergeContext, MergeMethod, RandomInit, get_method

__all__ = ["METHODS", "FirstHead", "MeanPooling", "MergeContext", "MergeMethod", "RandomInit", "get_method"]
