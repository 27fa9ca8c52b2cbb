"""GPT-NeoX / Pythia with grouped-query attention (``model_type = "gpt_neox_gqa"``).

Everything is the stock transformers GPT-NeoX except the attention module, which reads
``config.num_key_value_heads`` (``G``; default: ``num_attention_heads``, i.e. stock GPT-NeoX). Partial
rotary (``rotary_pct`` / ``partial_rotary_factor``), parallel residual, masks, caches and generation are
the stock code; the stock classes are subclassed and their attention modules swapped.

Parameter layout (what ``gqa-convert`` writes), with ``H`` heads, ``d = hidden_size // H``, ``g = H // G``:

* ``layers.{i}.attention.query_key_value`` (nn.Linear): weight ``[(H + 2G)*d, hidden]``, bias
  ``[(H + 2G)*d]``; its rows viewed as ``[G, g + 2, d]`` hold, per K/V group, the group's ``g`` query
  heads, then its K head, then its V head (Falcon's layout). Query head ``j*g + r`` is row block
  ``[j, r]`` and reads K/V head ``j``. At ``G == H`` (``g = 1``) this is exactly the stock per-head
  interleaved ``[H, 3, d]`` layout.
* ``dense`` (output projection) and everything else: unchanged.

This file is copied into converted checkpoints and loaded by transformers' remote-code loader: it imports
only torch, transformers (and huggingface_hub, which transformers requires) and its sibling by relative
import.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.gpt_neox.configuration_gpt_neox import GPTNeoXConfig
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXAttention,
    GPTNeoXForCausalLM,
    GPTNeoXForQuestionAnswering,
    GPTNeoXForSequenceClassification,
    GPTNeoXForTokenClassification,
    GPTNeoXModel,
    apply_rotary_pos_emb,
)

from .gqa_attention import check_heads, gqa_attention_interface, replace_modules, resolve_cache

AUTO_MAP = {
    "AutoConfig": "modeling_gpt_neox_gqa.GPTNeoXGQAConfig",
    "AutoModel": "modeling_gpt_neox_gqa.GPTNeoXGQAModel",
    "AutoModelForCausalLM": "modeling_gpt_neox_gqa.GPTNeoXGQAForCausalLM",
    "AutoModelForSequenceClassification": "modeling_gpt_neox_gqa.GPTNeoXGQAForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_gpt_neox_gqa.GPTNeoXGQAForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_gpt_neox_gqa.GPTNeoXGQAForQuestionAnswering",
}


@strict
class GPTNeoXGQAConfig(GPTNeoXConfig):
    """``GPTNeoXConfig`` plus ``num_key_value_heads`` (default ``num_attention_heads``)."""

    model_type = "gpt_neox_gqa"

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


class GPTNeoXGQAAttention(GPTNeoXAttention):
    """GPT-NeoX attention with ``config.num_key_value_heads`` K/V heads (see the module docstring)."""

    upcast_softmax = True  # stock GPT-NeoX eager softmax runs in float32

    def __init__(self, config: GPTNeoXGQAConfig, layer_idx: int | None = None) -> None:
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = check_heads(self.num_heads, self.num_key_value_heads)
        # Rows [G, g + 2, d]: per K/V group its g query heads, its K head, its V head.
        self.query_key_value = nn.Linear(
            config.hidden_size,
            (self.num_heads + 2 * self.num_key_value_heads) * self.head_size,
            bias=config.attention_bias,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_past: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention with ``G`` K/V heads; the cache, if any, is updated with ``G`` heads.

        The stock GPT-NeoX layer passes the cache as ``layer_past``; other families were renamed to
        ``cache`` in transformers 5.24, so ``resolve_cache`` takes it under any of these names (or any
        other, see its docstring) rather than trusting this one to stay.
        """
        layer_past = resolve_cache(kwargs, layer_past, cache, past_key_values)
        input_shape = hidden_states.shape[:-1]
        g = self.num_key_value_groups
        qkv = self.query_key_value(hidden_states).view(
            *input_shape, self.num_key_value_heads, g + 2, self.head_size
        )
        query_states = qkv[..., :g, :].reshape(*input_shape, self.num_heads, self.head_size).transpose(1, 2)
        key_states = qkv[..., g, :].transpose(1, 2)  # [B, G, T, d]
        value_states = qkv[..., g + 1, :].transpose(1, 2)  # [B, G, T, d]

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)  # partial rotary

        if layer_past is not None:
            key_states, value_states = layer_past.update(key_states, value_states, self.layer_idx)  # G heads

        attn_output, attn_weights = gqa_attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.dense(attn_output), attn_weights


def _use_gqa_attention(model: nn.Module) -> None:
    """Swap the stock attention modules of a freshly built stock model for GPTNeoXGQAAttention."""
    replace_modules(
        model,
        lambda m: type(m) is GPTNeoXAttention,
        lambda m: GPTNeoXGQAAttention(model.config, layer_idx=m.layer_idx),
    )
    model.post_init()  # initialises only the new modules (the rest is flagged as initialised)


class GPTNeoXGQAModel(GPTNeoXModel):
    """Bare GPT-NeoX with grouped-query attention."""

    config_class = GPTNeoXGQAConfig

    def __init__(self, config: GPTNeoXGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class GPTNeoXGQAForCausalLM(GPTNeoXForCausalLM):
    """GPT-NeoX / Pythia language model with grouped-query attention."""

    config_class = GPTNeoXGQAConfig

    def __init__(self, config: GPTNeoXGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class GPTNeoXGQAForSequenceClassification(GPTNeoXForSequenceClassification):
    """GPT-NeoX sequence classifier with grouped-query attention."""

    config_class = GPTNeoXGQAConfig

    def __init__(self, config: GPTNeoXGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class GPTNeoXGQAForTokenClassification(GPTNeoXForTokenClassification):
    """GPT-NeoX token classifier with grouped-query attention."""

    config_class = GPTNeoXGQAConfig

    def __init__(self, config: GPTNeoXGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class GPTNeoXGQAForQuestionAnswering(GPTNeoXForQuestionAnswering):
    """GPT-NeoX extractive question answering with grouped-query attention."""

    config_class = GPTNeoXGQAConfig

    def __init__(self, config: GPTNeoXGQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


def _register_weight_renaming() -> None:
    """Give GPTNeoXGQAForCausalLM the stock class's checkpoint key renaming.

    Stock GPT-NeoX checkpoints name the LM head ``embed_out``; transformers renames it to ``lm_head`` on
    load (and back on save) through a mapping keyed by the class name ``GPTNeoXForCausalLM``, which our
    subclass does not match. Copying the mapping under our class name keeps loading and saving stock.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers without conversion mappings: keys are not renamed either
        return
    mapping = get_checkpoint_conversion_mapping("GPTNeoXForCausalLM")
    if mapping:
        register_checkpoint_conversion_mapping("GPTNeoXGQAForCausalLM", mapping, overwrite=True)


_register_weight_renaming()

# save_pretrained of these classes copies this file (and gqa_attention.py) and writes the auto_map.
GPTNeoXGQAConfig.register_for_auto_class()
GPTNeoXGQAModel.register_for_auto_class("AutoModel")
GPTNeoXGQAForCausalLM.register_for_auto_class("AutoModelForCausalLM")
GPTNeoXGQAForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
GPTNeoXGQAForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
GPTNeoXGQAForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

__all__ = [
    "GPTNeoXGQAAttention",
    "GPTNeoXGQAConfig",
    "GPTNeoXGQAForCausalLM",
    "GPTNeoXGQAForQuestionAnswering",
    "GPTNeoXGQAForSequenceClassification",
    "GPTNeoXGQAForTokenClassification",
    "GPTNeoXGQAModel",
]
