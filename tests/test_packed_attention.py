"""The refinement's packed causal attention (``gqa_uptrain.merging.packed_attention``): the same
function as causal SDPA (outputs and gradients, grouped and full heads, lengths off the block
grid), the calls it does not cover go to transformers' SDPA unchanged, and the layer walk switches
the converted model to it on a CPU only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from gqa_uptrain.merging import packed_attention as pa
from gqa_uptrain.merging.trainer import _lowered


class _Module(torch.nn.Module):
    """What attention functions read off the calling module."""

    def __init__(self, is_causal: bool = True, groups: int = 1):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups


def _qkv(b: int, h: int, hkv: int, t: int, d: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(h * 1000 + t)
    return [
        (3 * torch.randn(b, n, t, d, generator=gen)).to(dtype).requires_grad_(True) for n in (h, hkv, hkv)
    ]


def _reference(q, k, v):
    """Causal SDPA with each K/V head repeated for its query heads: (B, T, H, D)."""
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), is_causal=True
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    ("h", "hkv", "t"),
    [(9, 1, 512), (6, 2, 300), (4, 4, 257), (8, 2, 129)],
    ids=["mqa-512", "gqa-300", "mha-257", "gqa-129"],
)
def test_packed_attention_is_causal_sdpa_with_its_gradients(h, hkv, t):
    q, k, v = _qkv(2, h, hkv, t, 16)
    out, weights = pa.packed_causal_attention(_Module(groups=h // hkv), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, t, h, 16)
    g = q.shape[1] // k.shape[1]
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    probe = torch.randn_like(ref)
    grads = torch.autograd.grad((out * probe).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_packed_attention_in_bf16_is_as_close_as_sdpa_in_bf16():
    q, k, v = _qkv(2, 9, 1, 512, 64, torch.bfloat16)
    exact = _reference(q.double(), k.double(), v.double())
    sdpa_err = (_reference(q, k, v).double() - exact).abs().max()
    packed, _ = pa.packed_causal_attention(_Module(), q, k, v, None)
    assert packed.dtype == torch.bfloat16
    assert (packed.double() - exact).abs().max() <= 2 * sdpa_err


@pytest.fixture
def stock_sdpa_calls():
    """Calls that reach transformers' SDPA function (a recorder registered in its place through the
    public ``AttentionInterface``, the original put back after)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    seen = []

    def stock(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.shape[2], key.shape[2], attention_mask is not None, kwargs))
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    AttentionInterface.register("sdpa", stock)
    try:
        yield seen
    finally:
        AttentionInterface.register("sdpa", original)


def test_calls_it_does_not_cover_go_to_transformers_sdpa(stock_sdpa_calls):
    """A mask, a non-causal module, a short sequence, a key length that differs (a cache), and
    variants such as a sliding window each reach transformers' own SDPA function, arguments as given."""
    seen = stock_sdpa_calls
    q, k, v = _qkv(1, 4, 2, 256, 8)
    mask = torch.ones(1, 1, 256, 256, dtype=torch.bool).tril()
    pa.packed_causal_attention(_Module(), q, k, v, mask)
    pa.packed_causal_attention(_Module(is_causal=False), q, k, v, None)
    pa.packed_causal_attention(_Module(), q[:, :, : pa.BLOCK], k[:, :, : pa.BLOCK], v[:, :, : pa.BLOCK], None)
    pa.packed_causal_attention(_Module(), q[:, :, -1:], k, v, None)
    pa.packed_causal_attention(_Module(), q, k, v, None, sliding_window=64)
    assert [s[:3] for s in seen] == [
        (256, 256, True),
        (256, 256, False),
        (pa.BLOCK, pa.BLOCK, False),
        (1, 256, False),
        (256, 256, False),
    ]
    assert seen[-1][3]["sliding_window"] == 64
    out, _ = pa.packed_causal_attention(_Module(), q, k, v, None)  # the packed path itself
    assert len(seen) == 5 and out.abs().sum() > 0


def test_layer_walk_model_switches_on_cpu_only_and_computes_the_same():
    torch.manual_seed(0)
    cfg = tiny_config("llama", num_heads=6, num_kv_heads=2, hidden=48)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 200))
    with torch.no_grad():
        want = model(ids).logits
    assert not pa.use_packed_attention(model, torch.device("cuda"))
    assert model.config._attn_implementation == "sdpa"
    assert pa.use_packed_attention(model, torch.device("cpu"))
    assert model.config._attn_implementation == pa.PACKED_ATTENTION
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    eager = AutoModelForCausalLM.from_config(tiny_config("llama", num_heads=6, num_kv_heads=2, hidden=48))
    eager.set_attn_implementation("eager")
    assert not pa.use_packed_attention(eager, torch.device("cpu"))


def test_training_steps_pass_rotary_tables_in_bf16_but_not_masks():
    cos, sin = torch.rand(1, 64, 8), torch.rand(1, 64, 8)
    mask = torch.zeros(1, 1, 64, 64).masked_fill(
        torch.ones(64, 64, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min
    )
    ids = torch.arange(64)[None]
    low = _lowered(
        {"position_embeddings": (cos, sin), "attention_mask": mask, "position_ids": ids}, torch.bfloat16
    )
    assert [t.dtype for t in low["position_embeddings"]] == [torch.bfloat16, torch.bfloat16]
    assert low["attention_mask"] is mask and low["position_ids"] is ids


def test_masks_made_under_inference_mode_serve_later_training_calls():
    """The block masks are made once per shape and kept; one made inside ``torch.inference_mode``
    (an evaluation) still serves a later call that records gradients."""
    pa._masks.cache_clear()
    q, k, v = _qkv(1, 4, 1, 160, 8)
    with torch.inference_mode():
        pa.packed_causal_attention(_Module(), q.detach(), k.detach(), v.detach(), None)
    out, _ = pa.packed_causal_attention(_Module(), q, k, v, None)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
