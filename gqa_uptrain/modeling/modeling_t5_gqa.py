"""T5 with grouped-query attention in the decoder (``model_type = "t5_gqa"``), as in the GQA paper.

Everything is the stock transformers T5 except the decoder's self-attention and cross-attention
modules, which read ``config.num_key_value_heads`` (``G``; default: ``num_heads``, i.e. stock T5). The
encoder stays multi-head attention (it keeps no KV cache at decode time), and the relative position
bias is untouched: it is per *query* head, ``[num_buckets, H]``. The stock classes are subclassed and
the decoder's attention modules swapped.

Parameter layout (what ``gqa-convert`` writes), with ``H = num_heads``, ``d = d_kv``:

* ``decoder.block.{i}.layer.0.SelfAttention.k`` / ``.v`` and ``decoder.block.{i}.layer.1.EncDecAttention.k``
  / ``.v`` (nn.Linear, no bias): weight ``[G*d, d_model]``; K/V head ``j`` is rows ``j*d .. j*d+d-1`` and
  serves query heads ``j*g .. j*g+g-1`` (``g = H // G``).
* ``q``, ``o``, ``relative_attention_bias`` and the whole encoder: unchanged.

This file is copied into converted checkpoints and loaded by transformers' remote-code loader: it imports
only torch, transformers (and huggingface_hub, which transformers requires) and its sibling by relative
import.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.configuration_t5 import T5Config
from transformers.models.t5.modeling_t5 import T5Attention, T5ForConditionalGeneration, T5Model

from .gqa_attention import check_heads, gqa_attention_interface, replace_modules, resolve_cache

AUTO_MAP = {
    "AutoConfig": "modeling_t5_gqa.T5GQAConfig",
    "AutoModel": "modeling_t5_gqa.T5GQAModel",
    "AutoModelForSeq2SeqLM": "modeling_t5_gqa.T5GQAForConditionalGeneration",
}


@strict
class T5GQAConfig(T5Config):
    """``T5Config`` plus ``num_key_value_heads`` for the decoder (default ``num_heads``)."""

    model_type = "t5_gqa"

    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_heads
        if getattr(self, "auto_map", None) is None:
            # So that save_pretrained writes a folder that loads with trust_remote_code.
            self.auto_map = dict(AUTO_MAP)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of ``@strict`` validation: ``num_heads`` must be a multiple of ``num_key_value_heads``."""
        super().validate_architecture()
        check_heads(self.num_heads, self.num_key_value_heads)


class T5GQAAttention(T5Attention):
    """T5 decoder attention (self or cross) with ``config.num_key_value_heads`` K/V heads."""

    upcast_softmax = False  # stock T5 eager softmax runs in the input dtype

    def __init__(
        self,
        config: T5GQAConfig,
        has_relative_attention_bias: bool = False,
        layer_idx: int | None = None,
        is_causal: bool = False,
    ) -> None:
        super().__init__(
            config,
            has_relative_attention_bias=has_relative_attention_bias,
            layer_idx=layer_idx,
            is_causal=is_causal,
        )
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = check_heads(self.n_heads, self.num_key_value_heads)
        kv_dim = self.num_key_value_heads * self.key_value_proj_dim
        self.k = nn.Linear(self.d_model, kv_dim, bias=False)  # [G*d, d_model]
        self.v = nn.Linear(self.d_model, kv_dim, bias=False)  # [G*d, d_model]

    def forward(
        self,
        hidden_states,
        mask=None,
        key_value_states=None,
        position_bias=None,
        cache=None,
        *,
        past_key_values=None,
        **kwargs,
    ):
        """The stock T5 attention forward, with ``G`` K/V heads (and a cache of ``G`` heads).

        The stock T5 layers pass the cache as ``cache`` (transformers >= 5.24) or ``past_key_values``
        (earlier): ``resolve_cache`` takes it under either name (or any other, see its docstring).
        """
        past_key_values = resolve_cache(kwargs, cache, past_key_values)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.key_value_proj_dim)
        past_seen_tokens = (
            past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        )
        # Cloned for StaticCache: read before the update, used after it, and it is the same tensor.
        past_seen_tokens = (
            past_seen_tokens.clone() if isinstance(past_seen_tokens, torch.Tensor) else past_seen_tokens
        )
        is_cross_attention = key_value_states is not None

        query_states = self.q(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, T, d]

        is_updated = False
        if isinstance(past_key_values, EncoderDecoderCache):
            is_updated = past_key_values.is_updated.get(self.layer_idx)
            curr_past_key_values = (
                past_key_values.cross_attention_cache
                if is_cross_attention
                else past_key_values.self_attention_cache
            )
        else:
            curr_past_key_values = past_key_values

        current_states = key_value_states if is_cross_attention else hidden_states
        if is_cross_attention and past_key_values is not None and is_updated:
            # Cross-attention K/V of the encoder output are computed once and reused.
            key_states = curr_past_key_values.layers[self.layer_idx].keys
            value_states = curr_past_key_values.layers[self.layer_idx].values
        else:
            kv_shape = (*current_states.shape[:-1], -1, self.key_value_proj_dim)
            key_states = self.k(current_states).view(kv_shape).transpose(1, 2)  # [B, G, S, d]
            value_states = self.v(current_states).view(kv_shape).transpose(1, 2)  # [B, G, S, d]
            if past_key_values is not None:
                key_states, value_states = curr_past_key_values.update(
                    key_states, value_states, self.layer_idx
                )
                if is_cross_attention and isinstance(past_key_values, EncoderDecoderCache):
                    past_key_values.is_updated[self.layer_idx] = True

        if position_bias is None:
            key_length = key_states.shape[-2]
            if not self.has_relative_attention_bias:
                # One bias per *query* head: [1, H, T, S].
                position_bias = torch.zeros(
                    (1, self.n_heads, input_shape[1], key_length),
                    device=query_states.device,
                    dtype=query_states.dtype,
                )
                if self.gradient_checkpointing and self.training:
                    position_bias.requires_grad = True
            else:
                position_bias = self.compute_bias(
                    input_shape[1], key_length, device=query_states.device, past_seen_tokens=past_seen_tokens
                )

        attn_output, attn_weights = gqa_attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=self.scaling,
            position_bias=position_bias,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o(attn_output), position_bias, attn_weights


def _use_gqa_attention(model: nn.Module) -> None:
    """Swap the decoder's stock attention modules (self and cross) for T5GQAAttention; the encoder stays."""
    replace_modules(
        model,
        lambda m: type(m) is T5Attention and m.is_decoder,
        # m.config is the decoder's own copy of the config (is_decoder=True).
        lambda m: T5GQAAttention(
            m.config,
            has_relative_attention_bias=m.has_relative_attention_bias,
            layer_idx=m.layer_idx,
            is_causal=m.is_causal,
        ),
    )
    model.post_init()  # initialises only the new modules (the rest is flagged as initialised)


class T5GQAModel(T5Model):
    """Bare T5 encoder-decoder with a grouped-query decoder."""

    config_class = T5GQAConfig

    def __init__(self, config: T5GQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class T5GQAForConditionalGeneration(T5ForConditionalGeneration):
    """T5 sequence-to-sequence model with a grouped-query decoder."""

    config_class = T5GQAConfig

    def __init__(self, config: T5GQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


# save_pretrained of these classes copies this file (and gqa_attention.py) and writes the auto_map.
T5GQAConfig.register_for_auto_class()
T5GQAModel.register_for_auto_class("AutoModel")
T5GQAForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = ["T5GQAAttention", "T5GQAConfig", "T5GQAForConditionalGeneration", "T5GQAModel"]
