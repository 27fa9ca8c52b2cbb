"""Evaluation of converted models: KV-cache size, perplexity, decode speed and peak memory.

``evaluate(model, baseline=..., data=..., options=...)`` is the Python entry point of ``gqa-eval``;
``report`` turns its result into a table, JSON and PNG charts.
"""

from __future__ import annotations

from .kv_cache import KVCacheCheck, KVLayout, allocated_cache_bytes, kv_layout, measure_cache
from .loading import LoadedModel, load_model, max_positions, wrap_model
from .perplexity import PerplexityResult, perplexity, tokenize_documents
from .report import report_table, write_json, write_plots
from .run import EvalOptions, EvalReport, ModelEval, evaluate
from .speed import SpeedResult, measure_speed

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
