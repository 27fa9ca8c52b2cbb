"""Deployment precision (evaluation/precision.py): bf16 and llama.cpp Q8_0 round trips of the weights,
checked against hand-written oracles, and gqa-eval's --round-trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gqa_uptrain.cli.evaluate import app
from gqa_uptrain.errors import ConfigError
from gqa_uptrain.evaluation.precision import round_trip, rounded, weight_stats

runner = CliRunner()


def q8_0_oracle(rows: np.ndarray) -> np.ndarray:
    """Q8_0 as ggml-quants.c's quantize_row_q8_0_ref writes it, then read back, written out by hand.

    Per block of 32: d = max|x| / 127 (float32), id = 1/d (0 for an all-zero block), q = roundf(x * id)
    (half away from zero, unlike numpy's round), stored as int8; d is stored as float16, and the
    value read back is q * d16.
    """
    out = np.empty(rows.shape, dtype=np.float32)
    for r, row in enumerate(np.asarray(rows, dtype=np.float32)):
        for start in range(0, row.size, 32):
            block = row[start : start + 32]
            d = np.float32(max(abs(float(v)) for v in block)) / np.float32(127)
            inv = np.float32(1) / d if d != 0 else np.float32(0)
            d16 = float(np.float16(d))
            for j, v in enumerate(block):
                x = float(np.float32(v) * inv)  # the product in float32, as C computes it
                q = math.copysign(math.floor(abs(x) + 0.5), x)
                out[r, start + j] = np.float32(q * d16)
    return out


def _rows_with_ties() -> torch.Tensor:
    """Rows whose blocks hit exact .5 ties (max 127 -> d = 1), an all-zero block, and random values."""
    gen = torch.Generator().manual_seed(0)
    tie = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -126.5] + [0.25] * 25)
    rows = torch.randn(3, 64, generator=gen) * torch.tensor([[0.02], [1.0], [300.0]])
    rows[0, :32] = tie
    rows[1, 32:] = 0.0
    return rows


def test_q8_0_round_trip_matches_the_reference_by_hand():
    layer = torch.nn.Linear(64, 3, bias=True)
    with torch.no_grad():
        layer.weight.copy_(_rows_with_ties())
    want = q8_0_oracle(layer.weight.detach().numpy())
    bias = layer.bias.detach().clone()
    report = round_trip(layer, "q8_0")
    got = layer.weight.detach().numpy()
    np.testing.assert_array_equal(got, want)
    # Ties round away from zero (numpy's banker's rounding would give 2 and 0 here).
    assert got[0, 1:5].tolist() == [3.0, -3.0, 1.0, -1.0]
    assert (got[1, 32:] == 0).all()
    assert torch.equal(layer.bias, bias)  # 1-D tensors stay as they are, as llama.cpp keeps them F32
    assert report.rounded == ["weight"] and report.elements == 192 and not report.skipped


def test_conv1d_blocks_run_along_the_input_dimension():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=3, nx=64)  # weight [in 64, out 3]; llama.cpp transposes it before quantizing
    with torch.no_grad():
        conv.weight.copy_(_rows_with_ties().T)
    want = q8_0_oracle(conv.weight.detach().numpy().T).T
    round_trip(conv, "q8_0")
    np.testing.assert_array_equal(conv.weight.detach().numpy(), want)


def test_bf16_round_trip_is_a_cast_and_back():
    layer = torch.nn.Linear(40, 8)
    before = layer.weight.detach().clone()
    report = round_trip(layer, "bf16")
    assert torch.equal(layer.weight, before.to(torch.bfloat16).float())
    assert report.rounded == ["weight"] and not report.skipped
    assert report.max_abs_change == float((layer.weight.detach() - before).abs().max()) > 0


def test_rows_not_a_multiple_of_the_block_are_left_and_reported():
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Linear(64, 40))
    before = [m.weight.detach().clone() for m in model]
    report = round_trip(model, "q8_0")
    assert torch.equal(model[0].weight, before[0])  # rows of 40 values: no Q8_0 for them
    assert not torch.equal(model[1].weight, before[1])
    assert report.rounded == ["1.weight"]
    assert list(report.skipped) == ["0.weight"] and "40" in report.skipped["0.weight"]
    assert "1 left as they are" in report.summary() and "0.weight" in report.summary()
    with pytest.raises(ConfigError, match="unknown round-trip format"):
        round_trip(model, "q4_0")


def test_model_round_trip_covers_linears_and_embeddings_once_and_restores(make_model):
    # GPT-2: Conv1D projections, tied token embedding / lm_head, a position embedding llama.cpp keeps F32.
    _, model = make_model("gpt2", tie_word_embeddings=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with rounded(model, "bf16") as report:
        assert report.rounded.count("transformer.wte.weight") == 1 and "lm_head.weight" not in report.rounded
        assert "transformer.h.0.attn.c_attn.weight" in report.rounded
        assert "transformer.wpe.weight" not in report.rounded
        assert torch.equal(model.transformer.wpe.weight, state["transformer.wpe.weight"])
        wte = state["transformer.wte.weight"]
        assert torch.equal(model.transformer.wte.weight, wte.to(torch.bfloat16).float())
        assert torch.equal(model.transformer.ln_f.weight, state["transformer.ln_f.weight"])
    for k, v in model.state_dict().items():  # every weight back as it was
        assert torch.equal(v, state[k]), k


def test_weight_stats_attention_and_linear(make_model):
    _, model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = 7.0
        model.model.layers[0].mlp.down_proj.weight[0, 0] = -9.0
        model.model.embed_tokens.weight[0, 0] = 11.0
    stats = weight_stats(model)
    assert stats["attention_max_abs"] == 7.0
    assert stats["attention_argmax"] == "model.layers.1.self_attn.o_proj.weight"
    assert stats["attention_tensors"] == 2 * 4  # q, k, v, o in each of 2 layers
    assert stats["linear_max_abs"] == 9.0
    assert stats["embedding_max_abs"] == 11.0


def _tokenizer(folder, vocab: int) -> None:
    """A byte-level BPE of ``vocab`` tokens on a little English, saved next to a model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "Python is an easy to learn, powerful programming language with efficient data structures. " * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(folder)


def test_gqa_eval_round_trip(make_model, tmp_path):
    folder, _ = make_model("llama", vocab_size=300, hidden=64)
    _tokenizer(folder, 300)
    text = tmp_path / "text.txt"
    text.write_text("Python is an easy to learn, powerful programming language. " * 12)
    out = tmp_path / "eval.json"
    args = [str(folder), "--data", str(text), "--max-length", "32", "--skip-speed", "--context", "8",
            "--device", "cpu", "--round-trip", "bf16", "--round-trip", "q8_0", "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "q8_0 round trip" in result.output and "max |weight|" in result.output
    m = json.loads(out.read_text())["models"][0]
    base = m["perplexity"]["perplexity"]
    trips = {r["format"]: r for r in m["round_trips"]}
    assert set(trips) == {"bf16", "q8_0"}
    for r in trips.values():
        ppl = r["perplexity"]["perplexity"]
        assert ppl > 1 and ppl != base and r["relative_to_unrounded"] == pytest.approx(ppl / base)
        # 7 linears in each of 2 layers, the embedding and the head
        assert r["tensors_rounded"] == 2 * 7 + 2 and r["left_as_they_are"] == {}
    assert m["weights"]["attention_max_abs"] > 0
    # Without text there is no perplexity to round: a one-line error, before anything is measured.
    bad = runner.invoke(app, [str(folder), "--round-trip", "bf16", "--skip-speed"])
    assert bad.exit_code != 0 and "--round-trip" in bad.output and "--data" in bad.output
    assert "Traceback" not in bad.output
