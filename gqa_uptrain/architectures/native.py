"""Families whose transformers config has ``num_key_value_heads``: the converted checkpoint loads
with stock transformers and no custom code. Each entry is data; see ``base.py`` for the meaning."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .base import (
    PARTIAL_ROPE,
    Architecture,
    AttentionModule,
    FusedParam,
    Norm,
    Packing,
    Rotary,
    heads,
    standard_dims,
)

# q/k/v/o projections as separate Linear layers, heads stacked on the output rows; o_proj's
# input columns are the concatenated heads. Biases, where a family has them, follow their rows.
SEPARATE_QKVO = {
    "q_proj.weight": heads("q"),
    "q_proj.bias": heads("q"),
    "k_proj.weight": heads("k"),
    "k_proj.bias": heads("k"),
    "v_proj.weight": heads("v"),
    "v_proj.bias": heads("v"),
    "o_proj.weight": heads("o", axis=1),
}


def _llama_like(
    name: str,
    model_types: tuple[str, ...],
    *,
    extra: Mapping[str, Packing] | None = None,
    norms: Mapping[str, Norm] | None = None,
    rotary: Rotary = Rotary("full"),
    out_proj: str = "o_proj",
    head_dim_key: str | None = "head_dim",
    notes: str = "",
    extra_checks: tuple = (),
) -> Architecture:
    tensors = dict(SEPARATE_QKVO)
    if out_proj != "o_proj":
        del tensors["o_proj.weight"]
        tensors[f"{out_proj}.weight"] = heads("o", axis=1)
    tensors.update(extra or {})
    module = AttentionModule(
        pattern=r"layers\.\d+\.self_attn",
        tensors=tensors,
        dims=standard_dims(head_dim_key=head_dim_key or "head_dim"),
        norms=dict(norms or {}),
    )
    return Architecture(
        name=name,
        model_types=model_types,
        modules=(module,),
        rotary=rotary,
        head_dim_key=head_dim_key,
        notes=notes,
        extra_checks=extra_checks,
    )


# Mixtral's sparse MLP as transformers 5 builds it from the checkpoint's ``block_sparse_moe``: the
# router renamed, and per expert ``w1`` (gate) / ``w3`` (up) stacked into ``gate_up_proj``
# ``[E, 2I, n]`` (gate rows first) and ``w2`` into ``down_proj`` ``[E, n, I]``.
MIXTRAL_MOE = (
    FusedParam("mlp.gate.weight", ("block_sparse_moe.gate.weight",)),
    FusedParam(
        "mlp.experts.gate_up_proj",
        ("block_sparse_moe.experts.{i}.w1.weight", "block_sparse_moe.experts.{i}.w3.weight"),
        cat_axis=1,
    ),
    FusedParam("mlp.experts.down_proj", ("block_sparse_moe.experts.{i}.w2.weight",)),
)

NATIVE: tuple[Architecture, ...] = (
    _llama_like("Llama", ("llama",)),
    _llama_like("Mistral", ("mistral",)),
    replace(_llama_like("Mixtral", ("mixtral",)), fused_params=MIXTRAL_MOE),
    _llama_like("Qwen2", ("qwen2",), head_dim_key=None, notes="biases on q/k/v are merged with their heads"),
    _llama_like(
        "Qwen3",
        ("qwen3",),
        norms={"q_norm.weight": Norm("q", "shared"), "k_norm.weight": Norm("k", "shared")},
        notes="q_norm/k_norm are one [head_dim] weight shared by all heads and stay unchanged",
    ),
    _llama_like("Gemma", ("gemma",)),
    _llama_like("Gemma2", ("gemma2",)),
    _llama_like("Granite", ("granite",), head_dim_key=None),
    _llama_like("OLMo", ("olmo",), head_dim_key=None),
    _llama_like(
        "OLMo2",
        ("olmo2",),
        head_dim_key=None,
        # OLMo2 normalises the whole K projection: its [Hkv*d] weight changes with the heads.
        extra={"q_norm.weight": heads("q"), "k_norm.weight": heads("k")},
        norms={"q_norm.weight": Norm("q", "heads"), "k_norm.weight": Norm("k", "heads")},
        notes="k_norm spans the whole K projection and is merged with the K heads",
    ),
    _llama_like(
        "Phi",
        ("phi",),
        out_proj="dense",
        head_dim_key=None,
        rotary=PARTIAL_ROPE,
        notes="partial rotary is unaffected",
    ),
    _llama_like(
        "StableLM",
        ("stablelm",),
        head_dim_key=None,
        # qk_layernorm keeps one LayerNorm module per head: one [d] tensor per K/V head.
        extra={
            "q_layernorm.norms.{i}.weight": heads("q"),
            "k_layernorm.norms.{i}.weight": heads("k"),
            "q_layernorm.norms.{i}.bias": heads("q"),
            "k_layernorm.norms.{i}.bias": heads("k"),
        },
        norms={
            f"{r}_layernorm.norms.{{i}}.{p}": Norm(r, "heads")  # type: ignore[arg-type]
            for r in ("q", "k")
            for p in ("weight", "bias")
        },
        rotary=PARTIAL_ROPE,
        notes="qk_layernorm's per-head K norms are merged like the heads",
    ),
    _llama_like("Starcoder2", ("starcoder2",), head_dim_key=None),
    Architecture(
        name="Phi-3",
        model_types=("phi3",),
        modules=(
            AttentionModule(
                pattern=r"layers\.\d+\.self_attn",
                # Fused rows [Q (H*d) | K (Hkv*d) | V (Hkv*d)].
                tensors={"qkv_proj.weight": Packing("qkv_blocks"), "o_proj.weight": heads("o", axis=1)},
                dims=standard_dims(),
            ),
        ),
        head_dim_key=None,
        notes="fused qkv_proj rows [Q|K|V]",
    ),
)
