"""OPT with grouped-query attention (``model_type = "opt_gqa"``).

Everything is the stock transformers OPT except the self-attention module, which reads
``config.num_key_value_heads`` (``G``; default: ``num_attention_heads``, i.e. stock OPT). The stock
classes are subclassed and their attention modules swapped; the query is pre-scaled exactly as stock.

Parameter layout (what ``gqa-convert`` writes), with ``H`` heads, ``d = hidden_size // H``, ``C = hidden_size``:

* ``layers.{i}.self_attn.q_proj``: unchanged, weight ``[H*d, C]``, bias ``[H*d]``.
* ``layers.{i}.self_attn.k_proj`` / ``v_proj``: weight ``[G*d, C]``, bias ``[G*d]`` (``enable_bias``); K/V
  head ``j`` is rows ``j*d .. j*d+d-1`` and serves query heads ``j*g .. j*g+g-1`` (``g = H // G``).
* ``out_proj`` and everything else: unchanged.

This file is copied into converted checkpoints and loaded by transformers' remote-code loader: it imports
only torch, transformers (and huggingface_hub, which transformers requires) and its sibling by relative
import.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.opt.configuration_opt import OPTConfig
from transformers.models.opt.modeling_opt import (
    OPTAttention,
    OPTForCausalLM,
    OPTForQuestionAnswering,
    OPTForSequenceClassification,
    OPTModel,
)

from .gqa_attention import check_heads, gqa_attention_interface, replace_modules, resolve_cache

AUTO_MAP = {
    "AutoConfig": "modeling_opt_gqa.OPTGQAConfig",
    "AutoModel": "modeling_opt_gqa.OPTGQAModel",
    "AutoModelForCausalLM": "modeling_opt_gqa.OPTGQAForCausalLM",
    "AutoModelForSequenceClassification": "modeling_opt_gqa.OPTGQAForSequenceClassification",
    "AutoModelForQuestionAnswering": "modeling_opt_gqa.OPTGQAForQuestionAnswering",
}


@strict
class OPTGQAConfig(OPTConfig):
    """``OPTConfig`` plus ``num_key_value_heads`` (default ``num_attention_heads``)."""

    model_type = "opt_gqa"

    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if getattr(self, "auto_map", None) is None:
            # So that save_pretrained writes a folder that loads with trust_remote_code.
            self.auto_map = dict(AUTO_MAP)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of ``@strict`` validation: heads must be a multiple of ``num_key_value_heads``."""
        super().validate_architecture()
        check_heads(self.num_attention_heads, self.num_key_value_heads)


class OPTGQAAttention(OPTAttention):
    """OPT self-attention with ``config.num_key_value_heads`` K/V heads (see the module docstring)."""

    upcast_softmax = True  # stock OPT eager softmax runs in float32

    def __init__(self, config: OPTGQAConfig, layer_idx: int | None = None, **kwargs) -> None:
        super().__init__(config, layer_idx=layer_idx, **kwargs)
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = check_heads(self.num_heads, self.num_key_value_heads)
        kv_dim = self.num_key_value_heads * self.head_dim
        self.k_proj = nn.Linear(self.embed_dim, kv_dim, bias=self.enable_bias)  # [G*d, C]
        self.v_proj = nn.Linear(self.embed_dim, kv_dim, bias=self.enable_bias)  # [G*d, C]

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        *,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention with ``G`` K/V heads; the cache, if any, is updated with ``G`` heads.

        The stock OPT decoder layer passes the cache as ``cache`` (transformers >= 5.24) or
        ``past_key_values`` (earlier): ``resolve_cache`` takes it under either name (or any other).
        """
        past_key_values = resolve_cache(kwargs, cache, past_key_values)
        bsz, tgt_len, _ = hidden_states.size()
        # Stock OPT scales the query before the dot product (and passes scaling=1.0): keep that order.
        query_states = self.q_proj(hidden_states) * self.scaling
        query_states = query_states.view(bsz, -1, self.num_heads, self.head_dim).transpose(
            1, 2
        )  # [B, H, T, d]
        key_states = self.k_proj(hidden_states).view(bsz, -1, self.num_key_value_heads, self.head_dim)
        value_states = self.v_proj(hidden_states).view(bsz, -1, self.num_key_value_heads, self.head_dim)
        key_states, value_states = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [B, G, T, d]

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attn_output, attn_weights = gqa_attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=1.0,
            **kwargs,
        )
        attn_output = attn_output.reshape(bsz, tgt_len, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


def _use_gqa_attention(model: nn.Module) -> None:
    """Swap the stock attention modules of a freshly built stock model for OPTGQAAttention."""
    replace_modules(
        model,
        lambda m: type(m) is OPTAttention,
        lambda m: OPTGQAAttention(model.config, layer_idx=m.layer_idx),
    )
    model.post_init()  # initialises only the new modules (the rest is flagged as initialised)


class OPTGQAModel(OPTModel):
    """Bare OPT with grouped-query attention."""

    config_class = OPTGQAConfig

    def __init__(self, config: OPTGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class OPTGQAForCausalLM(OPTForCausalLM):
    """OPT language model with grouped-query attention."""

    config_class = OPTGQAConfig

    def __init__(self, config: OPTGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class OPTGQAForSequenceClassification(OPTForSequenceClassification):
    """OPT sequence classifier with grouped-query attention."""

    config_class = OPTGQAConfig

    def __init__(self, config: OPTGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class OPTGQAForQuestionAnswering(OPTForQuestionAnswering):
    """OPT extractive question answering with grouped-query attention."""

    config_class = OPTGQAConfig

    def __init__(self, config: OPTGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


# save_pretrained of these classes copies this file (and gqa_attention.py) and writes the auto_map.
OPTGQAConfig.register_for_auto_class()
OPTGQAModel.register_for_auto_class("AutoModel")
OPTGQAForCausalLM.register_for_auto_class("AutoModelForCausalLM")
OPTGQAForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
OPTGQAForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

__all__ = [
    "OPTGQAAttention",
    "OPTGQAConfig",
    "OPTGQAForCausalLM",
    "OPTGQAForQuestionAnswering",
    "OPTGQAForSequenceClassification",
    "OPTGQAModel",
]
