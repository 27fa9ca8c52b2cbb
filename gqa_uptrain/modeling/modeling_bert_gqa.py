"""BERT with grouped-query self-attention (``model_type = "bert_gqa"``).

Everything is the stock transformers BERT except the self-attention module, which reads
``config.num_key_value_heads`` (``G``; default: ``num_attention_heads``, i.e. stock BERT). An encoder keeps
no KV cache, so the saving is parameters and attention bandwidth, not cache; used as a decoder
(``is_decoder``), the self-attention cache holds ``G`` heads. Cross-attention (``add_cross_attention``)
stays stock. The stock classes are subclassed and their self-attention modules swapped.

Parameter layout (what ``gqa-convert`` writes), with ``H`` heads, ``d = hidden_size // H``, ``C = hidden_size``:

* ``encoder.layer.{i}.attention.self.query``: unchanged, weight ``[H*d, C]``, bias ``[H*d]``.
* ``encoder.layer.{i}.attention.self.key`` / ``value``: weight ``[G*d, C]``, bias ``[G*d]``; K/V head ``j``
  is rows ``j*d .. j*d+d-1`` and serves query heads ``j*g .. j*g+g-1`` (``g = H // G``).
* ``attention.output.dense`` and everything else: unchanged.

This file is copied into converted checkpoints and loaded by transformers' remote-code loader: it imports
only torch, transformers (and huggingface_hub, which transformers requires) and its sibling by relative
import.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.models.bert.configuration_bert import BertConfig
from transformers.models.bert.modeling_bert import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertSelfAttention,
)

from .gqa_attention import check_heads, gqa_attention_interface, replace_modules, resolve_cache

AUTO_MAP = {
    "AutoConfig": "modeling_bert_gqa.BertGQAConfig",
    "AutoModel": "modeling_bert_gqa.BertGQAModel",
    "AutoModelForMaskedLM": "modeling_bert_gqa.BertGQAForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_bert_gqa.BertGQAForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_bert_gqa.BertGQAForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_bert_gqa.BertGQAForQuestionAnswering",
}


@strict
class BertGQAConfig(BertConfig):
    """``BertConfig`` plus ``num_key_value_heads`` (default ``num_attention_heads``)."""

    model_type = "bert_gqa"

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


class BertGQASelfAttention(BertSelfAttention):
    """BERT self-attention with ``config.num_key_value_heads`` K/V heads (see the module docstring)."""

    upcast_softmax = False  # stock BERT eager softmax runs in the input dtype

    def __init__(self, config: BertGQAConfig, is_causal: bool = False, layer_idx: int | None = None) -> None:
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = check_heads(self.num_attention_heads, self.num_key_value_heads)
        kv_dim = self.num_key_value_heads * self.attention_head_size
        self.key = nn.Linear(config.hidden_size, kv_dim)  # [G*d, C]
        self.value = nn.Linear(config.hidden_size, kv_dim)  # [G*d, C]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        *,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention with ``G`` K/V heads; as a decoder, the cache is updated with ``G`` heads.

        ``BertAttention`` passes the cache as ``cache`` (transformers >= 5.24) or ``past_key_values``
        (earlier): ``resolve_cache`` takes it under either name (or any other, see its docstring).
        """
        past_key_values = resolve_cache(kwargs, cache, past_key_values)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query_layer = self.query(hidden_states).view(*hidden_shape).transpose(1, 2)  # [B, H, T, d]
        key_layer = self.key(hidden_states).view(*hidden_shape).transpose(1, 2)  # [B, G, T, d]
        value_layer = self.value(hidden_states).view(*hidden_shape).transpose(1, 2)  # [B, G, T, d]

        if past_key_values is not None:
            cache = (
                past_key_values.self_attention_cache
                if isinstance(past_key_values, EncoderDecoderCache)
                else past_key_values
            )
            key_layer, value_layer = cache.update(key_layer, value_layer, self.layer_idx)

        attn_output, attn_weights = gqa_attention_interface(
            self,
            query_layer,
            key_layer,
            value_layer,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout.p,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return attn_output, attn_weights


def _use_gqa_attention(model: nn.Module) -> None:
    """Swap the stock self-attention modules of a freshly built stock model for BertGQASelfAttention."""
    replace_modules(
        model,
        lambda m: type(m) is BertSelfAttention,
        lambda m: BertGQASelfAttention(m.config, is_causal=m.is_causal, layer_idx=m.layer_idx),
    )
    model.post_init()  # initialises only the new modules (the rest is flagged as initialised)


class BertGQAModel(BertModel):
    """Bare BERT encoder with grouped-query self-attention."""

    config_class = BertGQAConfig

    def __init__(self, config: BertGQAConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        _use_gqa_attention(self)


class BertGQAForMaskedLM(BertForMaskedLM):
    """BERT masked language model with grouped-query self-attention."""

    config_class = BertGQAConfig

    def __init__(self, config: BertGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class BertGQAForSequenceClassification(BertForSequenceClassification):
    """BERT sequence classifier with grouped-query self-attention."""

    config_class = BertGQAConfig

    def __init__(self, config: BertGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class BertGQAForTokenClassification(BertForTokenClassification):
    """BERT token classifier with grouped-query self-attention."""

    config_class = BertGQAConfig

    def __init__(self, config: BertGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class BertGQAForQuestionAnswering(BertForQuestionAnswering):
    """BERT extractive question answering with grouped-query self-attention."""

    config_class = BertGQAConfig

    def __init__(self, config: BertGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


# save_pretrained of these classes copies this file (and gqa_attention.py) and writes the auto_map.
BertGQAConfig.register_for_auto_class()
BertGQAModel.register_for_auto_class("AutoModel")
BertGQAForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
BertGQAForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
BertGQAForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
BertGQAForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

__all__ = [
    "BertGQAConfig",
    "BertGQAForMaskedLM",
    "BertGQAForQuestionAnswering",
    "BertGQAForSequenceClassification",
    "BertGQAForTokenClassification",
    "BertGQAModel",
    "BertGQASelfAttention",
]
