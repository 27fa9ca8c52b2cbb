"""Layer-wise refinement (``gqa_uptrain.merging.refine``): better than the closed-form fit on a
trained model, never worse per module, identity at G = H, every family converts and loads with the
default calibrated method, the output survives bf16 and Q8_0, and the CLI's flags."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import NATIVE_FAMILIES, tiny_config
from transformers import AutoModelForCausalLM

from gqa_uptrain.conversion.pipeline import convert
from gqa_uptrain.errors import ConfigError
from gqa_uptrain.merging.aligned import CalibratedMerge
from gqa_uptrain.merging.refine import BlockStore, RefineSpec, _split


def _char_ids(text: str) -> torch.Tensor:
    return torch.tensor([min(ord(c), 127) for c in text], dtype=torch.long)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, python_docs):
    """A small Llama MHA model (8 heads) trained inside the test on char-level Python docs, with
    disjoint calibration (``library/``) and held-out (``tutorial/``) text."""
    torch.manual_seed(0)
    lib = "".join(p.read_text(errors="replace") for p in sorted((python_docs / "library").glob("a*.rst.txt")))
    tut = "".join(p.read_text(errors="replace") for p in sorted((python_docs / "tutorial").glob("*.rst.txt")))
    train, held = _char_ids(lib), _char_ids(tut)
    cfg = tiny_config(
        "llama", num_heads=8, num_kv_heads=8, hidden=64, max_position_embeddings=128, initializer_range=0.02
    )
    model = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, bs = 64, 8
    gen = torch.Generator().manual_seed(0)
    for _ in range(250):
        starts = torch.randint(0, train.numel() - seq - 1, (bs,), generator=gen)
        batch = torch.stack([train[s : s + seq] for s in starts])
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    folder = tmp_path_factory.mktemp("trained") / "src"
    model.eval().save_pretrained(folder)
    calib = train[-32 * 64 :].view(32, 64)
    evalx = held[: 16 * 128].view(16, 128)
    return folder, calib, evalx


def _ce(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return model(x, labels=x).loss.item()


def _load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _refined(calib, **spec) -> CalibratedMerge:
    return CalibratedMerge("aligned", tokens=calib, progress=False, refine=RefineSpec(**spec))


def test_refinement_beats_the_closed_form_at_quarter_heads(trained, tmp_path):
    """At G = H/4, refinement removes more of mean pooling's added cross-entropy than the closed-form
    fit it starts from, and every module's reconstruction error is at most its starting error."""
    folder, calib, evalx = trained
    closed = CalibratedMerge("aligned", tokens=calib, progress=False)
    refined = _refined(calib)
    convert(folder, tmp_path / "mean", 2, "mean", progress=False)
    convert(folder, tmp_path / "closed", 2, closed, progress=False)
    convert(folder, tmp_path / "refined", 2, refined, progress=False)
    base, mean = _ce(_load(folder), evalx), _ce(_load(tmp_path / "mean"), evalx)
    ce_closed, ce_refined = _ce(_load(tmp_path / "closed"), evalx), _ce(_load(tmp_path / "refined"), evalx)
    removed = lambda c: (mean - c) / (mean - base)  # noqa: E731
    assert removed(ce_refined) > removed(ce_closed) + 0.05, (base, mean, ce_closed, ce_refined)
    assert removed(ce_refined) > 0.8, (base, mean, ce_closed, ce_refined)
    assert len(refined.reports) == 2
    for r in refined.reports:
        assert r.error_after <= r.error_before
    assert any(r.kept and r.error_after < 0.5 * r.error_before for r in refined.reports), refined.reports


def test_refinement_that_diverges_is_not_kept(trained, tmp_path):
    """An absurd learning rate ruins training; each module keeps its closed-form weights, so the
    output is bit for bit that of the same layer walk with no training steps."""
    folder, calib, _ = trained
    bad = _refined(calib, steps=5, lr=1e5, patience=100)
    convert(folder, tmp_path / "bad", 2, bad, progress=False)
    convert(folder, tmp_path / "closed", 2, _refined(calib, steps=0), progress=False)
    assert [r.kept for r in bad.reports] == [False, False]
    a = _load(tmp_path / "bad").state_dict()
    b = _load(tmp_path / "closed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_output_solve_recovers_a_known_output_projection():
    """Oracle: outputs made by the module with some other output projection ``W``; with the queries,
    keys and values fixed the output is linear in it, so the least-squares solve finds ``W``."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from gqa_uptrain.architectures import get_architecture
    from gqa_uptrain.merging.calibration import MomentAccumulator
    from gqa_uptrain.merging.refine import _Caught, _relative_error, pack_params, solve_output

    torch.manual_seed(0)
    cfg = tiny_config("llama", num_heads=4, num_kv_heads=2, hidden=32)
    att, rope = LlamaAttention(cfg, 0).eval(), LlamaRotaryEmbedding(cfg)
    config = cfg.to_dict()
    unit = next(iter(get_architecture(config).attention_modules(
        [f"model.layers.0.self_attn.{k}" for k, _ in att.named_parameters()]
    ).values()))  # fmt: skip
    dims, state = unit.module.dims(config), dict(att.named_parameters())
    blocks = {s: unit.module.tensors[s].unpack(state[s].detach(), dims) for s in unit.tensors}
    true_o = 0.2 * torch.randn_like(att.o_proj.weight)
    calls, outs = [], []
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(2, 16, 32)  # [B, T, hidden]
            kwargs = {
                "position_embeddings": rope(x, torch.arange(16)[None].expand(2, 16)),
                "attention_mask": None,
            }
            params = {**pack_params(unit, blocks, config), "o_proj.weight": true_o}
            outs.append(torch.func.functional_call(att, params, (x,), kwargs)[0])
            calls.append(((x,), kwargs))
    caught = _Caught(calls, outs, MomentAccumulator())
    assert _relative_error(att, pack_params(unit, blocks, config), caught, range(4)) > 0.1
    solved = solve_output(att, unit, blocks, caught, config, ridge=1e-10)
    assert solved is not None
    packed = pack_params(unit, solved, config)
    torch.testing.assert_close(packed["o_proj.weight"], true_o, atol=1e-4, rtol=1e-4)
    assert _relative_error(att, packed, caught, range(4)) < 1e-8
    # Fitted on two batches only, it still finds W (64 tokens > 16 unknowns per output).
    part = solve_output(att, unit, blocks, caught, config, batches=[0, 1], ridge=1e-10)
    torch.testing.assert_close(pack_params(unit, part, config)["o_proj.weight"], true_o, atol=1e-4, rtol=1e-4)
    # The errors before and after the solve, read off the normal equations, are the ones measured
    # by running the module (no second pass needed); here with a ridge that leaves some error.
    from gqa_uptrain.merging.trainer import _error_terms, solve_output_terms

    found = solve_output_terms(att, unit, blocks, caught, config, batches=[1, 3], ridge=0.3)
    assert found is not None
    ridged, before, after = found
    measured_before = float(_error_terms(att, pack_params(unit, blocks, config), caught, [1, 3])[0])
    measured_after = float(_error_terms(att, pack_params(unit, ridged, config), caught, [1, 3])[0])
    assert 0 < measured_after < measured_before
    assert before == pytest.approx(measured_before, rel=1e-5)
    assert after == pytest.approx(measured_after, rel=1e-4)


def test_a_step_size_that_makes_things_worse_backs_off(trained, tmp_path):
    """A step size far too large for the model makes the first held-out check worse than the closed
    form; the module starts over at a third of it, and is refined at the smaller step."""
    folder, calib, _ = trained
    method = _refined(calib, steps=60, lr=30.0, backoffs=6)
    convert(folder, tmp_path / "out", 2, method, progress=False)
    assert all(r.kept and r.backoffs >= 1 and r.lr < 30.0 / 2 for r in method.reports), method.reports
    assert all(r.error_after < r.error_before for r in method.reports)


def test_early_stop_anneals_before_it_stops(trained, tmp_path):
    """With every check counted as stale (a 99% gain asked for), a module stops at the first check
    (20 steps); with the anneal it first runs one more check interval at a step decaying to zero."""
    folder, calib, _ = trained
    runs = {}
    for anneal in (False, True):
        method = _refined(calib, steps=300, patience=1, min_gain=0.99, anneal=anneal)
        convert(folder, tmp_path / f"out-{anneal}", 2, method, progress=False)
        assert all(r.kept and r.backoffs == 0 for r in method.reports), method.reports
        runs[anneal] = [r.steps for r in method.reports]
    assert runs == {False: [20, 20], True: [40, 40]}


def test_budget_is_capped_at_max_epochs(trained, tmp_path):
    """A module makes at most ``max_epochs`` passes over its training batches: 32 calibration
    sequences in batches of 4 are 8 batches, one held out, so 2 passes are 14 steps of the 300."""
    folder, calib, _ = trained
    method = _refined(calib, steps=300, max_epochs=2, patience=100, backoffs=0)
    convert(folder, tmp_path / "out", 2, method, progress=False)
    assert [r.steps for r in method.reports] == [14, 14]
    assert all(r.kept for r in method.reports), method.reports
    with pytest.raises(ValueError, match="max_epochs"):
        RefineSpec(max_epochs=0)


def test_wide_modules_train_in_bf16_autocast_where_native(make_model, tmp_path, monkeypatch):
    """Modules at least ``AUTOCAST_MIN_WIDTH`` wide train under bf16 autocast where the hardware
    computes bf16 natively (declared so here, so the test runs on any CPU): the trained weights then
    differ from float32 training and are still never worse than the closed form. Narrower modules,
    and ``autocast=False``, train in float32 (bit for bit the same weights)."""
    from gqa_uptrain.merging import device, refine

    assert isinstance(refine.bf16_native(torch.device("cpu")), bool)
    assert refine.bf16_native(torch.device("meta")) is False
    monkeypatch.setattr(device, "bf16_native", lambda device: True)
    calib = torch.randint(3, 128, (8, 32))
    outputs = {}
    for hidden in (64, refine.AUTOCAST_MIN_WIDTH):
        folder, _ = make_model("llama", hidden=hidden, num_heads=8, num_kv_heads=8)
        for autocast in (False, True):
            method = _refined(calib, steps=20, autocast=autocast)
            out = tmp_path / f"out-{hidden}-{autocast}"
            convert(folder, out, 2, method, progress=False)
            assert all(r.error_after <= r.error_before for r in method.reports), method.reports
            wide = autocast and hidden >= refine.AUTOCAST_MIN_WIDTH
            assert [r.bf16 for r in method.reports] == [wide, wide]
            assert ("bf16 autocast" in (out / "README.md").read_text()) == wide  # the card says so
            outputs[hidden, autocast] = _load(out).state_dict()
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(outputs[64, False], outputs[64, True])
    wide = refine.AUTOCAST_MIN_WIDTH
    assert not same(outputs[wide, False], outputs[wide, True])


def test_held_out_calibration_batches():
    """A share of the calibration batches is held out (at least one), disjoint from the training
    ones; with a single batch, or a zero share, nothing is held out."""
    gen = torch.Generator().manual_seed(0)
    train, held = _split(16, 0.125, gen)
    assert len(held) == 2 and sorted(train + held) == list(range(16)) and not set(train) & set(held)
    assert len(_split(3, 0.125, gen)[1]) == 1
    assert _split(1, 0.125, gen) == ([0], [])
    assert _split(8, 0.0, gen) == (list(range(8)), [])
    with pytest.raises(ValueError, match="validation"):
        RefineSpec(validation=1.0)


def test_identity_at_full_kv_heads(make_model, tmp_path):
    folder, model = make_model("llama")
    calib = torch.randint(3, 128, (8, 32))
    method = _refined(calib, steps=20)
    convert(folder, tmp_path / "out", 4, method, progress=False)
    assert method.reports == []  # nothing merged, nothing to refine
    x = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "out")(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", sorted(NATIVE_FAMILIES))
def test_every_native_family_refines_and_loads_in_stock_transformers(make_model, tmp_path, model_type):
    """With the default calibrated method every native family is calibrated layer by layer (no
    weights-only fallback), refined (K-norm families included) and loads with stock transformers."""
    extra = {"qk_layernorm": True} if model_type == "stablelm" else {}
    folder, model = make_model(model_type, **extra)
    calib = torch.randint(3, 128, (8, 32))
    method = _refined(calib, steps=3)
    convert(folder, tmp_path / "out", 2, method, progress=False)
    assert method.fallback is None
    assert len(method.reports) == model.config.num_hidden_layers
    assert all(r.error_after <= r.error_before for r in method.reports)
    out = _load(tmp_path / "out")
    assert out.config.num_key_value_heads == 2
    x = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(out(x).logits).all()


def test_output_survives_bf16_and_q8_0(trained, tmp_path):
    """The default calibrated output moves under bf16 and a Q8_0 round trip of every linear weight
    by at most 1% of perplexity or twice what the original moves, and its largest weight stays
    within 10x the original's."""
    from gqa_uptrain.evaluation.precision import round_trip, weight_stats

    folder, calib, evalx = trained
    result = convert(folder, tmp_path / "out", 2, _refined(calib), progress=False)
    span = result.extra["attention_max_abs"]  # what the card reports
    assert span["output"] <= 10 * span["source"], span
    for fmt in ("bf16", "q8_0"):
        moves = []
        for f in (folder, tmp_path / "out"):
            model = _load(f)
            before = _ce(model, evalx)
            round_trip(model, fmt)
            moves.append(abs(math.exp(_ce(model, evalx) - before) - 1))
        assert moves[1] <= max(0.01, 2 * moves[0]), (fmt, moves)
    ratio = (
        weight_stats(_load(tmp_path / "out"))["linear_max_abs"]
        / weight_stats(_load(folder))["linear_max_abs"]
    )
    assert ratio <= 10, ratio


def test_block_store_round_trip_and_cleanup():
    store = BlockStore()
    blocks = {"k_proj.weight": {"k": torch.randn(2, 4, 8)}, "qkv.weight": {"q": torch.randn(4, 4, 8)}}
    store.put("model.layers.0.self_attn", blocks)
    assert store.take("model.layers.1.self_attn") is None
    got = store.take("model.layers.0.self_attn")
    assert torch.equal(got["k_proj.weight"]["k"], blocks["k_proj.weight"]["k"])
    assert store.take("model.layers.0.self_attn") is None  # taken once
    store.put("x", blocks)
    folder = store.folder
    store.close()
    assert not folder.exists()


def test_refine_needs_a_calibrated_method(make_model, tmp_path):
    folder, _ = make_model("llama")
    with pytest.raises(ConfigError, match="refinement needs a calibrated method"):
        convert(folder, tmp_path / "out", 2, "mean", refine=True, progress=False)
    with pytest.raises(ConfigError, match="steps must be >= 0"):
        convert(folder, tmp_path / "out", 2, "mean", refine=-1, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_refines_by_default_with_calibration(make_model, tmp_path):
    """``--calibration`` alone gives aligned with refinement (recorded in the card); --no-refine and
    --refine-steps together are refused with one line."""
    from test_aligned import _word_tokenizer
    from typer.testing import CliRunner

    from gqa_uptrain.cli.convert import app

    text = " ".join(f"word{i % 50} token{i % 7}" for i in range(3000))
    folder, _ = make_model("llama")
    _word_tokenizer(folder, text)
    (tmp_path / "calib.txt").write_text(text)
    common = [
        str(folder),
        "-g",
        "2",
        "--calibration",
        str(tmp_path / "calib.txt"),
        "--calibration-tokens",
        "512",
    ]
    res = CliRunner().invoke(
        app,
        [
            *common[:1],
            str(tmp_path / "out"),
            *common[1:],
            "--refine-steps",
            "5",
            "--calibration-seq-len",
            "32",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "refinement" in card.lower()
    assert "512 tokens (16 × 32)" in card  # --calibration-seq-len cuts the blocks
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_key_value_heads"] == 2
    res = CliRunner().invoke(
        app, [*common[:1], str(tmp_path / "o2"), *common[1:], "--no-refine", "--refine-steps", "5"]
    )
    assert res.exit_code != 0
    assert "--refine-steps" in res.output
    assert not (tmp_path / "o2").exists()


def test_block_store_removes_stores_of_dead_processes(tmp_path, monkeypatch):
    """A conversion killed mid-way leaves its block store behind; the next one removes it (and
    leaves a live process's store alone)."""
    import os
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"{BlockStore.PREFIX}{2**22 + 12345}-abc"  # above any default pid_max
    live = tmp_path / f"{BlockStore.PREFIX}{os.getppid()}-abc"
    for d in (dead, live):
        d.mkdir()
        (d / "x.safetensors").write_bytes(b"0")
    store = BlockStore()
    assert not dead.exists() and live.exists()
    assert store.folder.parent == tmp_path
    store.close()
