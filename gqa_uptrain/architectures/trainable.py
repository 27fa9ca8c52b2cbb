"""Which parameters of a model are attention, and which of those are K/V, for freezing during uptraining.

``freeze.mode: attention`` trains the parameters inside attention modules; ``freeze.mode: kv`` only
the K/V projections (and K norms). Which names those are is a fact about the model family, so it is
read from the family's :class:`~gqa_uptrain.architectures.base.Architecture` entry, the same data
the converter merges heads by:

* inside an attention module: the name lies under a module matching one of the family's
  :attr:`AttentionModule.pattern` (``...layers.3.self_attn.<anything>``);
* a K/V tensor: a head-carrying tensor whose :class:`Packing` holds only K or only V heads
  (``k_proj.weight``, ``v_proj.bias``, OLMo2's ``k_norm``, StableLM's per-head K layernorms), or a
  K-side tensor shared by all heads listed in :data:`SHARED_KV_TENSORS` (Qwen3's ``k_norm``);
* a fused QKV tensor: one packing that holds Q together with K and V (``c_attn``, ``qkv_proj``,
  ``query_key_value``). Autograd cannot train only some rows of a tensor, so under ``kv`` it trains
  whole, query rows included.

A model of a family not described here (a checkpoint from elsewhere) falls back to parameter-name
parts common across transformers (:data:`FALLBACK_ATTENTION_PARTS` and the two sets after it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Literal

from . import ARCHITECTURES
from .base import Architecture

logger = logging.getLogger(__name__)

ParameterKind = Literal["kv", "fused_qkv", "attention"]
"""``kv``: K or V only; ``fused_qkv``: Q with K and V in one tensor; ``attention``: any other
parameter of an attention module (Q and output projections, norms)."""

# K-side tensors that carry no heads (one [head_dim] weight shared by every head), by family name:
# the converter leaves them alone, so the architecture entries do not list them, but they act on
# K only and train with it.
SHARED_KV_TENSORS: Mapping[str, tuple[str, ...]] = {"Qwen3": ("k_norm.weight",)}

# For families with no Architecture entry: name parts (split on ".") of attention modules, of K/V
# projections inside them, and of fused QKV projections, across the usual transformers layouts.
FALLBACK_ATTENTION_PARTS = frozenset(
    {
        "self_attn",
        "attn",
        "attention",
        "self_attention",
        "SelfAttention",
        "EncDecAttention",
        "crossattention",
        "cross_attn",
        "encoder_attn",
    }
)
FALLBACK_KV_PARTS = frozenset({"k_proj", "v_proj", "key", "value", "k", "v", "k_norm", "kv_proj"})
FALLBACK_FUSED_QKV_PARTS = frozenset({"qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack"})


def architecture_for(model_type: str | None) -> Architecture | None:
    """The family whose ``model_types`` include ``model_type`` (stock or converted), or ``None``."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    return None


def _kind_from_architecture(arch: Architecture, name: str) -> ParameterKind | None:
    for module in arch.modules:
        under = re.search(rf"(?:^|\.)(?:{module.pattern})\.(.+)$", name)
        if under is None:
            continue
        found = module.match(name)
        if found is not None:
            roles = set(module.tensors[found[1]].roles())
            if roles <= {"k", "v"}:
                return "kv"
            if {"q", "k", "v"} <= roles:
                return "fused_qkv"
        elif under.group(1) in SHARED_KV_TENSORS.get(arch.name, ()):
            return "kv"
        return "attention"
    return None


def _kind_from_name_parts(name: str) -> ParameterKind | None:
    parts = set(name.split("."))
    if not parts & FALLBACK_ATTENTION_PARTS:
        return None
    if parts & FALLBACK_FUSED_QKV_PARTS:
        return "fused_qkv"
    return "kv" if parts & FALLBACK_KV_PARTS else "attention"


def attention_parameter_kinds(model_type: str | None, names: Iterable[str]) -> dict[str, ParameterKind]:
    """The attention parameters among ``names`` (a model's ``named_parameters()`` names) and their kind.

    Names outside attention modules are left out. ``model_type`` is the model's
    ``config.model_type``; a family without an architecture entry is read by name parts (logged).
    """
    arch = architecture_for(model_type)
    if arch is None:
        logger.info("model_type %r has no architecture entry: attention parameters found by name", model_type)
    kinds: dict[str, ParameterKind] = {}
    for name in names:
        kind = _kind_from_architecture(arch, name) if arch is not None else _kind_from_name_parts(name)
        if kind is not None:
            kinds[name] = kind
    return kinds


def trained_by(mode: Literal["attention", "kv"], kind: ParameterKind | None) -> bool:
    """Whether freeze ``mode`` trains a parameter of ``kind`` (``None``: outside attention)."""
    if kind is None:
        return False
    return mode == "attention" or kind in ("kv", "fused_qkv")
