"""GPT-2 with grouped-query self-attention (``model_type = "gpt2_gqa"``).

Everything is the stock transformers GPT-2 except the self-attention module, which reads
``config.num_key_value_heads`` (``G``; default: ``n_head``, i.e. stock GPT-2). The stock classes are
subclassed and their self-attention modules swapped, so embeddings, blocks, heads, masks, caches,
generation and weight initialisation are the stock code.

Parameter layout (what ``gqa-convert`` writes), with ``H = n_head``, ``d = n_embd // H``, ``C = n_embd``:

* ``h.{i}.attn.c_attn`` stays a ``Conv1D`` (weight stored transposed, ``[in, out]``):
  weight ``[C, (H + 2G)*d]`` whose columns are ``[Q (H*d) | K (G*d) | V (G*d)]``, bias ``[(H + 2G)*d]``.
  Within Q, K and V the heads are contiguous ``d``-wide column blocks; query head ``i`` reads K/V head
  ``i // (H // G)``. At ``G == H`` this is exactly the stock ``[C, 3C]`` layout.
* ``c_proj`` and everything else: unchanged.
* Cross-attention (``add_cross_attention``) stays stock multi-head attention.

This file is copied into converted checkpoints and loaded by transformers' remote-code loader: it imports
only torch, transformers (and huggingface_hub, which transformers requires) and its sibling by relative
import.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.models.gpt2.configuration_gpt2 import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Attention,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils.generic import maybe_autocast

from .gqa_attention import check_heads, gqa_attention_interface, replace_modules, resolve_cache

AUTO_MAP = {
    "AutoConfig": "modeling_gpt2_gqa.GPT2GQAConfig",
    "AutoModel": "modeling_gpt2_gqa.GPT2GQAModel",
    "AutoModelForCausalLM": "modeling_gpt2_gqa.GPT2GQALMHeadModel",
    "AutoModelForSequenceClassification": "modeling_gpt2_gqa.GPT2GQAForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_gpt2_gqa.GPT2GQAForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_gpt2_gqa.GPT2GQAForQuestionAnswering",
}


@strict
class GPT2GQAConfig(GPT2Config):
    """``GPT2Config`` plus ``num_key_value_heads`` (K/V heads of the self-attention; default ``n_head``)."""

    model_type = "gpt2_gqa"

    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.n_head
        if getattr(self, "auto_map", None) is None:
            # So that save_pretrained writes a folder that loads with trust_remote_code.
            self.auto_map = dict(AUTO_MAP)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of ``@strict`` validation: ``n_head`` must be a multiple of ``num_key_value_heads``."""
        super().validate_architecture()
        check_heads(self.n_head, self.num_key_value_heads)


class GPT2GQAAttention(GPT2Attention):
    """GPT-2 self-attention with ``config.num_key_value_heads`` K/V heads (see the module docstring)."""

    upcast_softmax = False  # stock GPT-2 eager softmax runs in the input dtype

    def __init__(self, config: GPT2GQAConfig, layer_idx: int | None = None) -> None:
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = check_heads(self.num_heads, self.num_key_value_heads)
        self.kv_dim = self.num_key_value_heads * self.head_dim
        # Conv1D(nf, nx): weight [C, (H + 2G)*d], columns [Q | K | V].
        self.c_attn = Conv1D(self.embed_dim + 2 * self.kv_dim, self.embed_dim)

    def _upcast_and_reordered_attn(self, query, key, value, attention_mask=None):
        """Stock GPT-2's float32 ``baddbmm`` attention, one batched matmul per K/V head and its group."""
        bsz, num_heads, q_len, dk = query.size()
        num_kv, k_len = key.shape[1], key.shape[2]
        group = num_heads // num_kv
        attn_weights = torch.empty(
            bsz * num_kv, group * q_len, k_len, dtype=torch.float32, device=query.device
        )
        with maybe_autocast(query.device.type, enabled=False):
            q = query.reshape(-1, group * q_len, dk)  # [B*G, g*T, d]
            k = key.transpose(-1, -2).reshape(-1, dk, k_len)  # [B*G, d, S]
            attn_weights = torch.baddbmm(attn_weights, q.float(), k.float(), beta=0, alpha=self.scaling)
            attn_weights = attn_weights.reshape(bsz, num_heads, q_len, k_len)
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        if attn_weights.dtype != torch.float32:
            raise RuntimeError("Error with upcasting, attn_weights does not have dtype torch.float32")
        attn_weights = self.attn_dropout(attn_weights.type(value.dtype))
        attn_output = torch.matmul(attn_weights.view(bsz, num_kv, group * q_len, k_len), value)
        attn_output = attn_output.view(bsz, num_heads, q_len, -1).transpose(1, 2)
        return attn_output, attn_weights

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        *,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention with ``G`` K/V heads; the cache, if any, is updated with ``G`` heads.

        The stock GPT-2 block passes the cache as ``cache`` (transformers >= 5.24) or ``past_key_values``
        (earlier): ``resolve_cache`` takes it under either name (or any other, see its docstring).
        """
        past_key_values = resolve_cache(kwargs, cache, past_key_values)
        if encoder_hidden_states is not None:
            raise ValueError("GPT2GQAAttention is self-attention only; cross-attention stays GPT2Attention")
        query, key, value = self.c_attn(hidden_states).split(
            [self.embed_dim, self.kv_dim, self.kv_dim], dim=2
        )
        query = query.view(*query.shape[:-1], -1, self.head_dim).transpose(1, 2)  # [B, H, T, d]
        key = key.view(*key.shape[:-1], -1, self.head_dim).transpose(1, 2)  # [B, G, T, d]
        value = value.view(*value.shape[:-1], -1, self.head_dim).transpose(1, 2)  # [B, G, T, d]

        if past_key_values is not None:
            cache = (
                past_key_values.self_attention_cache
                if isinstance(past_key_values, EncoderDecoderCache)
                else past_key_values
            )
            key, value = cache.update(key, value, self.layer_idx)  # the cache holds G heads

        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            attn_output, attn_weights = self._upcast_and_reordered_attn(query, key, value, attention_mask)
        else:
            attn_output, attn_weights = gqa_attention_interface(
                self,
                query,
                key,
                value,
                attention_mask,
                dropout=self.attn_dropout.p if self.training else 0.0,
                scaling=self.scaling,
                **kwargs,
            )
        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
        attn_output = self.resid_dropout(self.c_proj(attn_output))
        return attn_output, attn_weights


def _use_gqa_attention(model: nn.Module) -> None:
    """Swap the stock self-attention modules of a freshly built stock model for GPT2GQAAttention."""
    replace_modules(
        model,
        lambda m: type(m) is GPT2Attention and not m.is_cross_attention,
        lambda m: GPT2GQAAttention(model.config, layer_idx=m.layer_idx),
    )
    model.post_init()  # initialises only the new modules (the rest is flagged as initialised)


class GPT2GQAModel(GPT2Model):
    """Bare GPT-2 with grouped-query self-attention."""

    config_class = GPT2GQAConfig

    def __init__(self, config: GPT2GQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class GPT2GQALMHeadModel(GPT2LMHeadModel):
    """GPT-2 language model with grouped-query self-attention."""

    config_class = GPT2GQAConfig

    def __init__(self, config: GPT2GQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class GPT2GQAForSequenceClassification(GPT2ForSequenceClassification):
    """GPT-2 sequence classifier with grouped-query self-attention."""

    config_class = GPT2GQAConfig

    def __init__(self, config: GPT2GQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class GPT2GQAForTokenClassification(GPT2ForTokenClassification):
    """GPT-2 token classifier with grouped-query self-attention."""

    config_class = GPT2GQAConfig

    def __init__(self, config: GPT2GQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


class GPT2GQAForQuestionAnswering(GPT2ForQuestionAnswering):
    """GPT-2 extractive question answering with grouped-query self-attention."""

    config_class = GPT2GQAConfig

    def __init__(self, config: GPT2GQAConfig) -> None:
        super().__init__(config)
        _use_gqa_attention(self)


# save_pretrained of these classes copies this file (and gqa_attention.py) and writes the auto_map.
GPT2GQAConfig.register_for_auto_class()
GPT2GQAModel.register_for_auto_class("AutoModel")
GPT2GQALMHeadModel.register_for_auto_class("AutoModelForCausalLM")
GPT2GQAForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
GPT2GQAForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
GPT2GQAForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

__all__ = [
    "GPT2GQAAttention",
    "GPT2GQAConfig",
    "GPT2GQAForQuestionAnswering",
    "GPT2GQAForSequenceClassification",
    "GPT2GQAForTokenClassification",
    "GPT2GQALMHeadModel",
    "GPT2GQAModel",
]
