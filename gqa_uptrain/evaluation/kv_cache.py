"""KV-cache size: computed from the config, and measured on the cache a model actually allocates.

The cache of one decoder layer holds a key and a value vector per K/V head per token, so

    bytes per token = 2 (K and V) x layers x num_kv_heads x head_dim x bytes per element

and for ``T`` tokens of context and a batch of ``B`` that is multiplied by ``B x T``. Two
refinements that real families need:

- encoder-decoder models (T5, BART) cache the decoder self-attention *and* the cross-attention
  keys/values of the encoder output; both count (the paper converts both, Ainslie et al. 2023 §3);
- sliding-window layers (Mistral, Gemma-2) keep at most ``sliding_window - 1`` past tokens.

One calculator: for the families :mod:`gqa_uptrain.architectures` describes (the ones the converter
handles), bytes per token is :meth:`~gqa_uptrain.architectures.Architecture.kv_cache_bytes_per_token`,
the figure ``gqa-convert`` reports; the layout read here only places those bytes per layer (sliding
windows, self- vs cross-attention). For other families (Falcon, GPT-BigCode, ...) the layout read from
the config is the only source, and gives the figure by the formula above.

The computation is checked against :func:`allocated_cache_bytes`, the sum of the bytes of the K/V
tensors in the cache ``model.generate`` returns, so a family whose cache does not follow its config
(or a GQA model that caches repeated K/V heads, saving nothing) shows up as a mismatch instead of
as a saving it does not deliver. One such family in transformers 5: Falcon with
``new_decoder_architecture`` expands its ``num_kv_heads`` K/V heads to all query heads *before*
caching them, so its cache is as large as MHA's whatever ``num_kv_heads`` says.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..architectures import get_architecture
from ..errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


@dataclass
class KVLayout:
    """What decides the size of a model's KV cache, read from its config."""

    family: str  # config.model_type
    num_layers: int  # decoder layers (the encoder has no KV cache at decode time)
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    bytes_per_element: int
    cross_attention: bool  # encoder-decoder: each decoder layer also caches the encoder's K/V
    sliding_layers: int = 0  # layers that keep at most ``sliding_window - 1`` past tokens
    sliding_window: int | None = None
    bytes_per_token: int = -1
    """Cache bytes one token of context adds (no sliding-window cap; self + cross for enc-dec).
    Left out (-1), it is computed from the fields above."""
    source: str = "config"
    """Where ``bytes_per_token`` comes from: ``architectures`` or ``config`` (the layout above)."""

    def __post_init__(self) -> None:
        if self.bytes_per_token < 0:
            per_layer = 2 * self.num_kv_heads * self.head_dim * self.bytes_per_element
            self.bytes_per_token = per_layer * self.num_layers * self._caches_per_layer

    @property
    def _caches_per_layer(self) -> int:
        return 2 if self.cross_attention else 1  # encoder-decoder: self- and cross-attention

    @property
    def attention(self) -> str:
        """MHA, GQA or MQA, from the head counts."""
        if self.num_kv_heads == self.num_attention_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    def cache_bytes(self, context: int, batch: int = 1, decoder_tokens: int | None = None) -> int:
        """Bytes of the cache holding ``context`` tokens for ``batch`` sequences.

        Encoder-decoder models: ``context`` is the encoder input length (cross-attention cache) and
        ``decoder_tokens`` (default: ``context``) the tokens in the decoder self-attention cache.
        """
        self_tokens = context
        if self.cross_attention and decoder_tokens is not None:
            self_tokens = decoder_tokens
        full_layers = self.num_layers - self.sliding_layers
        tokens = full_layers * self_tokens
        if self.sliding_layers:
            tokens += self.sliding_layers * min(self_tokens, (self.sliding_window or self_tokens + 1) - 1)
        if self.cross_attention:
            tokens += self.num_layers * context
        # Every cache of every layer is the same size per token: ``bytes_per_token`` split evenly
        # (multiplied first, so the division is exact).
        return batch * tokens * self.bytes_per_token // (self.num_layers * self._caches_per_layer)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view, with the derived figures."""
        d = asdict(self)
        d["attention"] = self.attention
        return d


def _first_int(cfg: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def kv_layout(config: Any, dtype: torch.dtype) -> KVLayout:
    """Read the cache layout of ``config`` (any transformers config, ours included) for cache ``dtype``.

    Handles configs without ``num_key_value_heads`` (MHA: GPT-2, GPT-NeoX, OPT, T5), Falcon's
    ``multi_query`` / ``new_decoder_architecture``, GPT-BigCode's ``multi_query``, explicit
    ``head_dim`` (Gemma), T5's ``d_kv`` and ``num_decoder_layers``, and nested text configs.
    """
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    family = str(getattr(config, "model_type", "") or type(config).__name__)

    if enc_dec:
        layers = _first_int(cfg, "num_decoder_layers", "decoder_layers", "num_layers", "num_hidden_layers")
        heads = _first_int(
            cfg, "num_decoder_heads", "decoder_attention_heads", "num_heads", "num_attention_heads"
        )
    else:
        layers = _first_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
        heads = _first_int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if layers is None or heads is None:
        raise ConfigError(
            f"cannot read the number of layers / attention heads from the {family} config; "
            "this family is not supported by the KV-cache computation"
        )

    kv_heads = _first_int(cfg, "num_key_value_heads")
    if kv_heads is None:
        if getattr(cfg, "new_decoder_architecture", False):  # Falcon-40B style: explicit group count
            kv_heads = _first_int(cfg, "num_kv_heads")
        elif getattr(cfg, "multi_query", False):  # Falcon-7B, GPT-BigCode (SantaCoder, StarCoder 1)
            kv_heads = 1
    kv_heads = kv_heads or heads

    head_dim = _first_int(cfg, "head_dim", "d_kv")
    if head_dim is None:
        hidden = _first_int(cfg, "hidden_size", "n_embd", "d_model")
        if hidden is None:
            raise ConfigError(
                f"cannot read the head size from the {family} config (no head_dim / hidden_size)"
            )
        head_dim = hidden // heads

    # Sliding-window layers (bounded cache): from layer_types when the config lists them, else a
    # global sliding_window that applies to every layer (Mistral); Qwen2 says use_sliding_window.
    window = _first_int(cfg, "sliding_window")
    sliding = 0
    layer_types = getattr(cfg, "layer_types", None)
    if window is not None:
        if layer_types:
            sliding = sum(1 for t in layer_types[:layers] if t == "sliding_attention")
        elif getattr(cfg, "use_sliding_window", True):
            sliding = layers

    itemsize = torch.empty((), dtype=dtype).element_size()
    known = _architecture_bytes_per_token(config, itemsize)
    return KVLayout(
        family=family,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        bytes_per_element=itemsize,
        cross_attention=enc_dec,
        sliding_layers=sliding,
        sliding_window=window if sliding else None,
        bytes_per_token=-1 if known is None else known,
        source="config" if known is None else "architectures",
    )


def _architecture_bytes_per_token(config: Any, itemsize: int) -> int | None:
    """The converter's figure for a family :mod:`gqa_uptrain.architectures` describes, else None."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    try:
        arch = get_architecture(raw)
    except CheckpointError:
        return None  # a family the converter does not handle: the layout read above decides
    try:
        return arch.kv_cache_bytes_per_token(raw, None, itemsize)
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        logger.debug("%s: KV-cache bytes from the config layout (%s)", arch.name, e)
        return None


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every K/V tensor reachable from a cache object (new Cache classes or legacy tuples)."""
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    # EncoderDecoderCache: decoder self-attention + cross-attention caches.
    if hasattr(obj, "self_attention_cache") and hasattr(obj, "cross_attention_cache"):
        return _tensor_bytes(obj.self_attention_cache) + _tensor_bytes(obj.cross_attention_cache)
    # transformers >= 4.56 Cache: a list of layers, each with .keys / .values (None until used).
    if hasattr(obj, "layers"):
        return sum(
            _tensor_bytes(getattr(layer, "keys", None)) + _tensor_bytes(getattr(layer, "values", None))
            for layer in obj.layers
        )
    # Legacy tuple-of-tuples caches (remote code written for older transformers).
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(x) for x in obj)
    raise TypeError(f"unrecognised KV cache object {type(obj).__name__}")


def allocated_cache_bytes(cache: Any) -> int:
    """Bytes held by the K/V tensors of the cache a model returned (``past_key_values``)."""
    return _tensor_bytes(cache)


@dataclass
class KVCacheCheck:
    """The cache size at one (context, batch), computed from the config and checked on a generation.

    ``computed_bytes`` is the cache holding ``context`` tokens. The check generates
    ``generated_tokens`` tokens greedily after a ``context``-token prompt and compares the tensors
    of the cache ``generate`` returns (``allocated_bytes``) with what the config predicts for the
    tokens that cache then holds (``expected_bytes``).
    """

    context: int
    batch: int
    computed_bytes: int
    generated_tokens: int
    expected_bytes: int
    allocated_bytes: int

    @property
    def match(self) -> bool:
        """Whether the config-derived size is exactly the size of the tensors in the cache."""
        return self.expected_bytes == self.allocated_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {**asdict(self), "match": self.match}


@torch.no_grad()
def measure_cache(
    model: Any, layout: KVLayout, context: int, batch: int, generated_tokens: int = 2, seed: int = 0
) -> KVCacheCheck:
    """Generate ``generated_tokens`` tokens after a random ``context``-token prompt; size the cache.

    After greedy generation of ``n`` tokens a decoder-only cache holds ``context + n - 1`` tokens
    (the last token is never fed back); an encoder-decoder cache holds ``context`` encoder tokens
    (cross-attention) and ``n`` decoder tokens (the start token plus ``n - 1`` generated).
    Token ids are random: the cache size does not depend on the text.
    """
    device = next(model.parameters()).device
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)  # (B, T)
    gen_cfg = model.generation_config
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=generated_tokens,
        min_new_tokens=generated_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        return_dict_in_generate=True,
        pad_token_id=gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else 0,
    )
    allocated = allocated_cache_bytes(out.past_key_values)
    if layout.cross_attention:
        expected = layout.cache_bytes(context, batch, decoder_tokens=generated_tokens)
    else:
        expected = layout.cache_bytes(context + generated_tokens - 1, batch)
    check = KVCacheCheck(
        context=context,
        batch=batch,
        computed_bytes=layout.cache_bytes(context, batch),
        generated_tokens=generated_tokens,
        expected_bytes=expected,
        allocated_bytes=allocated,
    )
    if not check.match:
        logger.warning(
            "KV cache of %s after generating at context %d, batch %d: the config predicts %d bytes, "
            "the model allocated %d (it does not store the K/V heads its config declares)",
            layout.family,
            context,
            batch,
            expected,
            allocated,
        )
    return check
