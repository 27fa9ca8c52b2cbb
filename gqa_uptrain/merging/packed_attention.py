"""Causal self-attention for the refinement's CPU steps: grouped query heads packed into rows, and
the causal triangle computed in blocks of query positions.

Refinement runs the converted attention module thousands of times on the same few sequences
(``trainer.py``), and on a CPU torch's flash-attention kernel is most of each step. Two things make
that kernel slower than it needs to be for a merged module:

- it handles grouped K/V heads by reading each K/V head once per query head (``repeat_kv`` or
  ``enable_gqa``): G small products where one G times taller would do;
- its key blocks are 512 long, so at 512 positions ``is_causal`` skips nothing: the masked upper
  triangle costs as much as the lower one.

Here the G query heads of each K/V head become G rows per position (token-major, so a position's rows
are contiguous), and the query positions are cut into blocks of :data:`BLOCK`; block ``i`` attends to
keys ``0 .. end_i`` only, with a boolean mask on its last block of keys. The softmax of each query row
still sees every key it may see, so the result is the same function as causal SDPA (to float
rounding): at 4 x 512 tokens, 9 query heads on one K/V head, forward and backward take about 0.7x the
flash kernel's time in bfloat16 and the forward 0.7x in float32 (``scripts/bench_refine_step.py``).

Registered in transformers' public ``AttentionInterface`` and switched on for the converted model of
the layer walk only, on CPU; every other call (a mask, a cache, cross-attention, a window, soft-capping,
non-causal encoders, a GPU) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

PACKED_ATTENTION = "gqa_uptrain_packed_causal"
"""Name the packed attention is registered under in transformers' ``AttentionInterface``."""

BLOCK = 128
"""Query positions per block: at 512 positions, 128 computes 10/16 of the full square (64: 9/16,
but twice the calls, and slower in measurement)."""

# Keywords of attention variants the packed path does not implement (logit soft-capping, attention
# sinks, learned position biases, local windows): a call that passes one gets transformers' SDPA.
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window")


@functools.lru_cache(maxsize=8)
def _masks(t: int, g: int, device: torch.device) -> list[tuple[int, int, torch.Tensor]]:
    """Per block of query positions ``[start, end)``: ``(start, end, mask)`` with ``mask[r, j]``
    true where row ``r`` (position ``start + r // g``) may attend to key ``j < end``. Made once per
    shape (a training run calls the same shape thousands of times; at most 8 shapes are kept)."""
    out = []
    with torch.inference_mode(False):  # kept masks must be usable by later calls that record gradients
        keys = torch.arange(t, device=device)
        for start in range(0, t, BLOCK):
            end = min(t, start + BLOCK)
            pos = torch.arange(start, end, device=device).repeat_interleave(g)  # (rows,)
            out.append((start, end, pos[:, None] >= keys[None, :end]))  # (rows, end)
    return out


def packed_causal_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal self-attention, exact, computed as described in the module docstring.

        query (B, H, T, D) -> (B, Hkv, T*G, D): row t*G + g is query head j*G + g at position t
        key, value (B, Hkv, T, D): read as they are, block i reads positions [0, end_i)
        out (B, Hkv, T, G, D) -> (B, T, H, D), the layout attention functions return

    Calls it does not cover go to transformers' SDPA function with their arguments unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    B, H, T, D = query.shape  # noqa: N806 (the shapes' usual names)
    Hkv = key.shape[1]  # noqa: N806
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", None)
    if (
        query.device.type != "cpu"
        or attention_mask is not None
        or is_causal is not True
        or key.shape[2] != T
        or T <= BLOCK
        or H % Hkv
        or (dropout and module.training)
        or any(kwargs.get(k) is not None for k in _UNSUPPORTED)
    ):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    g = H // Hkv
    rows = query.view(B, Hkv, g, T, D).transpose(2, 3).reshape(B, Hkv, T * g, D)  # (B, Hkv, T*G, D)
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            rows[:, :, start * g : end * g], key[:, :, :end], value[:, :, :end], attn_mask=mask, scale=scaling
        )  # (B, Hkv, (end-start)*G, D)
        for start, end, mask in _masks(T, g, query.device)
    ]
    out = torch.cat(outs, dim=2).view(B, Hkv, T, g, D)
    return out.permute(0, 2, 1, 3, 4).reshape(B, T, H, D), None


def use_packed_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """Switch ``model`` (a converted model of the layer walk) from transformers' SDPA to
    :func:`packed_causal_attention` when it runs on the CPU. True if switched; a model on another
    implementation (eager, flash, one of our family classes' own kernels) or a GPU is left alone."""
    if device.type != "cpu":
        return False
    try:  # transformers >= 4.48: the registry is public
        from transformers import AttentionInterface
    except ImportError:
        return False
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(
        model, "set_attn_implementation"
    ):
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_causal_attention)
    try:
        model.set_attn_implementation(PACKED_ATTENTION)
    except (ValueError, ImportError):  # a transformers that checks names against its own list
        return False
    return config._attn_implementation == PACKED_ATTENTION
