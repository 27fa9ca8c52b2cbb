"""The static-cache compiled decode path gives generate's tokens; the largest-batch search stays within its
budget; the speed chart puts batch on its x axis when one context is measured."""

from __future__ import annotations

import pytest
import torch

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.evaluation import kv_layout, measure_speed
from gqa_uptrain.evaluation.capacity import largest_batch, parse_bytes
from gqa_uptrain.evaluation.report import SpeedSeries, speed_figure
from gqa_uptrain.evaluation.static_decode import StaticDecoder


def _tiny(kv_heads: int, layers: int = 2, positions: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=positions,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.slow
def test_static_compiled_path_gives_generate_tokens():
    """torch.compile'd decode step over transformers' static cache: generate's greedy tokens, for a GQA model,
    run after run; the speed runs label their path."""
    model = _tiny(2)
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
            do_sample=False, pad_token_id=0,
        )[:, 20:]  # fmt: skip
    decoder = StaticDecoder(model, batch=3, max_len=28)
    assert torch.equal(decoder.generate(ids, 8), ref)
    assert torch.equal(decoder.generate(ids, 8), ref)  # the cache is reset, the compiled step reused
    chunked = StaticDecoder(model, batch=3, max_len=28, compile=False, prefill_chunk=7)
    assert torch.equal(chunked.generate(ids, 8), ref)  # prompt in chunks: the same tokens
    r = measure_speed(model, context=20, batch=3, new_tokens=4, warmup=0, repeats=1, path="static")
    assert r.path == "static" and r.decode_tokens_per_s > 0


def test_largest_batch_stops_at_the_budget():
    """No probe above the batch the computed KV cache allows; the answer's measured peak is within the budget;
    a budget below the weights, or one sequence's cache, is refused or answered 0 without a probe."""
    model = _tiny(4, positions=2048)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_seq = kv_layout(model.config, torch.float32).cache_bytes(256 + 2)
    budget = weights + 24 * 2**20
    r = largest_batch(model, 256, budget, new_tokens=2, prefill_chunk=128, max_batch=16)
    assert r.kv_bytes_per_sequence == per_seq and r.kv_bound == min(16, (budget - weights) // per_seq)
    assert r.probes and all(p.batch <= r.kv_bound for p in r.probes)
    assert 1 <= r.largest_batch <= r.kv_bound
    fit = next(p for p in r.probes if p.batch == r.largest_batch)
    assert fit.fits and fit.peak_bytes <= budget
    assert all(not p.fits for p in r.probes if p.batch > r.largest_batch)
    tiny = largest_batch(model, 256, weights + per_seq - 1, new_tokens=2)
    assert tiny.kv_bound == 0 and tiny.largest_batch == 0 and tiny.probes == []
    with pytest.raises(ConfigError, match="does not hold the weights"):
        largest_batch(model, 512, weights // 2)
    assert parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("512 MiB") == 2**29
    with pytest.raises(ConfigError, match="--memory-budget"):
        parse_bytes("lots")


def test_speed_chart_with_one_context_has_batch_on_x_and_pairs_colours():
    """One context: tokens/s against batch, each model one line; model and baseline of a path share a colour
    (solid / dashed). Several contexts and one batch: against context."""
    pts = [(4096, b, "static", 10.0 * b) for b in (1, 8, 16)]
    series = [SpeedSeries("model", "model (GQA)", pts), SpeedSeries("baseline", "baseline (MHA)", pts)]
    fig, name = speed_figure(series, "t")
    ax = fig.axes[0]
    assert name == "tokens_per_s_vs_batch.png" and "batch" in ax.get_xlabel()
    lines = ax.get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[1, 8, 16], [1, 8, 16]]
    assert lines[0].get_color() == lines[1].get_color()
    assert (lines[0].get_linestyle(), lines[1].get_linestyle()) == ("-", "--")
    fig, name = speed_figure([SpeedSeries("model", "m", [(c, 1, "eager", 1.0) for c in (128, 512)])], "t")
    assert name == "tokens_per_s_vs_context.png" and "context" in fig.axes[0].get_xlabel()


def test_packed_decode_attention_equals_sdpa_and_reads_the_cache_in_place():
    """The static path's attention for one decoded token: transformers' SDPA output (to float32
    rounding) with the G query heads of a K/V head as rows, so the grouped cache is never copied to
    H heads (under torch.compile transformers' own function does that copy: 0.44x MHA's speed on
    CPU); prompts, MHA layers and eager/flash models keep transformers' own path."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from gqa_uptrain.evaluation.static_decode import (
        GQA_DECODE_ATTENTION,
        gqa_decode_attention,
        use_gqa_decode_attention,
    )

    model = _tiny(2)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(3, 4, 1, 16, generator=g),
        torch.randn(3, 2, 40, 16, generator=g),
        torch.randn(3, 2, 40, 16, generator=g),
    )
    mask = torch.arange(40).view(1, 1, 1, 40).expand(3, 1, 1, 40) < torch.tensor([10, 25, 40]).view(
        3, 1, 1, 1
    )
    want, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q, k, v, mask, scaling=0.25)
    got, _ = gqa_decode_attention(attn, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (3, 1, 4, 16)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # Several positions (a prompt) go to transformers' function as they are.
    q5 = torch.randn(3, 4, 5, 16, generator=g)
    m5 = torch.ones(3, 1, 5, 40, dtype=torch.bool)
    torch.testing.assert_close(
        gqa_decode_attention(attn, q5, k, v, m5)[0], ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q5, k, v, m5)[0]
    )
    assert use_gqa_decode_attention(model) and model.config._attn_implementation == GQA_DECODE_ATTENTION
    eager = _tiny(2)
    eager.set_attn_implementation("eager")
    assert not use_gqa_decode_attention(eager) and eager.config._attn_implementation == "eager"
