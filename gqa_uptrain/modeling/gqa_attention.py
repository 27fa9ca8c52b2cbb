"""Grouped-query attention: the core shared by every GQA model variant in this package.

``H`` query heads share ``G`` key/value heads (``H % G == 0``, group size ``g = H // G``): query head ``i``
reads K/V head ``i // g``, the same convention as transformers' ``repeat_kv`` (so the group of K/V head
``j`` is the contiguous run of query heads ``j*g .. j*g+g-1``). ``G == H`` is multi-head attention,
``G == 1`` multi-query attention.

Nothing here materialises the ``repeat_kv`` copy of the keys and values:

* SDPA gets the ``G`` K/V heads as they are, with ``enable_gqa=True`` (torch >= 2.5).
* The eager path folds the ``g`` query heads of a group into the query-length axis, so one matmul per
  K/V head serves its whole group: ``q [B, H, T, d] -> [B, G, g*T, d]``, ``q @ k^T -> [B, G, g*T, S]``.

This file is copied next to converted checkpoints and loaded by transformers' remote-code loader, so it
imports only torch and transformers (and siblings by relative import).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = [
    "GroupedQueryAttention",
    "GroupedQueryAttentionError",
    "RotaryEmbedding",
    "check_heads",
    "eager_grouped_attention",
    "gqa_attention_interface",
    "replace_modules",
    "resolve_cache",
    "sdpa_grouped_attention",
]

# `enable_gqa` arrived in torch 2.5; without it the SDPA path falls back to the (copy-free) eager math.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class GroupedQueryAttentionError(ValueError):
    """An impossible attention geometry (e.g. ``num_heads`` not a multiple of ``num_kv_heads``)."""


def check_heads(num_heads: int, num_kv_heads: int) -> int:
    """Return the group size ``num_heads // num_kv_heads``; raise a one-line error when it is not whole."""
    if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool) or num_kv_heads < 1:
        raise GroupedQueryAttentionError(
            f"num_key_value_heads must be a positive integer, got {num_kv_heads!r}"
        )
    if num_heads % num_kv_heads != 0:
        divisors = ", ".join(str(k) for k in range(1, num_heads + 1) if num_heads % k == 0)
        raise GroupedQueryAttentionError(
            f"num_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads}); "
            f"choose one of {divisors}"
        )
    return num_heads // num_kv_heads


# --------------------------------------------------------------------------------------------------
# The attention kernels. Both follow transformers' attention-interface conventions: inputs are
# query [B, H, T, d], key/value [B, G, S, d]; output is [B, T, H, d] (heads not yet merged) plus the
# attention probabilities [B, H, T, S] (eager) or None (SDPA).
# --------------------------------------------------------------------------------------------------


def eager_grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    training: bool = False,
    position_bias: torch.Tensor | None = None,
    upcast_softmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention over grouped K/V heads, with no copy of the keys or values.

    ``attention_mask`` is additive (float, broadcastable to [B, H, T, S]) or boolean (True = attend).
    ``position_bias`` (T5) is added to the scores before the mask. ``upcast_softmax`` computes the
    softmax in float32, as some families do. Like transformers' eager functions, this applies no
    causal mask of its own: the caller passes one.
    """
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    group = check_heads(num_heads, num_kv_heads)
    if scaling is None:
        scaling = head_dim**-0.5

    # The g query heads of a group share one K/V head: stack them along the query axis.
    q = query.reshape(bsz, num_kv_heads, group * q_len, head_dim)  # [B, G, g*T, d]
    scores = torch.matmul(q, key.transpose(2, 3)).view(bsz, num_heads, q_len, kv_len) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask

    if upcast_softmax:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    else:
        probs = F.softmax(scores, dim=-1).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=training)

    out = torch.matmul(probs.view(bsz, num_kv_heads, group * q_len, kv_len), value)  # [B, G, g*T, dv]
    out = out.view(bsz, num_heads, q_len, value.shape[-1]).transpose(1, 2).contiguous()  # [B, T, H, dv]
    return out, probs


def _position_bias_mask(
    position_bias: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    query: torch.Tensor,
    key: torch.Tensor,
) -> torch.Tensor:
    """Fold T5's position bias and the mask into one additive float mask for SDPA."""
    min_dtype = torch.finfo(key.dtype).min
    if attention_mask is None:
        if is_causal:
            q_len, kv_len = query.shape[2], key.shape[2]
            causal = torch.arange(q_len, device=key.device)[:, None] >= torch.arange(
                kv_len, device=key.device
            )
            mask = torch.where(causal.view(1, 1, q_len, kv_len), position_bias, min_dtype)
        else:
            mask = position_bias
    elif attention_mask.dtype == torch.bool:
        mask = torch.where(attention_mask, position_bias, min_dtype)
    else:
        mask = position_bias + attention_mask
    return mask.contiguous()


def sdpa_grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool = False,
    position_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """``scaled_dot_product_attention`` over grouped K/V heads (``enable_gqa=True``, no ``repeat_kv``).

    Follows transformers' SDPA conventions so that at ``G == H`` the call is exactly the stock one:
    ``is_causal`` is used only for a prefill with no mask, and a prefill into a longer (static) cache
    is cropped to the prompt.
    """
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    check_heads(num_heads, num_kv_heads)
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if torch.jit.is_tracing() and isinstance(is_causal, torch.Tensor):
        is_causal = bool(is_causal.item())
    if is_causal and kv_len > q_len:
        # Prefill into an empty static cache: the rest of the cache is still empty.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False

    if num_heads != num_kv_heads and not _SDPA_HAS_GQA:
        # Old torch: grouped eager math, still without a repeat_kv copy.
        return eager_grouped_attention(
            query, key, value, attention_mask, scaling=scaling, dropout=dropout, training=dropout > 0
        )[0], None

    kwargs = {"enable_gqa": True} if num_heads != num_kv_heads else {}
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        **kwargs,
    )
    return out.transpose(1, 2).contiguous(), None  # [B, T, H, dv]


def gqa_attention_interface(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention call of the family variants: dispatch on ``module.config._attn_implementation``.

    ``eager`` and ``sdpa`` run the grouped kernels above. Any other backend registered with transformers
    (flash attention, flex, paged) is called as is: those read ``module.num_key_value_groups`` and
    handle grouped heads natively. ``module`` may set ``upcast_softmax`` (eager softmax in float32).
    """
    implementation = module.config._attn_implementation or "eager"
    if implementation == "eager":
        return eager_grouped_attention(
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            training=module.training,
            position_bias=position_bias,
            upcast_softmax=getattr(module, "upcast_softmax", False),
        )
    if implementation == "sdpa":
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        return sdpa_grouped_attention(
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            is_causal=is_causal,
            position_bias=position_bias,
        )
    attention_fn: Callable = ALL_ATTENTION_FUNCTIONS[implementation]
    if position_bias is not None:
        kwargs["position_bias"] = position_bias
    return attention_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


# --------------------------------------------------------------------------------------------------
# Model surgery shared by the family variants.
# --------------------------------------------------------------------------------------------------

# Every keyword under which a transformers release has handed a layer's KV cache to its attention
# module: ``past_key_values`` (5.0 - 5.23), ``cache`` (5.24 on), ``layer_past`` (GPT-NeoX),
# ``past_key_value`` (4.x).
CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past", "past_key_value")


def resolve_cache(kwargs: MutableMapping[str, Any], *named: Any) -> Cache | None:
    """Return the layer's KV cache, whatever keyword the calling stock layer passed it under.

    ``named`` are the values of the forward's own cache parameters; ``kwargs`` is its ``**kwargs``, from
    which every cache keyword of :data:`CACHE_KEYWORDS` and every ``Cache`` instance under any other
    keyword is removed (so that no cache reaches the attention kernels as a stray keyword).

    Why not just name the parameter the way the current transformers does: the stock decoder layer that
    calls our attention module is transformers' code, and transformers renamed the keyword
    (``past_key_values`` -> ``cache`` in 5.24). A forward that names one keyword sends the other into
    ``**kwargs``, where it is silently ignored: generation then runs without a cache, recomputing the
    prefix every step. Accepting every known name, and any ``Cache`` instance under an unknown one, means
    a future rename still reaches the cache; two different caches in one call raise rather than one of
    them being dropped. (Owning the stock blocks' forwards instead would copy each family's block code
    into these files, to go stale on the next change of norms, residuals or arguments there.)
    """
    found: dict[int, Any] = {}
    for value in named:
        if value is not None:
            found[id(value)] = value
    for key in list(kwargs):
        if key in CACHE_KEYWORDS or isinstance(kwargs[key], Cache):
            value = kwargs.pop(key)
            if value is not None:
                found[id(value)] = value
    if len(found) > 1:
        kinds = ", ".join(type(v).__name__ for v in found.values())
        raise GroupedQueryAttentionError(
            f"the attention module received {len(found)} different KV caches ({kinds}); pass exactly one"
        )
    return next(iter(found.values()), None)


def replace_modules(
    root: nn.Module,
    select: Callable[[nn.Module], bool],
    build: Callable[[nn.Module], nn.Module],
) -> int:
    """Replace every submodule of ``root`` for which ``select`` is true by ``build(old)``; return the count.

    The family variants build the stock model and then swap its attention modules, so that everything
    but the attention stays exactly the stock code.
    """
    targets = [name for name, module in root.named_modules() if name and select(module)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, build(getattr(parent, child)))
    return len(targets)


# --------------------------------------------------------------------------------------------------
# The standalone module, for people who build their own models.
# --------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(i, i + d/2)`` of the last axis by 90 degrees (the GPT-NeoX/Llama RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first ``rotary_dim`` dimensions of each head.

    ``rotary_dim = head_dim * partial_rotary_factor`` (GPT-NeoX's ``rotary_pct``); the remaining dimensions
    pass through unrotated. Every head gets the same rotation, so it commutes with sharing K/V heads.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, partial_rotary_factor: float = 1.0) -> None:
        super().__init__()
        rotary_dim = int(head_dim * partial_rotary_factor)
        if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
            raise GroupedQueryAttentionError(
                f"rotary dimension {rotary_dim} (head_dim {head_dim} x partial_rotary_factor "
                f"{partial_rotary_factor}) must be even, at least 2 and at most head_dim; change the factor"
            )
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rotary_dim / 2]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [B, heads, T, d] at positions ``position_ids`` [B or 1, T]."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [B, T, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, rot]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class GroupedQueryAttention(nn.Module):
    """Multi-head attention with ``num_kv_heads`` shared key/value heads (MHA, GQA and MQA in one module).

    Args:
        hidden_size: model width ``C``.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``G``; ``H`` must be a multiple of ``G`` (``G == H``: MHA, ``1``: MQA).
        head_dim: per-head width ``d``; default ``hidden_size // num_heads``.
        bias: biases on the q/k/v projections. ``out_bias`` (default: ``bias``) on the output projection.
        rope_theta: base of the rotary embedding; ``None`` means no RoPE.
        partial_rotary_factor: fraction of each head that is rotated (GPT-NeoX's ``rotary_pct``).
        dropout: attention-probability dropout, applied in training only.
        is_causal: causal (decoder) or bidirectional (encoder) self-attention.
        attn_implementation: ``"sdpa"`` (default, ``enable_gqa=True``) or ``"eager"`` (also returns the
            attention probabilities).
        layer_idx: this layer's slot in a transformers ``Cache`` shared by several layers.
        scaling: score scale, default ``head_dim ** -0.5``.

    Parameters: ``q_proj [H*d, C]``, ``k_proj``/``v_proj [G*d, C]``, ``o_proj [C, H*d]`` (nn.Linear layout).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        *,
        bias: bool = False,
        out_bias: bool | None = None,
        rope_theta: float | None = None,
        partial_rotary_factor: float = 1.0,
        dropout: float = 0.0,
        is_causal: bool = True,
        attn_implementation: str = "sdpa",
        layer_idx: int = 0,
        scaling: float | None = None,
    ) -> None:
        super().__init__()
        self.num_key_value_groups = check_heads(num_heads, num_kv_heads)
        if head_dim is None:
            if hidden_size % num_heads:
                raise GroupedQueryAttentionError(
                    f"hidden_size ({hidden_size}) is not a multiple of num_heads ({num_heads}); pass head_dim"
                )
            head_dim = hidden_size // num_heads
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise GroupedQueryAttentionError(
                f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {attn_implementation!r}"
            )
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = (
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
        )
        self.dropout, self.is_causal, self.layer_idx = dropout, is_causal, layer_idx
        self.attn_implementation = attn_implementation
        self.scaling = head_dim**-0.5 if scaling is None else scaling

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(
            num_heads * head_dim, hidden_size, bias=bias if out_bias is None else out_bias
        )
        self.rotary = (
            RotaryEmbedding(head_dim, rope_theta, partial_rotary_factor) if rope_theta is not None else None
        )

    def _mask(
        self,
        attention_mask: torch.Tensor | None,
        q_len: int,
        kv_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """Additive float mask [B or 1, 1, T, S] (or None plus SDPA's ``is_causal`` flag)."""
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype == torch.bool:
                zero = torch.zeros((), dtype=dtype, device=device)
                return torch.where(attention_mask, zero, torch.finfo(dtype).min), False
            return attention_mask.to(dtype), False
        causal = self.is_causal and q_len > 1
        if attention_mask is None and (
            not causal or (q_len == kv_len and self.attn_implementation == "sdpa")
        ):
            return None, causal  # SDPA's own causal kernel, or nothing to mask
        keep = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
        if causal:
            # Query t sits at absolute position kv_len - q_len + t (earlier tokens are in the cache).
            q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
            keep = keep & (torch.arange(kv_len, device=device)[None, :] <= q_pos)
        if attention_mask is not None:  # [B, S] padding mask, 1 = real token
            if attention_mask.shape[-1] != kv_len:
                raise GroupedQueryAttentionError(
                    f"attention_mask covers {attention_mask.shape[-1]} positions but keys have {kv_len}; "
                    "pass a mask over past and current tokens"
                )
            keep = keep & attention_mask.bool()[:, None, None, :]
        mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
        return mask, False

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        *,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend ``hidden_states`` [B, T, C] to itself (and to the cached past).

        ``attention_mask``: [B, S] padding mask over past + current tokens (1 = keep), or a 4-D boolean
        (True = attend) / additive mask broadcastable to [B, H, T, S]. ``position_ids`` [B or 1, T] default to
        the positions after the cached tokens. ``past_key_values`` (or, as transformers >= 5.24 names it,
        ``cache``): a transformers ``Cache`` (e.g. ``DynamicCache()``) updated in place with this layer's
        ``G`` K/V heads.
        Returns the output [B, T, C] and, for eager, the attention probabilities [B, H, T, S].
        """
        past_key_values = resolve_cache({}, past_key_values, cache)
        bsz, q_len, _ = hidden_states.shape
        past_len = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0

        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            if position_ids is None:
                position_ids = torch.arange(past_len, past_len + q_len, device=hidden_states.device)[None]
            q, k = self.rotary(q, position_ids), self.rotary(k, position_ids)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # [B, G, S, d]

        mask, is_causal = self._mask(attention_mask, q_len, k.shape[2], q.dtype, q.device)
        dropout = self.dropout if self.training else 0.0
        if self.attn_implementation == "sdpa":
            out, weights = sdpa_grouped_attention(
                q, k, v, mask, scaling=self.scaling, dropout=dropout, is_causal=is_causal
            )
        else:
            out, weights = eager_grouped_attention(
                q, k, v, mask, scaling=self.scaling, dropout=dropout, training=self.training
            )
        return self.o_proj(out.reshape(bsz, q_len, -1)), weights

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"rope={'none' if self.rotary is None else self.rotary.rotary_dim}, impl={self.attn_implementation}"
        )
