"""The one loader of transformers models (and their tokenizers) that our entry points use.

``gqa-eval`` (the model and its baseline) and the uptraining (the student and the distillation
teacher) load checkpoints here, so that every one of them

* checks the path the same way (:func:`~gqa_uptrain.io.locate.check_model_path`: a folder with a
  ``config.json``, or a Hub id), with the same one-line errors;
* registers our GQA classes first (:func:`gqa_uptrain.modeling.register_auto_classes`), so a
  converted GPT-2 / GPT-NeoX / OPT / T5 / BERT checkpoint loads without remote code;
* decides ``trust_remote_code`` the same way (:func:`trust_remote_code_for`).

Conversion reads tensors, not models (:mod:`.checkpoint`), and never comes here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import CheckpointError, ConfigError
from ..modeling import register_auto_classes
from .locate import check_model_path

logger = logging.getLogger(__name__)

Task = Literal["auto", "causal-lm", "seq2seq-lm"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class Pretrained:
    """What :func:`load_pretrained` returns."""

    model: Any
    """The ``transformers.PreTrainedModel``, in eval mode, on ``device``."""
    tokenizer: Any | None
    """Its tokenizer; None when not asked for or when the checkpoint ships none that loads."""
    device: torch.device
    trust_remote_code: bool
    """What the model was loaded with (see :func:`trust_remote_code_for`)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks the GPU when there is one; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype | str:
    """Map a dtype name to a torch dtype; ``auto`` is float32 on CPU, the checkpoint's on a GPU.

    float32 on CPU because half-precision matmuls on CPU are slow and not what a CPU user deploys.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def trust_remote_code_for(path: str | os.PathLike, setting: bool | None = None) -> bool:
    """Whether to load ``path`` with ``trust_remote_code``: the same rule for every entry point.

    An explicit ``setting`` (a recipe's ``model.trust_remote_code``, ``gqa-eval --trust-remote-code``)
    wins. Otherwise: yes exactly when ``path`` is a local folder whose ``config.json`` has an
    ``auto_map``, i.e. code that is on this machine already (a folder gqa-convert wrote for a family
    transformers has no GQA for ships it). A Hub repo's code is never run unless asked for: our own
    GQA families load from the Hub without it, through the classes :func:`load_pretrained` registers.
    """
    if setting is not None:
        return setting
    config = Path(path).expanduser() / "config.json"
    if config.is_file():
        with contextlib.suppress(OSError, ValueError):
            return "auto_map" in json.loads(config.read_text(encoding="utf-8"))
    return False


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def _hint(e: BaseException, trust: bool) -> str:
    # transformers refuses a repo's own code without trust_remote_code: say how to allow it.
    if not trust and "trust_remote_code" in str(e):
        return "; if you trust its code, load it with trust_remote_code=True"
    return ""


def load_tokenizer(
    path: str | os.PathLike,
    *,
    what: str = "model",
    revision: str | None = None,
    trust_remote_code: bool | None = None,
    required: bool = True,
) -> Any | None:
    """The tokenizer of checkpoint ``path`` (a folder or a Hub id).

    Args:
        path: checkpoint folder or Hub id, checked with :func:`~gqa_uptrain.io.locate.check_model_path`.
        what: how messages name ``path`` (``"model"``, ``"model.path"``, ...).
        revision: Hub branch, tag or commit.
        trust_remote_code: None decides with :func:`trust_remote_code_for`.
        required: raise when it does not load; when False, log it and return None.

    Raises:
        CheckpointError: a bad path, or (``required``) a tokenizer that does not load; one line.
    """
    from transformers import AutoTokenizer

    check_model_path(path, what)
    register_auto_classes()  # AutoTokenizer reads the config to pick a class: it may be one of ours
    trust = trust_remote_code_for(path, trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust}
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:  # transformers raises many types for missing or broken tokenizer files
        if not required:
            logger.info("%s %s has no loadable tokenizer (%s)", what, path, _first_line(e))
            return None
        raise CheckpointError(
            f"cannot load the tokenizer of {what} {path} ({_first_line(e)}){_hint(e, trust)}; "
            "the folder needs the tokenizer files (tokenizer.save_pretrained)"
        ) from e


def load_pretrained(
    path: str | os.PathLike,
    *,
    what: str = "model",
    task: Task = "auto",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    trust_remote_code: bool | None = None,
    attn_implementation: str | None = None,
    with_tokenizer: bool = True,
) -> Pretrained:
    """Load checkpoint ``path`` (a folder or a Hub id) as a transformers model, with its tokenizer.

    In order: the path is checked (:func:`~gqa_uptrain.io.locate.check_model_path`), our GQA classes
    are registered with the Auto classes, ``trust_remote_code`` is decided
    (:func:`trust_remote_code_for`), the config is loaded, then the model, then the tokenizer.

    Args:
        path: checkpoint folder (``config.json`` + weights) or Hub id: ``owner/name``, or a legacy
            one-word name such as ``gpt2`` (:func:`~gqa_uptrain.io.locate.looks_like_model_id`).
        what: how error messages name ``path``: ``"model"``, ``"model.path"``, ``"distill.teacher"``.
        task: ``"causal-lm"`` (``AutoModelForCausalLM``), ``"seq2seq-lm"``
            (``AutoModelForSeq2SeqLM``), or ``"auto"``: seq2seq when the config is encoder-decoder.
        dtype: a torch dtype, a name (``float32``, ``bf16``, ...) or ``"auto"`` (float32 on CPU, the
            checkpoint's own on a GPU); None leaves it to transformers.
        device: where to put the model: a torch device, a name, or ``"auto"`` (the GPU if there is
            one); None leaves it where ``from_pretrained`` puts it (the CPU), e.g. for accelerate.
        revision: Hub branch, tag or commit.
        trust_remote_code: None decides with :func:`trust_remote_code_for`.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ``"eager"``, ...).
        with_tokenizer: also load the tokenizer; a checkpoint whose tokenizer does not load still
            loads, with ``tokenizer=None`` (use :func:`load_tokenizer` to require one).

    Returns:
        A :class:`Pretrained`: the model in eval mode, its tokenizer, device and trust setting.

    Raises:
        CheckpointError: a bad path, or a config or model that does not load; always one line.
        ConfigError: an unknown ``dtype`` or ``device`` name, or a GPU asked for where there is none.
    """
    import transformers

    check_model_path(path, what)
    dev = resolve_device(device) if device is not None else None
    torch_dtype = resolve_dtype(dtype, dev or torch.device("cpu")) if dtype is not None else None
    register_auto_classes()
    trust = trust_remote_code_for(path, trust_remote_code)
    source = str(path)
    common: dict[str, Any] = {"trust_remote_code": trust}
    if revision is not None:
        common["revision"] = revision
    try:
        config = transformers.AutoConfig.from_pretrained(source, **common)
    except Exception as e:  # transformers raises many types for a bad or unreachable config
        raise CheckpointError(
            f"cannot load the config of {what} {source} ({_first_line(e)}){_hint(e, trust)}; "
            "pass a folder with a valid config.json, or a Hub id"
        ) from e
    if task == "auto":
        task = "seq2seq-lm" if getattr(config, "is_encoder_decoder", False) else "causal-lm"
    auto_cls = (
        transformers.AutoModelForSeq2SeqLM if task == "seq2seq-lm" else transformers.AutoModelForCausalLM
    )
    kwargs = dict(common)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = auto_cls.from_pretrained(source, **kwargs)
    except Exception as e:
        raise CheckpointError(
            f"cannot load {what} {source} as a {auto_cls.__name__} ({_first_line(e)}){_hint(e, trust)}; "
            "check that the folder holds a complete causal-LM or seq2seq checkpoint"
        ) from e
    if dev is not None:
        model.to(dev)
    model.eval()
    tokenizer = None
    if with_tokenizer:
        tokenizer = load_tokenizer(
            path, what=what, revision=revision, trust_remote_code=trust, required=False
        )
    where = dev or next(model.parameters()).device
    logger.info(
        "loaded %s (%s, %.1fM parameters) on %s in %s",
        source,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        where,
        model.dtype,
    )
    return Pretrained(model=model, tokenizer=tokenizer, device=where, trust_remote_code=trust)
