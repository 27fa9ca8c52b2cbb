"""Loading the model (and its tokenizer) that ``gqa-eval`` measures.

A model is a local folder or a Hub id. Checkpoints of families that transformers cannot give a
``num_key_value_heads`` (GPT-2, T5, ...) carry their own modelling code through ``auto_map`` in
``config.json``; those are loaded with ``trust_remote_code=True``, and only those.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

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


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the GPU when there is one; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """Map a ``--dtype`` name to a torch dtype; ``auto`` is float32 on CPU, the checkpoint's on a GPU.

    float32 on CPU because half-precision matmuls on CPU are slow and not what a CPU user deploys.
    """
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _read_config_json(source: str) -> dict[str, Any] | None:
    """The checkpoint's config.json as a dict when ``source`` is a local folder, else None."""
    path = Path(source) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); repair or re-create the checkpoint") from e


def needs_remote_code(source: str) -> bool:
    """True when the checkpoint's config names its own modelling code (``auto_map``)."""
    cfg = _read_config_json(source)
    if cfg is not None:
        return "auto_map" in cfg
    try:  # a Hub id: the config is small, fetch only it
        from transformers import PretrainedConfig

        raw, _ = PretrainedConfig.get_config_dict(source)
    except Exception as e:
        raise CheckpointError(
            f"cannot read the config of model {source!r} ({_first_line(e)}); "
            "pass a folder with config.json and weights, or a Hub id you can reach"
        ) from e
    return "auto_map" in raw


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's positions support, or None (relative positions, e.g. T5)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for field in _MAX_POSITION_FIELDS:
        value = getattr(cfg, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _register_gqa_modeling() -> None:
    """Import our modelling package, which registers the GQA classes of non-native families with Auto*."""
    if importlib.util.find_spec("gqa_uptrain.modeling") is not None:
        importlib.import_module("gqa_uptrain.modeling")


def load_model(source: str | os.PathLike, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal-LM or encoder-decoder checkpoint (and its tokenizer, if it has one) for evaluation.

    Raises :class:`CheckpointError` with a one-line message when the checkpoint cannot be loaded.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    _register_gqa_modeling()

    source = str(source)
    if not Path(source).exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise CheckpointError(f"model {source} does not exist; pass a checkpoint folder or a Hub id")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    remote = needs_remote_code(source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=remote)
    except Exception as e:
        raise CheckpointError(
            f"cannot load the config of model {source} ({_first_line(e)}); "
            "pass a folder with a valid config.json, or a Hub id"
        ) from e
    auto_cls = (
        transformers.AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else transformers.AutoModelForCausalLM
    )
    try:
        model = auto_cls.from_pretrained(source, dtype=torch_dtype, trust_remote_code=remote)
    except Exception as e:
        raise CheckpointError(
            f"cannot load model {source} as a {auto_cls.__name__} ({_first_line(e)}); "
            "check that the folder holds a complete causal-LM or seq2seq checkpoint"
        ) from e
    model.to(dev).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=remote)
    except Exception as e:  # a checkpoint without tokenizer files can still be timed
        logger.info("model %s has no loadable tokenizer (%s)", source, _first_line(e))
        tokenizer = None
    logger.info(
        "loaded %s (%s, %.1fM parameters) on %s in %s",
        source,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dev,
        model.dtype,
    )
    return LoadedModel(name=source, model=model, tokenizer=tokenizer, device=dev, dtype=model.dtype)


def wrap_model(model: Any, tokenizer: Any | None = None, name: str = "model") -> LoadedModel:
    """Wrap a model already in memory (e.g. in a script) so the measurement functions accept it."""
    model.eval()
    dev = next(model.parameters()).device
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=dev, dtype=model.dtype)
