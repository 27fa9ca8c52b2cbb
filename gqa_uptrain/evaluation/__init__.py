"""Evaluation of converted models: KV-cache size, perplexity, decode speed and peak memory.

``evaluate(model, baseline=..., data=..., options=...)`` is the Python entry point of ``gqa-eval``;
``report`` turns its result into a table, JSON and PNG charts.
"""

from __future__ import annotations

import importlib
from typing import Any

from .kv_cache import KVCacheCheck, KVLayout, allocated_cache_bytes, kv_layout, measure_cache
from .loading import LoadedModel, load_model, max_positions, wrap_model
from .perplexity import PerplexityResult, perplexity, tokenize_documents
from .speed import SpeedResult, measure_speed

# ``.run`` and ``.report`` are imported on first use: ``.run`` imports the data stage and the
# ``datasets`` package, and scripts/gpu_check/decode.py runs where ``datasets`` is not installed.
_WHERE = {
    "report_table": "report",
    "write_json": "report",
    "write_plots": "report",
    "EvalOptions": "run",
    "EvalReport": "run",
    "ModelEval": "run",
    "evaluate": "run",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EvalOptions",
    "EvalReport",
    "KVCacheCheck",
    "KVLayout",
    "LoadedModel",
    "ModelEval",
    "PerplexityResult",
    "SpeedResult",
    "allocated_cache_bytes",
    "evaluate",
    "kv_layout",
    "load_model",
    "max_positions",
    "measure_cache",
    "measure_speed",
    "perplexity",
    "report_table",
    "tokenize_documents",
    "wrap_model",
    "write_json",
    "write_plots",
]
