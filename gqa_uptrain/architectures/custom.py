"""Families with no GQA in transformers (GPT-2, GPT-NeoX, OPT, T5, BERT): the converted checkpoint
ships GQA modelling code of ours (``gqa_uptrain.modeling``) and loads with ``trust_remote_code``
(or with no remote code once ``gqa_uptrain`` is imported, which registers the same classes).

Each entry is data (see ``base.py``); the output layouts are documented in the modelling files and
are what the stock layouts become with fewer K/V heads:

* GPT-2 ``c_attn`` is a transposed ``Conv1D``: weight ``[C, (H+2G)*d]`` with columns ``[Q|K|V]``,
  so the packing runs along axis 1 (the bias along axis 0); ``c_proj`` (``[H*d, C]``) has the heads
  on its rows.
* GPT-NeoX ``query_key_value`` rows are interleaved per head, ``[H, 3, d]``: the ``grouped_qkv``
  packing with ``Hkv == H``; the converted rows are ``[G, g+2, d]`` (Falcon's layout).
* OPT: separate biased ``q/k/v_proj`` and ``out_proj``.
* T5: decoder self-attention and cross-attention are converted; the encoder stays MHA (the paper);
  ``relative_attention_bias`` is per query head and is copied untouched.
* BERT: encoder self-attention ``query/key/value`` with biases; an encoder keeps no KV cache.

Re-converting an already converted checkpoint (``gpt2_gqa`` with 4 K/V heads to 2) works too: the
``*_gqa`` model types are accepted and their ``num_key_value_heads`` read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from ..modeling import FAMILIES, GQAFamily
from .base import (
    NO_ROPE,
    PARTIAL_ROPE,
    Architecture,
    AttentionModule,
    Packing,
    RemoteCode,
    heads,
    standard_dims,
)


def _remote(family: GQAFamily) -> RemoteCode:
    return RemoteCode(
        model_type=family.model_type,
        files=family.files,
        auto_map=family.auto_map(),
        architectures=family.architectures,
    )


def _model_types(family: GQAFamily) -> tuple[str, ...]:
    return (family.stock_model_type, family.model_type)


def _int(key: str, default_key: str | None = None) -> Any:
    """A layer-count reader for config keys other than ``num_hidden_layers``."""

    def read(cfg: Mapping[str, Any]) -> int:
        value = cfg.get(key)
        if value is None and default_key is not None:
            value = cfg.get(default_key)
        if value is None:
            raise CheckpointError(f"config.json has no {key!r}; is this a complete checkpoint?")
        return int(value)

    return read


GPT2 = Architecture(
    name="GPT-2",
    rotary=NO_ROPE,
    model_types=_model_types(FAMILIES["gpt2"]),
    modules=(
        AttentionModule(
            pattern=r"h\.\d+\.attn",
            tensors={
                # Conv1D stores [in, out]: the packed Q|K|V axis is the weight's columns.
                "c_attn.weight": Packing("qkv_blocks", axis=1),
                "c_attn.bias": Packing("qkv_blocks"),
                "c_proj.weight": heads("o", axis=0),
            },
            dims=standard_dims(heads_key="n_head", hidden_key="n_embd", head_dim_key=None),
            count=_int("n_layer"),
        ),
    ),
    head_dim_key=None,
    remote_code=_remote(FAMILIES["gpt2"]),
    notes="Conv1D c_attn columns [Q|K|V]; cross-attention (if any) stays MHA",
)

GPT_NEOX = Architecture(
    name="GPT-NeoX",
    rotary=PARTIAL_ROPE,
    model_types=_model_types(FAMILIES["gpt_neox"]),
    modules=(
        AttentionModule(
            pattern=r"layers\.\d+\.attention",
            tensors={
                # Rows [Hkv, H/Hkv + 2, d]; the stock per-head interleaved [H, 3, d] is Hkv == H.
                "query_key_value.weight": Packing("grouped_qkv"),
                "query_key_value.bias": Packing("grouped_qkv"),
                "dense.weight": heads("o", axis=1),
            },
            dims=standard_dims(head_dim_key=None),
        ),
    ),
    head_dim_key=None,
    remote_code=_remote(FAMILIES["gpt_neox"]),
    notes="query_key_value interleaved per K/V group; partial rotary unaffected",
)

OPT = Architecture(
    name="OPT",
    rotary=NO_ROPE,
    model_types=_model_types(FAMILIES["opt"]),
    modules=(
        AttentionModule(
            pattern=r"layers\.\d+\.self_attn",
            tensors={
                "q_proj.weight": heads("q"),
                "q_proj.bias": heads("q"),
                "k_proj.weight": heads("k"),
                "k_proj.bias": heads("k"),
                "v_proj.weight": heads("v"),
                "v_proj.bias": heads("v"),
                "out_proj.weight": heads("o", axis=1),
            },
            dims=standard_dims(head_dim_key=None),
        ),
    ),
    head_dim_key=None,
    remote_code=_remote(FAMILIES["opt"]),
    notes="biases on q/k/v are merged with their heads",
)

_T5_TENSORS = {
    "q.weight": heads("q"),
    "k.weight": heads("k"),
    "v.weight": heads("v"),
    "o.weight": heads("o", axis=1),
}

T5 = Architecture(
    name="T5",
    rotary=NO_ROPE,
    model_types=_model_types(FAMILIES["t5"]),
    modules=(
        AttentionModule(
            pattern=r"decoder\.block\.\d+\.layer\.0\.SelfAttention",
            tensors=_T5_TENSORS,
            dims=standard_dims(heads_key="num_heads", hidden_key="d_model", head_dim_key="d_kv"),
            count=_int("num_decoder_layers", "num_layers"),
        ),
        AttentionModule(
            pattern=r"decoder\.block\.\d+\.layer\.1\.EncDecAttention",
            tensors=_T5_TENSORS,
            dims=standard_dims(heads_key="num_heads", hidden_key="d_model", head_dim_key="d_kv"),
            count=_int("num_decoder_layers", "num_layers"),
        ),
        # The encoder stays MHA whatever num_key_value_heads says: listed only for its shape checks.
        AttentionModule(
            pattern=r"encoder\.block\.\d+\.layer\.0\.SelfAttention",
            tensors=_T5_TENSORS,
            dims=standard_dims(heads_key="num_heads", kv_key=None, hidden_key="d_model", head_dim_key="d_kv"),
            convert=False,
            cached=False,
            count=_int("num_layers"),
        ),
    ),
    head_dim_key=None,
    remote_code=_remote(FAMILIES["t5"]),
    notes="decoder self- and cross-attention converted, encoder stays MHA, relative position bias untouched",
)

BERT = Architecture(
    name="BERT",
    rotary=NO_ROPE,
    model_types=_model_types(FAMILIES["bert"]),
    modules=(
        AttentionModule(
            pattern=r"encoder\.layer\.\d+\.attention",
            tensors={
                "self.query.weight": heads("q"),
                "self.query.bias": heads("q"),
                "self.key.weight": heads("k"),
                "self.key.bias": heads("k"),
                "self.value.weight": heads("v"),
                "self.value.bias": heads("v"),
                "output.dense.weight": heads("o", axis=1),
            },
            dims=standard_dims(head_dim_key=None),
            cached=False,  # an encoder keeps no KV cache: the saving is parameters and bandwidth
        ),
    ),
    head_dim_key=None,
    remote_code=_remote(FAMILIES["bert"]),
    notes="encoder self-attention; no KV cache to save",
)

CUSTOM: tuple[Architecture, ...] = (GPT2, GPT_NEOX, OPT, T5, BERT)
