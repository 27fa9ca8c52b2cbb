"""Greedy decoding the way a server runs it: transformers' static KV cache and a compiled decode step.

``model.generate`` runs every step through an eager Python loop (logits processors, stopping
criteria, cache bookkeeping); at moderate batch sizes that overhead, not reading the KV cache, sets
the pace, and hides what a smaller cache saves. This path keeps the model and the cache stock:

- a :class:`transformers.StaticCache` sized for the prompt plus the new tokens, allocated once per
  (model, batch, length) and reset between runs (a fixed address is what CUDA graphs replay);
- the prompt in one eager forward pass that keeps only the last position's logits;
- each decode step through ``torch.compile(model.forward)``: ``mode="reduce-overhead"`` on a GPU (CUDA
  graphs: one launch per step), the default inductor mode on CPU;
- greedy (argmax) tokens, so the tokens equal ``generate``'s greedy tokens (tests check it).

The model is called through its documented forward arguments only: the cache keyword is ``cache``
(transformers >= 5.24) or ``past_key_values`` (earlier), read from the forward's signature, and
``cache_position`` is passed where the forward takes one (transformers < 5.24).
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

PATHS = ("eager", "static")
"""Decode paths ``gqa-eval --decode-path`` takes: ``generate``'s eager loop, or this module's."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_keywords(model: Any) -> tuple[str, bool]:
    """(the forward's cache keyword, whether it takes ``cache_position``) from its public signature."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "cache_position" in params


GQA_DECODE_ATTENTION = "gqa_uptrain_sdpa"
"""Name our decode attention is registered under in transformers' public ``AttentionInterface``."""

# Keywords of attention variants the packed decode does not implement (logit soft-capping, attention
# sinks, learned position biases): a layer that passes one gets transformers' own SDPA function.
_UNPACKED = ("softcap", "s_aux", "sinks", "position_bias")


def gqa_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA that reads a grouped K/V cache in place when one token is decoded, compiled or not.

    transformers' SDPA function packs the G query heads of a K/V head into rows only in eager mode;
    under ``torch.compile`` with a mask (a static cache always has one) it falls back to ``repeat_kv``,
    which copies the whole cache to H heads every step: on CPU the GQA model then decoded at 0.44x its
    MHA original's speed (``scripts/bench_decode_static.py``). Here, for a single query position:

        query (B, H, 1, D) -> (B, Hkv, G, D): the G heads of a K/V head become G query rows
        key, value (B, Hkv, S, D): read as they are; mask (B, 1, 1, S) broadcasts over heads and rows
        out (B, Hkv, G, D) -> (B, 1, H, D), the layout attention functions return

    Prompts (several positions), MHA layers and the variants in ``_UNPACKED`` go to transformers' own
    SDPA function unchanged.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    B, H, T, D = query.shape  # noqa: N806 (the shapes' usual names)
    Hkv = key.shape[1]  # noqa: N806
    grouped = Hkv < H
    mask_ok = attention_mask is None or attention_mask.shape[1] == 1
    if T != 1 or not grouped or not mask_ok or any(kwargs.get(k) is not None for k in _UNPACKED):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    q = query.reshape(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=scaling
    )  # (B, Hkv, G, D)
    return out.reshape(B, 1, H, D), None


def use_gqa_decode_attention(model: Any) -> bool:
    """Switch ``model`` from transformers' SDPA to :func:`gqa_decode_attention` (registered once in the
    public ``AttentionInterface``); other implementations (eager, flash) are left alone. True if switched."""
    try:  # transformers >= 4.53: both registries are public
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(GQA_DECODE_ATTENTION, gqa_decode_attention)
    # The same masks as SDPA's: an unknown implementation gets none, and a static cache's empty
    # slots would then be attended to.
    AttentionMaskInterface.register(GQA_DECODE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(GQA_DECODE_ATTENTION)
    return True


@dataclass
class StaticDecoder:
    """A model with a static cache for ``batch`` sequences of up to ``max_len`` tokens and a compiled step.

    Build one per (model, batch, max_len) and call :meth:`generate` as often as needed: the cache is
    reset, not reallocated, and the compiled step is reused. ``compile=False`` runs the same loop
    eagerly (for comparison and debugging).
    """

    model: Any
    batch: int
    max_len: int
    compile: bool = True
    backend: str = "inductor"
    """``torch.compile`` backend: ``inductor`` (generated kernels; ``reduce-overhead`` mode on a GPU) or
    ``cudagraphs`` (transformers' own kernels replayed as CUDA graphs: compiles in seconds), or ``eager``
    (traced by dynamo, run eagerly: checks the path end to end in seconds on a CPU)."""
    prefill_chunk: int | None = None
    """Process the prompt this many tokens at a time (bounds prefill activations; None: all at once)."""
    _cache: Any = field(init=False, repr=False)
    _step: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from transformers import StaticCache

        self.device = next(self.model.parameters()).device
        self.cache_kw, self.takes_cache_position = forward_keywords(self.model)
        self._cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        # A grouped cache is read in place by the compiled step (see gqa_decode_attention).
        if use_gqa_decode_attention(self.model):
            logger.debug("static decode: packed GQA attention")
        self._step = self.model.forward
        if self.compile:
            # Each decoder gets fresh compiled code: recompiling for every (batch, length) setting would
            # soon hit dynamo's recompile limit and fall back to eager without saying so.
            torch.compiler.reset()
            if self.backend == "inductor":
                mode = "reduce-overhead" if self.device.type == "cuda" else None
                self._step = torch.compile(self.model.forward, mode=mode, dynamic=False, fullgraph=True)
            else:
                self._step = torch.compile(
                    self.model.forward, backend=self.backend, dynamic=False, fullgraph=True
                )

    def _forward(self, fn: Any, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``fn`` on ``ids`` ``(B, T)`` at positions ``start..start+T-1``; last position's logits ``(B, V)``."""
        B, T = ids.shape
        positions = torch.arange(start, start + T, device=self.device)  # (T,)
        kwargs = {
            "input_ids": ids,
            "position_ids": positions.unsqueeze(0).expand(B, T),
            self.cache_kw: self._cache,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        if self.takes_cache_position:
            kwargs["cache_position"] = positions
        return fn(**kwargs).logits[:, -1]

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, new_tokens: int, stamps: list[float] | None = None
    ) -> torch.Tensor:
        """Greedy ``new_tokens`` tokens after ``input_ids`` ``(batch, T)``; returns ``(batch, new_tokens)``.

        ``stamps`` (optional) receives ``time.perf_counter()`` after each token is known (the first
        after the prompt's forward pass), as :mod:`~gqa_uptrain.evaluation.speed` times ``generate``.
        """
        B, T = input_ids.shape
        if self.batch != B or T + new_tokens > self.max_len:
            raise ValueError(
                f"decoder built for batch {self.batch}, {self.max_len} tokens; got {B} x {T}+{new_tokens}"
            )
        self._cache.reset()
        tokens = []
        # Prefill eagerly: its shape changes with the prompt, and compiling it would cost more than it saves.
        chunk = self.prefill_chunk or T
        for start in range(0, T, chunk):
            logits = self._forward(self.model.forward, input_ids[:, start : start + chunk], start)
        tok = logits.argmax(-1)  # (B,)
        for i in range(new_tokens):
            if stamps is not None:
                _sync(self.device)
                stamps.append(time.perf_counter())
            tokens.append(tok)
            if i == new_tokens - 1:
                break
            # CUDA graphs replay into the same output buffer: take the argmax (a new tensor) before the next step.
            tok = self._forward(self._step, tok.unsqueeze(1), T + i).argmax(-1)
        return torch.stack(tokens, dim=1)  # (B, new_tokens)
