"""GQA modelling for GPT-2, GPT-NeoX, OPT, T5 and BERT, and the shared grouped-query attention core.

What users rely on:
- with ``num_key_value_heads == num_heads`` and the stock weights, each variant computes exactly what
  the stock transformers model computes (eager and SDPA);
- with fewer K/V heads, each variant computes what the stock model computes once its K/V heads are
  made identical within each group (an oracle independent of our modelling code), in the parameter
  layout documented in each modelling file;
- generation with the KV cache gives the tokens generation without it gives, and the cache holds the
  reduced number of heads; training produces gradients on every parameter;
- a saved model loads with ``trust_remote_code`` from its folder alone where ``gqa_uptrain`` cannot
  be imported, and through our Auto registration where it can.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import pytest
import safetensors
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import DynamicCache, EncoderDecoderCache

from gqa_uptrain.modeling import FAMILIES, get_family, register_auto_classes
from gqa_uptrain.modeling.gqa_attention import (
    GroupedQueryAttention,
    GroupedQueryAttentionError,
    eager_grouped_attention,
    sdpa_grouped_attention,
)

VOCAB = 128
H = 4  # query heads of every tiny model
D = 8  # head dim


@dataclass(frozen=True)
class Family:
    """A tiny model of one family: stock and GQA classes, config, inputs, and how to read its output."""

    model_type: str  # stock model_type
    stock_config: str  # transformers config class name
    stock_model: str  # transformers model class name (the one the tests compare)
    gqa_model: str  # our class name, in the family's modelling module
    auto_class: str  # the Auto class that loads it
    config: dict = field(default_factory=dict)
    generates: bool = True

    @property
    def seq2seq(self) -> bool:
        return self.model_type == "t5"

    def stock_cls(self):
        return getattr(transformers, self.stock_model)

    def gqa_cls(self):
        return getattr(FAMILIES[self.model_type].load(), self.gqa_model)

    def gqa_config(self, num_kv_heads: int | None = None, **extra):
        module = FAMILIES[self.model_type].load()
        config_cls = getattr(module, FAMILIES[self.model_type].auto_classes["AutoConfig"])
        return config_cls(**self.config, num_key_value_heads=num_kv_heads, **extra)

    def stock_config_obj(self, **extra):
        return getattr(transformers, self.stock_config)(**self.config, **extra)


FAMILY_SPECS: dict[str, Family] = {
    "gpt2": Family(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        "GPT2GQALMHeadModel",
        "AutoModelForCausalLM",
        dict(
            vocab_size=VOCAB,
            n_embd=H * D,
            n_layer=2,
            n_head=H,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "gpt_neox": Family(
        "gpt_neox",
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        "GPTNeoXGQAForCausalLM",
        "AutoModelForCausalLM",
        # rotary_pct 0.5: partial rotary, as Pythia (0.25) has
        dict(
            vocab_size=VOCAB,
            hidden_size=H * D,
            num_hidden_layers=2,
            num_attention_heads=H,
            intermediate_size=64,
            rotary_pct=0.5,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
    ),
    "opt": Family(
        "opt",
        "OPTConfig",
        "OPTForCausalLM",
        "OPTGQAForCausalLM",
        "AutoModelForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=H * D,
            num_hidden_layers=2,
            num_attention_heads=H,
            ffn_dim=64,
            max_position_embeddings=64,
            word_embed_proj_dim=H * D,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    "t5": Family(
        "t5",
        "T5Config",
        "T5ForConditionalGeneration",
        "T5GQAForConditionalGeneration",
        "AutoModelForSeq2SeqLM",
        dict(
            vocab_size=VOCAB,
            d_model=H * D,
            d_kv=D,
            d_ff=64,
            num_layers=2,
            num_heads=H,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=2,
        ),
    ),
    "bert": Family(
        "bert",
        "BertConfig",
        "BertModel",
        "BertGQAModel",
        "AutoModel",
        dict(
            vocab_size=VOCAB,
            hidden_size=H * D,
            num_hidden_layers=2,
            num_attention_heads=H,
            intermediate_size=64,
        ),
        generates=False,
    ),
}
FAMILY_NAMES = list(FAMILY_SPECS)


def inputs(family: Family, batch: int = 2, seq: int = 10, padded: bool = True, seed: int = 1) -> dict:
    """Token ids (row 1 left-padded when ``padded``) in the form the family's forward takes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded and batch > 1:
        mask[1, :3] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if family.seq2seq:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 6), generator=g)
    return out


@torch.no_grad()
def output(model, batch: dict) -> torch.Tensor:
    """Logits, or the encoder's last hidden state for a bare encoder."""
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---------------------------------------------------------------------------------------------------
# Stock-layout helpers, written independently of the modelling code: make K/V heads identical within
# each group of a *stock* model, and build the GQA state dict from such a model.
# ---------------------------------------------------------------------------------------------------


def _tie_rows(t: torch.Tensor, groups: int, start: int = 0, n: int = H, axis: int = 0) -> None:
    """In ``t`` along ``axis``, heads ``[start, start + n*D)`` (n heads of D): copy each group's first."""
    x = t.movedim(axis, 0)[start : start + n * D]
    block = x.view(groups, n // groups, D, *x.shape[1:])
    block.copy_(block[:, :1].expand_as(block))


def _kv_linears(model, model_type: str):
    """Every stock K/V ``nn.Linear`` that GQA converts (OPT, T5 decoder, BERT)."""
    for name, m in model.named_modules():
        if model_type == "opt" and name.endswith("self_attn"):
            yield m.k_proj
            yield m.v_proj
        elif (
            model_type == "t5"
            and name.startswith("decoder")
            and name.endswith(("SelfAttention", "EncDecAttention"))
        ):
            yield m.k
            yield m.v
        elif model_type == "bert" and name.endswith("attention.self"):
            yield m.key
            yield m.value


@torch.no_grad()
def tie_kv_heads(model, model_type: str, groups: int) -> None:
    """Make each group of ``H // groups`` K/V heads of a stock model identical (copies of its first)."""
    if model_type == "gpt2":
        for block in model.transformer.h:
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # [C, 3C] columns [Q|K|V], [3C]
            for start in (H * D, 2 * H * D):
                _tie_rows(w, groups, start, axis=1)
                _tie_rows(b, groups, start)
    elif model_type == "gpt_neox":
        for layer in model.gpt_neox.layers:
            qkv = layer.attention.query_key_value  # rows [H, 3, D]
            for t in (qkv.weight, qkv.bias):
                per_head = t.view(groups, H // groups, 3, D, *t.shape[1:])
                for role in (1, 2):  # K, V
                    per_head[:, :, role] = per_head[:, :1, role].expand_as(per_head[:, :, role])
    else:
        for lin in _kv_linears(model, model_type):
            _tie_rows(lin.weight, groups)
            if lin.bias is not None:
                _tie_rows(lin.bias, groups)


def gqa_state_dict(
    stock_sd: dict[str, torch.Tensor], model_type: str, groups: int
) -> dict[str, torch.Tensor]:
    """The GQA state dict of a stock model whose K/V heads are tied, in the documented layouts."""
    g = H // groups
    out = dict(stock_sd)

    def first_of_group(t: torch.Tensor, start: int = 0, axis: int = 0) -> torch.Tensor:
        x = t.movedim(axis, 0)[start : start + H * D]
        return x.reshape(groups, g, D, *x.shape[1:])[:, 0].reshape(groups * D, *x.shape[1:]).movedim(0, axis)

    for name, t in stock_sd.items():
        if model_type == "gpt2" and name.endswith("attn.c_attn.weight"):  # [C, (H+2G)D] columns [Q|K|V]
            out[name] = torch.cat(
                [t[:, : H * D], first_of_group(t, H * D, 1), first_of_group(t, 2 * H * D, 1)], 1
            )
        elif model_type == "gpt2" and name.endswith("attn.c_attn.bias"):
            out[name] = torch.cat([t[: H * D], first_of_group(t, H * D), first_of_group(t, 2 * H * D)])
        elif model_type == "gpt_neox" and name.endswith("query_key_value." + name.rsplit(".", 1)[-1]):
            x = t.view(groups, g, 3, D, *t.shape[1:])  # stock rows [H, 3, D]
            q, k, v = x[:, :, 0], x[:, :1, 1], x[:, :1, 2]  # [G, g, D], [G, 1, D], [G, 1, D]
            out[name] = torch.cat([q, k, v], 1).reshape(-1, *t.shape[1:])  # rows [G, g+2, D]
        elif (
            (model_type == "opt" and name.rsplit(".", 2)[-2] in ("k_proj", "v_proj"))
            or (
                model_type == "t5"
                and name.startswith("decoder")
                and name.endswith(("Attention.k.weight", "Attention.v.weight"))
            )
            or (
                model_type == "bert"
                and name.rsplit(".", 2)[-2] in ("key", "value")
                and "attention.self" in name
            )
        ):
            out[name] = first_of_group(t)
    return out


# ---------------------------------------------------------------------------------------------------
# The standalone core
# ---------------------------------------------------------------------------------------------------


def reference_attention(q, k, v, mask_bool=None, scaling=None):
    """Naive MHA with the K/V heads repeated (repeat_interleave): what GQA must compute."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * (scaling or q.shape[-1] ** -0.5)
    if mask_bool is not None:
        s = s.masked_fill(~mask_bool, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(6, 4), (8, 3), (4, 0)])
def test_core_rejects_heads_that_do_not_group(num_heads, num_kv_heads):
    with pytest.raises(GroupedQueryAttentionError, match="num_key_value_heads") as e:
        GroupedQueryAttention(48, num_heads, num_kv_heads)
    assert isinstance(e.value, ValueError)
    assert "\n" not in str(e.value)


def test_core_rejects_bad_geometry():
    with pytest.raises(GroupedQueryAttentionError, match="head_dim"):
        GroupedQueryAttention(50, 4, 2)
    with pytest.raises(GroupedQueryAttentionError, match="rotary"):
        GroupedQueryAttention(32, 4, 2, rope_theta=10000.0, partial_rotary_factor=0.1)
    with pytest.raises(GroupedQueryAttentionError, match="attn_implementation"):
        GroupedQueryAttention(32, 4, 2, attn_implementation="flash")


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("rope", [None, 0.5], ids=["norope", "partial-rope"])
def test_core_shapes_and_sdpa_equals_eager(num_kv_heads, rope):
    torch.manual_seed(0)
    kw = dict(bias=True, rope_theta=None if rope is None else 10000.0, partial_rotary_factor=rope or 1.0)
    sdpa = GroupedQueryAttention(32, 4, num_kv_heads, **kw).eval()
    eager = GroupedQueryAttention(32, 4, num_kv_heads, attn_implementation="eager", **kw).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.k_proj.weight.shape == (num_kv_heads * 8, 32)
    assert sdpa.v_proj.bias.shape == (num_kv_heads * 8,)
    x = torch.randn(2, 7, 32)
    pad = torch.ones(2, 7, dtype=torch.long)
    pad[0, :2] = 0
    for mask in (None, pad):
        a, none = sdpa(x, attention_mask=mask)
        b, probs = eager(x, attention_mask=mask)
        assert a.shape == (2, 7, 32) and none is None
        assert probs.shape == (2, 4, 7, 7)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # causal: the first token attends only to itself
    assert torch.allclose(probs[1, :, 0, 0], torch.ones(4))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_core_kernels_match_repeated_kv_reference(impl):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    want = reference_attention(q, k, v, causal)
    if impl == "sdpa":
        got, _ = sdpa_grouped_attention(q, k, v, is_causal=True)
    else:
        got, _ = eager_grouped_attention(q, k, v, causal[None, None])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_core_sdpa_uses_native_grouped_heads(monkeypatch):
    """SDPA gets the G K/V heads as they are (enable_gqa), never a repeat_kv copy."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn = GroupedQueryAttention(32, 4, 2).eval()
    pad = torch.ones(1, 5, dtype=torch.long)
    attn(torch.randn(1, 5, 32))
    attn(torch.randn(1, 5, 32), attention_mask=pad)
    assert seen == [(4, 2, True), (4, 2, True)]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_core_kv_cache_decoding_matches_full_pass(impl):
    torch.manual_seed(0)
    attn = GroupedQueryAttention(32, 4, 2, rope_theta=10000.0, attn_implementation=impl).eval()
    x = torch.randn(2, 9, 32)
    full, _ = attn(x)
    cache = DynamicCache()
    steps = [attn(x[:, :5], past_key_values=cache)[0]]
    steps += [attn(x[:, t : t + 1], past_key_values=cache)[0] for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].keys.shape == (2, 2, 9, 8)  # [B, G, S, d]: the reduced cache


def test_core_trains():
    attn = GroupedQueryAttention(32, 4, 1, bias=True, rope_theta=10000.0, dropout=0.1).train()
    attn(torch.randn(2, 6, 32))[0].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())


# ---------------------------------------------------------------------------------------------------
# The family variants
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity_warning()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_variant_at_full_heads_is_the_stock_model(name, impl):
    fam = FAMILY_SPECS[name]
    torch.manual_seed(0)
    stock = fam.stock_cls()(fam.stock_config_obj(attn_implementation=impl)).eval()
    gqa = fam.gqa_cls()(fam.gqa_config(attn_implementation=impl)).eval()
    assert gqa.config.num_key_value_heads == H
    stock_sd, gqa_sd = stock.state_dict(), gqa.state_dict()
    assert {k: v.shape for k, v in gqa_sd.items()} == {k: v.shape for k, v in stock_sd.items()}
    gqa.load_state_dict(stock_sd)
    for padded in (False, True):
        batch = inputs(fam, padded=padded)
        assert torch.equal(output(gqa, batch), output(stock, batch))


@pytest.mark.parametrize("groups", [2, 1], ids=["GQA", "MQA"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_variant_computes_the_tied_stock_model(name, groups):
    """G < H: the GQA model equals the stock model whose K/V heads are identical within each group."""
    fam = FAMILY_SPECS[name]
    torch.manual_seed(0)
    stock = fam.stock_cls()(fam.stock_config_obj()).eval()
    tie_kv_heads(stock, name, groups)
    gqa = fam.gqa_cls()(fam.gqa_config(groups)).eval()
    missing, unexpected = gqa.load_state_dict(gqa_state_dict(stock.state_dict(), name, groups), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # tied heads only
    batch = inputs(fam)
    torch.testing.assert_close(output(gqa, batch), output(stock, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n, f in FAMILY_SPECS.items() if f.generates])
def test_generation_with_reduced_cache_matches_no_cache(name):
    fam = FAMILY_SPECS[name]
    torch.manual_seed(0)
    model = fam.gqa_cls()(fam.gqa_config(2)).eval()
    batch = inputs(fam, seq=6)
    batch.pop("decoder_input_ids", None)
    kw = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    cached = model.generate(**batch, return_dict_in_generate=True, **kw)
    uncached = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached)
    cache = output_cache(cached)
    # generate() caches every token it fed the model: all but the last one it produced.
    fed = cached.sequences.shape[1] - 1
    if fam.seq2seq:  # the decoder's own tokens, and the encoder's for cross-attention
        expected = [(cache.self_attention_cache, fed), (cache.cross_attention_cache, 6)]
    else:
        expected = [(cache, fed)]
    for c, tokens in expected:
        assert len(c.layers) == 2
        for layer in c.layers:
            assert layer.keys.shape == layer.values.shape == (2, 2, tokens, D)  # [B, G, S, d]: G, not H


def output_cache(out):
    """The cache of a model or generate output (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_kwarg(model) -> str:
    """The keyword under which this transformers' model ``forward`` takes a cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decoder_model(name: str, groups: int = 2):
    """A GQA model of the family that decodes with a cache (BERT: the bare model as a causal decoder)."""
    fam = FAMILY_SPECS[name]
    extra = dict(is_decoder=True) if name == "bert" else {}
    return fam.gqa_cls()(fam.gqa_config(groups, **extra)).eval()


@pytest.mark.parametrize("name", FAMILY_NAMES)
@torch.no_grad()
def test_incremental_decoding_fills_and_reads_the_reduced_cache(name):
    """Regression (transformers 5.24 renamed the cache keyword): a forward with a cache must use it.

    Decoding the prompt and then one token at a time with a ``DynamicCache`` must give the full pass's
    outputs (so each step read the cached prefix) and leave G heads and every token in the cache (so
    each step wrote it). A cache silently dropped by the attention module fails both.
    """
    fam = FAMILY_SPECS[name]
    torch.manual_seed(0)
    model = decoder_model(name)
    key = cache_kwarg(model)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    if fam.seq2seq:
        enc = ids[:, :6]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        full = model(input_ids=enc, decoder_input_ids=ids).logits
        steps = [model(input_ids=enc, decoder_input_ids=ids[:, :5], use_cache=True, **{key: cache}).logits]
        for t in range(5, 8):
            step = model(input_ids=enc, decoder_input_ids=ids[:, t : t + 1], use_cache=True, **{key: cache})
            steps.append(step.logits)
        expected = [(cache.self_attention_cache, 8), (cache.cross_attention_cache, 6)]
    else:
        cache = DynamicCache()
        full = output(model, {"input_ids": ids})
        steps = [output(model, {"input_ids": ids[:, :5], "use_cache": True, key: cache})]
        for t in range(5, 8):
            steps.append(output(model, {"input_ids": ids[:, t : t + 1], "use_cache": True, key: cache}))
        expected = [(cache, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    for c, tokens in expected:
        assert len(c.layers) == 2
        for layer in c.layers:
            assert layer.keys.shape == layer.values.shape == (2, 2, tokens, D)  # [B, G, S, d]


def _first_gqa_self_attention(model, name: str):
    """The first layer's GQA self-attention module, called as its stock caller calls it, but for the cache."""
    attn = next(m for m in model.modules() if type(m).__name__.endswith(("GQAAttention", "GQASelfAttention")))

    def call(x: torch.Tensor, start: int = 0, **cache_kwarg) -> torch.Tensor:
        extra = {"mask" if name == "t5" else "attention_mask": None}
        if name == "gpt_neox":  # positions start..start+T-1
            positions = torch.arange(start, start + x.shape[1])[None]
            extra["position_embeddings"] = model.gpt_neox.rotary_emb(x, positions)
        return attn(x, **extra, **cache_kwarg)[0]

    return attn, call


@pytest.mark.parametrize("name", FAMILY_NAMES)
@torch.no_grad()
def test_attention_module_takes_the_cache_under_any_keyword(name):
    """``cache=`` (transformers >= 5.24), ``past_key_values=`` (5.0 - 5.23), ``layer_past=`` (GPT-NeoX) or a
    ``Cache`` under a name transformers may use next: the module updates it with G heads; two caches raise.
    """
    torch.manual_seed(0)
    attn, call = _first_gqa_self_attention(decoder_model(name), name)
    x = torch.randn(1, 3, H * D, generator=torch.Generator().manual_seed(2))
    no_cache = call(x)
    for keyword in ("cache", "past_key_values", "layer_past", "kv_cache_of_the_future"):
        cache = DynamicCache()
        torch.testing.assert_close(call(x, **{keyword: cache}), no_cache, atol=1e-6, rtol=1e-6)
        assert cache.layers[attn.layer_idx].keys.shape == (1, 2, 3, D), keyword  # [B, G, S, d]
        call(x[:, :1], start=3, **{keyword: cache})  # the next token is appended to the same cache
        assert cache.get_seq_length(attn.layer_idx) == 4, keyword
    with pytest.raises(GroupedQueryAttentionError, match="2 different KV caches"):
        call(x, cache=DynamicCache(), past_key_values=DynamicCache())


def test_core_module_takes_the_cache_as_cache_or_past_key_values():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(32, 4, 2, rope_theta=10000.0).eval()
    x = torch.randn(1, 4, 32)
    by_name = {}
    for keyword in ("cache", "past_key_values"):
        cache = DynamicCache()
        by_name[keyword] = attn(x, **{keyword: cache})[0]
        assert cache.layers[0].keys.shape == (1, 2, 4, 8)
    torch.testing.assert_close(by_name["cache"], by_name["past_key_values"])
    with pytest.raises(GroupedQueryAttentionError, match="different KV caches"):
        attn(x, cache=DynamicCache(), past_key_values=DynamicCache())


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_backward_reaches_every_parameter(name):
    fam = FAMILY_SPECS[name]
    torch.manual_seed(0)
    if name == "bert":  # the bare encoder has no loss: train its masked-LM head
        model = FAMILIES["bert"].load().BertGQAForMaskedLM(fam.gqa_config(2))
    else:
        model = fam.gqa_cls()(fam.gqa_config(2))
    model.train()
    batch = inputs(fam)
    labels = batch["decoder_input_ids"] if fam.seq2seq else batch["input_ids"]
    loss = model(**batch, labels=labels).loss
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_config_validates_and_round_trips(name, tmp_path):
    fam = FAMILY_SPECS[name]
    # transformers' strict configs wrap validator errors in huggingface_hub's validation error
    with pytest.raises(StrictDataclassClassValidationError, match="not a multiple of num_key_value_heads"):
        fam.gqa_config(3)
    cfg = fam.gqa_config(2)
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    family = FAMILIES[name]
    assert saved["model_type"] == family.model_type and saved["num_key_value_heads"] == 2
    assert saved["auto_map"] == family.auto_map()
    assert type(cfg).from_pretrained(tmp_path).num_key_value_heads == 2


def test_family_table_matches_the_modelling_modules():
    for name, family in FAMILIES.items():
        module = family.load()
        assert family.auto_map() == module.AUTO_MAP
        for path in family.files():
            assert path.is_file()
            # remote code may import only the standard library, torch, transformers (+ huggingface_hub,
            # which transformers requires) and its siblings
            for line in path.read_text().splitlines():
                if line.startswith(("import ", "from ")) and not line.startswith("from ."):
                    top = line.split()[1].split(".")[0]
                    allowed = top in sys.stdlib_module_names or top in {
                        "torch",
                        "transformers",
                        "huggingface_hub",
                    }
                    assert allowed, (path, line)
        assert get_family(name) is family and get_family(family.model_type) is family
    assert get_family("llama") is None
    assert FAMILIES["gpt2"].architectures(["GPT2LMHeadModel"]) == ["GPT2GQALMHeadModel"]
    assert FAMILIES["bert"].architectures(["BertForPreTraining"]) == ["BertGQAForMaskedLM"]
    assert FAMILIES["gpt2"].architectures(["GPT2GQAModel"]) == ["GPT2GQAModel"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_registration_loads_without_remote_code(name, tmp_path):
    register_auto_classes()
    register_auto_classes()  # idempotent
    fam = FAMILY_SPECS[name]
    torch.manual_seed(0)
    model = fam.gqa_cls()(fam.gqa_config(2)).eval()
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, fam.auto_class).from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    batch = inputs(fam)
    assert torch.equal(output(loaded, batch), output(model, batch))


REMOTE_SCRIPT = """
import json, sys
sys.modules["gqa_uptrain"] = None  # the package must not be importable: only the folder's own code
try:
    import gqa_uptrain  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("gqa_uptrain is importable")
for home in reversed(json.loads(sys.argv[2])):  # the transformers under test, e.g. from PYTHONPATH
    if home not in sys.path:
        sys.path.insert(0, home)
import torch, transformers
transformers.logging.set_verbosity_error()
jobs = json.loads(sys.argv[1])
results = {}
for job in jobs:
    auto = getattr(transformers, job["auto_class"])
    model = auto.from_pretrained(job["folder"], trust_remote_code=True).eval()
    batch = torch.load(job["inputs"])
    with torch.no_grad():
        out = model(**batch)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    kv = [m.num_key_value_heads for m in model.modules() if hasattr(m, "num_key_value_groups")]
    torch.save(out, job["output"])
    results[job["folder"]] = {
        "module": type(model).__module__, "class": type(model).__name__, "kv": kv,
        "transformers": transformers.__version__,
    }
    if job.get("generates"):  # the shipped copy must fill the cache it is given
        batch.pop("decoder_input_ids", None)
        gen = model.generate(
            **batch, do_sample=False, max_new_tokens=3, min_new_tokens=3, pad_token_id=0,
            return_dict_in_generate=True,
        )
        cache = getattr(gen, "cache", None)
        cache = gen.past_key_values if cache is None else cache
        cache = getattr(cache, "self_attention_cache", cache)
        results[job["folder"]]["generated"] = gen.sequences.shape[1]
        results[job["folder"]]["cache"] = [
            None if getattr(layer, "keys", None) is None else list(layer.keys.shape) for layer in cache.layers
        ]
print(json.dumps(results))
"""


def run_remote_code(jobs: list[dict], tmp_path: Path) -> dict:
    """Load each job's folder with trust_remote_code in a subprocess where gqa_uptrain is not importable.

    ``-I`` drops the current directory and PYTHON* variables from the path; the script also blocks the
    package in ``sys.modules`` in case it is installed in the environment (editable install). The folders
    holding the transformers imported here and its hub and tokenizer libraries go first on the
    subprocess's path, so that the remote code runs on the versions under test even when those come from
    ``PYTHONPATH`` (as when checking another transformers release).
    """
    libraries = (transformers, huggingface_hub, tokenizers, safetensors)
    homes = [str(Path(m.__file__).resolve().parent.parent) for m in libraries]
    modules = tmp_path / "hf_modules"
    env = {
        "HF_MODULES_CACHE": str(modules),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-I", "-c", textwrap.dedent(REMOTE_SCRIPT), json.dumps(jobs), json.dumps(homes)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_saved_models_load_with_remote_code_alone(tmp_path):
    """save_pretrained writes the modelling files and auto_map; the folder loads on transformers alone."""
    jobs, expected = [], {}
    for name, fam in FAMILY_SPECS.items():
        torch.manual_seed(0)
        model = fam.gqa_cls()(fam.gqa_config(2)).eval()
        folder = tmp_path / name
        model.save_pretrained(folder)
        family = FAMILIES[name]
        assert {p.name for p in family.files()} <= {p.name for p in folder.iterdir()}
        batch = inputs(fam)
        torch.save(batch, tmp_path / f"{name}-in.pt")
        expected[str(folder)] = output(model, batch)
        jobs.append(
            dict(
                folder=str(folder),
                auto_class=fam.auto_class,
                inputs=str(tmp_path / f"{name}-in.pt"),
                output=str(tmp_path / f"{name}-out.pt"),
                generates=fam.generates,
            )
        )
    results = run_remote_code(jobs, tmp_path)
    for job in jobs:
        info = results[job["folder"]]
        assert info["module"].startswith("transformers_modules"), info
        assert info["transformers"] == transformers.__version__, info
        assert info["kv"] and set(info["kv"]) == {2}
        assert torch.equal(torch.load(job["output"]), expected[job["folder"]])
        if job["generates"]:
            # G heads, and every token generate() fed the model (all but the last one it produced)
            assert info["cache"] == [[2, 2, info["generated"] - 1, D]] * 2, info


@pytest.mark.parametrize("groups", [4, 2])
def test_gpt2_upcast_reordered_attention_is_grouped(groups):
    """GPT-2's float32 reorder_and_upcast_attn eager path (and layer-wise scaling) with grouped heads."""
    fam = FAMILY_SPECS["gpt2"]
    extra = dict(
        attn_implementation="eager", reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True
    )
    torch.manual_seed(0)
    stock = fam.stock_cls()(fam.stock_config_obj(**extra)).eval()
    tie_kv_heads(stock, "gpt2", groups)
    gqa = fam.gqa_cls()(fam.gqa_config(groups, **extra)).eval()
    gqa.load_state_dict(gqa_state_dict(stock.state_dict(), "gpt2", groups))
    batch = inputs(fam)
    torch.testing.assert_close(output(gqa, batch), output(stock, batch), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_eager_returns_attention_probabilities_per_query_head(name):
    fam = FAMILY_SPECS[name]
    model = fam.gqa_cls()(fam.gqa_config(2, attn_implementation="eager")).eval()
    with torch.no_grad():
        out = model(**inputs(fam), output_attentions=True)
    probs = out.decoder_attentions if fam.seq2seq else out.attentions
    assert len(probs) == 2 and probs[0].shape[1] == H
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(probs[0].shape[:-1]))
