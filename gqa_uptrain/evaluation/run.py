"""``evaluate``: everything ``gqa-eval`` measures, for a model and optionally its original side by side."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import DataConfig
from ..data.text import load_text_dataset, split_train_eval, tokenizer_fingerprint
from ..errors import ConfigError, GQAError
from .capacity import LargestBatch, largest_batch
from .kv_cache import KVCacheCheck, KVLayout, kv_layout, measure_cache
from .loading import LoadedModel, load_model, max_positions
from .perplexity import PerplexityResult, perplexity, tokenize_documents
from .precision import FORMATS, rounded, weight_stats
from .speed import SpeedResult, measure_speed
from .static_decode import PATHS

logger = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """What to measure and how (the ``gqa-eval`` options other than the model and the data)."""

    contexts: Sequence[int] = (128, 512)
    """Context (prompt) lengths for the KV-cache sizes and the decode-speed runs."""
    batch_sizes: Sequence[int] = (1,)
    """Batch sizes for the KV-cache sizes and the decode-speed runs."""
    new_tokens: int = 32
    """Tokens generated per speed run (greedy)."""
    warmup: int = 1
    """Untimed generation runs before the timed ones, per (context, batch)."""
    repeats: int = 3
    """Timed runs per (context, batch); the median is reported."""
    max_length: int | None = None
    """Perplexity window length (default: the model's maximum positions, at most 1024)."""
    stride: int | None = None
    """Perplexity window stride (default: half the window)."""
    ppl_batch_size: int = 1
    """Perplexity windows per forward pass."""
    max_eval_tokens: int | None = None
    """Evaluate perplexity on at most this many tokens of the data (None: all of it)."""
    held_out: bool = False
    """Perplexity on the documents uptraining holds out of the data (same split, same seed), not all."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    dtype: str = "auto"
    """auto (float32 on CPU, the checkpoint's on GPU), float32, bfloat16, float16."""
    skip_speed: bool = False
    """Do not time generation (KV-cache sizes and perplexity only)."""
    decode_paths: Sequence[str] = ("eager",)
    """How the speed runs decode: ``eager`` (``model.generate``) and/or ``static`` (static cache and a
    compiled decode step, :mod:`gqa_uptrain.evaluation.static_decode`)."""
    memory_budget: int | None = None
    """With a budget in bytes: also find the largest batch that decodes at each context within it
    (:func:`gqa_uptrain.evaluation.capacity.largest_batch`)."""
    max_batch: int | None = None
    """Cap on the largest-batch search."""
    seed: int = 0
    """Seed of the random prompts of the cache and speed runs."""
    round_trips: Sequence[str] = ()
    """Also measure perplexity after rounding the weights through these deployment formats
    (``bf16``, ``q8_0``: :mod:`gqa_uptrain.evaluation.precision`), restoring them after each."""
    trust_remote_code: bool | None = None
    """Run the modelling code a checkpoint ships; None: yes for a local folder that ships it, no for a
    Hub repo (:func:`gqa_uptrain.io.models.trust_remote_code_for`)."""
    progress: bool = True
    """Show progress bars."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values no measurement could use."""
        if not self.contexts or any(c < 1 for c in self.contexts):
            raise ConfigError(f"--context values must be positive integers, got {list(self.contexts)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"--batch-size values must be positive integers, got {list(self.batch_sizes)}")
        if self.new_tokens < 2:
            raise ConfigError(
                f"--new-tokens must be at least 2 (one prefill, one decode step), got {self.new_tokens}"
            )
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError("--repeats must be at least 1 and --warmup at least 0")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if self.max_eval_tokens is not None and self.max_eval_tokens < 2:
            raise ConfigError(f"--max-eval-tokens must be at least 2, got {self.max_eval_tokens}")
        bad_paths = [p for p in self.decode_paths if p not in PATHS]
        if not self.decode_paths or bad_paths:
            raise ConfigError(f"--decode-path takes {' and/or '.join(PATHS)}, got {list(self.decode_paths)}")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ConfigError("--memory-budget must be positive")
        unknown = [f for f in self.round_trips if f not in FORMATS]
        if unknown:
            raise ConfigError(f"--round-trip takes {' or '.join(FORMATS)}, got {', '.join(unknown)}")


@dataclass
class RoundTripEval:
    """Perplexity of a model after one deployment-precision round trip of its weights."""

    fmt: str
    perplexity: PerplexityResult
    relative_to_unrounded: float  # perplexity after / perplexity with the weights as loaded
    tensors_rounded: int
    left_as_they_are: dict[str, str]  # weight name -> why (rows not a multiple of the Q8_0 block)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {
            "format": self.fmt,
            "perplexity": self.perplexity.to_dict(),
            "relative_to_unrounded": self.relative_to_unrounded,
            "tensors_rounded": self.tensors_rounded,
            "left_as_they_are": self.left_as_they_are,
        }


@dataclass
class ModelEval:
    """All measurements of one model."""

    name: str
    role: str  # "model" or "baseline"
    parameters: int
    device: str
    dtype: str
    layout: KVLayout
    kv_checks: list[KVCacheCheck] = field(default_factory=list)
    perplexity: PerplexityResult | None = None
    speed: list[SpeedResult] = field(default_factory=list)
    round_trips: list[RoundTripEval] = field(default_factory=list)
    weights: dict[str, Any] | None = None  # precision.weight_stats, measured with --round-trip
    largest_batches: list[LargestBatch] = field(default_factory=list)  # with --memory-budget

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {
            "name": self.name,
            "role": self.role,
            "parameters": self.parameters,
            "device": self.device,
            "dtype": self.dtype,
            "kv_cache": {
                **self.layout.to_dict(),
                "checks": [c.to_dict() for c in self.kv_checks],
                "all_match": all(c.match for c in self.kv_checks),
            },
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "speed": [s.to_dict() for s in self.speed],
            "round_trips": [r.to_dict() for r in self.round_trips],
            "weights": self.weights,
            "largest_batch": [lb.to_dict() for lb in self.largest_batches],
        }


@dataclass
class EvalReport:
    """The result of :func:`evaluate`: the model first, then its baseline when one was given."""

    models: list[ModelEval]
    data: dict[str, Any] | None
    options: dict[str, Any]

    @property
    def model(self) -> ModelEval:
        """The evaluated model."""
        return self.models[0]

    @property
    def baseline(self) -> ModelEval | None:
        """The original model it is compared with, if any."""
        return self.models[1] if len(self.models) > 1 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (what ``--json`` writes)."""
        out: dict[str, Any] = {
            "models": [m.to_dict() for m in self.models],
            "data": self.data,
            "options": self.options,
        }
        if self.baseline is not None:
            out["relative_to_baseline"] = relative(self.model, self.baseline)
        return out


def relative(model: ModelEval, base: ModelEval) -> dict[str, Any]:
    """Ratios model / baseline of the headline figures (KV cache, perplexity, speed)."""
    rel: dict[str, Any] = {"kv_bytes_per_token": model.layout.bytes_per_token / base.layout.bytes_per_token}
    if model.perplexity and base.perplexity:
        rel["perplexity"] = model.perplexity.perplexity / base.perplexity.perplexity
    base_rt = {r.fmt: r for r in base.round_trips}
    rel["round_trip_perplexity"] = {
        r.fmt: r.perplexity.perplexity / base_rt[r.fmt].perplexity.perplexity
        for r in model.round_trips
        if r.fmt in base_rt
    }
    base_speed = {(s.context, s.batch, s.path): s for s in base.speed}
    rel["decode_tokens_per_s"] = [
        {
            "context": s.context,
            "batch": s.batch,
            "path": s.path,
            "ratio": s.decode_tokens_per_s / base_speed[(s.context, s.batch, s.path)].decode_tokens_per_s,
        }
        for s in model.speed
        if (s.context, s.batch, s.path) in base_speed
    ]
    base_fit = {lb.context: lb for lb in base.largest_batches}
    rel["largest_batch"] = [
        {
            "context": lb.context,
            "model": lb.largest_batch,
            "baseline": base_fit[lb.context].largest_batch,
            "ratio": lb.largest_batch / base_fit[lb.context].largest_batch
            if base_fit[lb.context].largest_batch
            else None,
        }
        for lb in model.largest_batches
        if lb.context in base_fit
    ]
    return rel


def eval_texts(data: DataConfig, held_out: bool = False) -> Any:
    """The texts (one per document) perplexity is measured on: what ``gqa-eval --data`` reads."""
    return (row[data.text_column] for row in _documents(data, held_out))


def _documents(data: DataConfig, held_out: bool) -> Any:
    """The dataset perplexity is measured on (all of the split, or uptraining's held-out part)."""
    if held_out:
        _, ds = split_train_eval(data)
        if ds is None:
            raise ConfigError(
                "--held-out needs a held-out part: set --eval-fraction > 0, --eval-documents or --eval-split"
            )
        return ds
    ds = load_text_dataset(data)
    return ds.take(data.max_documents) if data.max_documents is not None else ds


def _check_lengths(lm: LoadedModel, opts: EvalOptions, max_length: int | None) -> None:
    """Refuse contexts the model's positions cannot hold, before any measurement starts."""
    limit = max_positions(lm.model.config)
    if limit is None:
        return
    # The cache check generates 2 tokens; the speed runs generate --new-tokens.
    extra = 2 if opts.skip_speed else max(2, opts.new_tokens)
    longest = max(opts.contexts) + extra
    if longest > limit:
        raise ConfigError(
            f"context {max(opts.contexts)} + {extra} generated tokens = {longest} exceeds the {limit} "
            f"positions of model {lm.name}; pass a smaller --context"
            + ("" if opts.skip_speed else " or --new-tokens")
        )
    if max_length is not None and max_length > limit:
        raise ConfigError(
            f"--max-length {max_length} exceeds the {limit} positions of model {lm.name}; pass a smaller --max-length"
        )


def evaluate_model(
    lm: LoadedModel,
    role: str,
    opts: EvalOptions,
    token_ids: torch.Tensor | None,
) -> ModelEval:
    """Measure one loaded model: KV cache (computed and allocated), perplexity, decode speed."""
    model = lm.model
    layout = kv_layout(model.config, lm.dtype)
    result = ModelEval(
        name=lm.name,
        role=role,
        parameters=sum(p.numel() for p in model.parameters()),
        device=str(lm.device),
        dtype=str(lm.dtype).removeprefix("torch."),
        layout=layout,
    )
    logger.info(
        "%s: %s, %d layers, %d query / %d K/V heads of %d, %d KV-cache bytes per token",
        lm.name,
        layout.attention,
        layout.num_layers,
        layout.num_attention_heads,
        layout.num_kv_heads,
        layout.head_dim,
        layout.bytes_per_token,
    )
    for context in opts.contexts:
        for batch in opts.batch_sizes:
            result.kv_checks.append(measure_cache(model, layout, context, batch, seed=opts.seed))
    if token_ids is not None:
        max_length = opts.max_length or min(max_positions(model.config) or 1024, 1024)
        result.perplexity = perplexity(
            model, token_ids, max_length, opts.stride, batch_size=opts.ppl_batch_size, progress=opts.progress
        )
        for fmt in opts.round_trips:
            # Rounded for this measurement only: the speed runs below see the weights as loaded.
            with rounded(model, fmt) as report:
                ppl = perplexity(
                    model,
                    token_ids,
                    max_length,
                    opts.stride,
                    batch_size=opts.ppl_batch_size,
                    progress=opts.progress,
                )
            result.round_trips.append(
                RoundTripEval(
                    fmt,
                    ppl,
                    ppl.perplexity / result.perplexity.perplexity,
                    len(report.rounded),
                    dict(report.skipped),
                )
            )
        if opts.round_trips:
            result.weights = weight_stats(model)
    if not opts.skip_speed:
        for path in opts.decode_paths:
            for context in opts.contexts:
                for batch in opts.batch_sizes:
                    result.speed.append(
                        measure_speed(
                            model,
                            context,
                            batch,
                            opts.new_tokens,
                            opts.warmup,
                            opts.repeats,
                            seed=opts.seed,
                            path=path,
                        )
                    )
    if opts.memory_budget is not None:
        for context in opts.contexts:
            result.largest_batches.append(
                largest_batch(model, context, opts.memory_budget, max_batch=opts.max_batch)
            )
    return result


def evaluate(
    model: str | os.PathLike | LoadedModel,
    *,
    baseline: str | os.PathLike | LoadedModel | None = None,
    data: DataConfig | None = None,
    options: EvalOptions | None = None,
    tokenizer: str | None = None,
) -> EvalReport:
    """Measure ``model`` (and ``baseline`` with the same settings): KV cache, perplexity, decode speed.

    ``model`` / ``baseline``: a checkpoint folder, a Hub id, or a model already loaded
    (:func:`gqa_uptrain.evaluation.loading.wrap_model`). ``data``: the text for perplexity (the
    same options as uptraining); ``None`` skips perplexity. ``tokenizer``: where to load the
    tokenizer from when the checkpoint has none. Raises :class:`GQAError` subclasses for
    checkpoints that do not load, data without text and contexts longer than a model supports;
    nothing is measured until every input has been checked.
    """
    opts = options or EvalOptions()
    opts.validate()
    if opts.round_trips and data is None:
        raise ConfigError("--round-trip measures perplexity after rounding the weights: add --data")
    docs = _documents(data, opts.held_out) if data is not None else None

    loaded = [
        m
        if isinstance(m, LoadedModel)
        else load_model(m, opts.device, opts.dtype, trust_remote_code=opts.trust_remote_code)
        for m in (model, baseline)
        if m is not None
    ]
    if len(loaded) == 2 and loaded[1].name == loaded[0].name:
        loaded[1].name = f"{loaded[1].name} (baseline)"
    for lm in loaded:
        _check_lengths(lm, opts, opts.max_length if docs is not None else None)

    streams: dict[str, torch.Tensor] = {}
    token_ids: list[torch.Tensor | None] = []
    for lm in loaded:
        if docs is None:
            token_ids.append(None)
            continue
        tok = lm.tokenizer
        if tok is None and tokenizer is not None:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(tokenizer)
            except Exception as e:
                raise GQAError(
                    f"cannot load tokenizer {tokenizer} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass a folder with tokenizer files"
                ) from e
        if tok is None:
            raise GQAError(
                f"model {lm.name} has no tokenizer for perplexity; pass --tokenizer PATH or leave out --data"
            )
        key = tokenizer_fingerprint(tok)
        if key not in streams:  # model and baseline usually share one tokenizer: tokenize once
            texts = (row[data.text_column] for row in docs)
            streams[key] = tokenize_documents(texts, tok, opts.max_eval_tokens, add_eos=data.add_eos)
            logger.info("perplexity text: %d tokens", len(streams[key]))
        token_ids.append(streams[key])

    results = [
        evaluate_model(lm, role, opts, ids)
        for lm, role, ids in zip(loaded, ("model", "baseline")[: len(loaded)], token_ids, strict=True)
    ]
    data_info = None
    if data is not None:
        data_info = {
            "source": data.source,
            "split": data.split,
            "text_column": data.text_column,
            "held_out": opts.held_out,
            "documents": len(docs) if hasattr(docs, "__len__") else None,
            "tokens": max((len(t) for t in streams.values()), default=0),
        }
    options_info = {
        k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in vars(opts).items() if k != "progress"
    }
    return EvalReport(models=results, data=data_info, options=options_info)
