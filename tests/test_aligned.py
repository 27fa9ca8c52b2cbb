"""Function-aware merging (``--method aligned``): exactness where it must be exact, better than mean
where it matters, every native family converts and loads, the CLI and the model card."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import NATIVE_FAMILIES
from transformers import AutoModelForCausalLM

from gqa_uptrain.conversion.pipeline import convert
from gqa_uptrain.errors import ConfigError
from gqa_uptrain.merging.aligned import CalibratedMerge, rotary_dims


def _logits(folder, x):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(x).logits


def _aligned(tokens, grouping="contiguous", name="aligned"):
    return CalibratedMerge(name, grouping=grouping, tokens=tokens, progress=False)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (8, 32), generator=g), torch.randint(3, 128, (2, 32), generator=g)


@pytest.mark.parametrize("grouping", ["contiguous", "similarity"])
def test_identity_at_full_kv_heads(make_model, tmp_path, tokens, grouping):
    """G = current K/V heads: every fit is the identity map, the model is unchanged."""
    calib, x = tokens
    folder, model = make_model("llama", num_heads=4, num_kv_heads=4)
    convert(folder, tmp_path / "out", 4, _aligned(calib, grouping), progress=False)
    with torch.no_grad():
        ref = model(x).logits
    torch.testing.assert_close(_logits(tmp_path / "out", x), ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def _make_members_related(model, g: int, rot: int) -> None:
    """Within each group of ``g`` K/V heads, make every key a RoPE-commuting map of the first one
    (a complex scaling per rotary pair; a general linear map on non-rotary dims) and every value a
    general linear map of the first one. Aligned merging is then lossless; mean pooling is not."""
    gen = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        attn = layer.self_attn
        d = attn.head_dim
        p = rot // 2
        for proj, is_key in ((attn.k_proj, True), (attn.v_proj, False)):
            w = proj.weight.view(-1, d, proj.weight.shape[1])  # [Hkv, d, n]
            b = proj.bias.view(-1, d, 1) if proj.bias is not None else None
            for first in range(0, w.shape[0], g):
                for m in range(first + 1, first + g):
                    for t in (w, b):
                        if t is None:
                            continue
                        src = t[first].clone()
                        if is_key:
                            s = torch.randn(p, 2, generator=gen)  # complex scale per pair
                            re, im = src[:p], src[p:rot]
                            t[m, :p] = s[:, :1] * re - s[:, 1:] * im
                            t[m, p:rot] = s[:, 1:] * re + s[:, :1] * im
                            e = d - rot
                            if e:
                                t[m, rot:] = (torch.eye(e) + 0.5 * torch.randn(e, e, generator=gen)) @ src[
                                    rot:
                                ]
                        else:
                            t[m] = (torch.eye(d) + 0.5 * torch.randn(d, d, generator=gen)) @ src


@pytest.mark.parametrize(
    ("model_type", "extra"), [("llama", {}), ("qwen2", {}), ("phi", {"partial_rotary_factor": 0.5})]
)
def test_aligned_exact_when_heads_differ_by_foldable_maps(make_model, tmp_path, tokens, model_type, extra):
    """Members that differ by maps aligned can fold into Q and O merge losslessly (mean does not):
    checks the complex pair fit, the rotate_half pairing, partial rotary, biases and the O fold."""
    calib, x = tokens
    folder, model = make_model(model_type, num_heads=4, num_kv_heads=4, **extra)
    rot = rotary_dims(model.config.to_dict(), model.config.hidden_size // 4)
    _make_members_related(model, 2, rot)
    model.save_pretrained(folder)
    with torch.no_grad():
        ref = model(x).logits
    convert(folder, tmp_path / "aligned", 2, _aligned(calib), progress=False)
    convert(folder, tmp_path / "mean", 2, "mean", progress=False)
    torch.testing.assert_close(_logits(tmp_path / "aligned", x), ref, rtol=1e-3, atol=1e-3)
    assert (_logits(tmp_path / "mean", x) - ref).abs().max() > 1e-2


def test_identity_at_full_kv_heads_is_bit_exact(make_model, tmp_path, tokens):
    """G = current K/V heads: the maps are exactly the identity, so every tensor is written back
    unchanged (not merely to float tolerance)."""
    calib, _ = tokens
    folder, model = make_model("qwen2", num_heads=8, num_kv_heads=4)  # biases, r = 2
    convert(folder, tmp_path / "out", 4, _aligned(calib), progress=False)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(out[name], t), name


@torch.no_grad()
def _round_q8(model) -> None:
    """Q8_0-like rounding of every ``nn.Linear`` weight, in place: blocks of 32 along the input dim,
    one scale per block (its max |w| / 127), as llama.cpp's Q8_0 stores them."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.reshape(-1, 32)
            scale = w.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
            mod.weight.copy_((torch.round(w / scale) * scale).view_as(mod.weight))


@pytest.mark.parametrize(
    ("model_type", "extra", "heads", "groups"),
    [("llama", {}, (4, 4), 2), ("phi", {"partial_rotary_factor": 0.5}, (4, 4), 2), ("qwen2", {}, (8, 4), 1)],
)
def test_aligned_weights_stay_in_range_and_survive_rounding(
    make_model, tmp_path, tokens, model_type, extra, heads, groups
):
    """The heads of a random model share nothing, so the fitted maps are far from the identity: the
    weights they are folded into must still stay in the original's range (a basis regressed on the
    mean head wrote attention weights 10-400x the original's here), and an 8-bit rounding of every
    linear weight must move the converted model's logits no more than it moves the original's
    (within 2x). Covers the rotary pairs (llama), the linear fit of non-rotary keys (phi, partial
    rotary) and biases (qwen2, 4 -> 1)."""
    calib, x = tokens
    folder, model = make_model(model_type, num_heads=heads[0], num_kv_heads=heads[1], **extra)
    convert(folder, tmp_path / "out", groups, _aligned(calib), progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    got = dict(merged.named_modules())
    for name, mod in model.named_modules():
        if "attn" in name and isinstance(mod, torch.nn.Linear):
            big, ref = got[name].weight.abs().max().item(), mod.weight.abs().max().item()
            assert big <= 10 * ref, (name, big, ref)
    moves = []
    for m in (model, merged):
        with torch.no_grad():
            before = m(x).logits
            _round_q8(m)
            moves.append((m(x).logits - before).abs().max().item())
    assert moves[1] <= 2 * moves[0], moves


@pytest.mark.parametrize("model_type", sorted(NATIVE_FAMILIES))
def test_every_native_family_converts_with_aligned(make_model, tmp_path, tokens, model_type):
    """Each family converts with aligned (similarity grouping too) and loads; with the heads of each
    group tied, merging loses nothing, so the logits are the original's."""
    calib, x = tokens
    folder, model = make_model(model_type, groups=2, num_heads=4, num_kv_heads=4)
    method = _aligned(calib, "similarity")
    result = convert(folder, tmp_path / "out", 2, method, progress=False)
    assert result.method == "aligned"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2
    with torch.no_grad():
        ref = model(x).logits
    torch.testing.assert_close(_logits(tmp_path / "out", x), ref, rtol=2e-3, atol=2e-3)


def test_aligned_needs_calibration(make_model, tmp_path):
    folder, _ = make_model("llama")
    with pytest.raises(ConfigError, match="--calibration"):
        convert(folder, tmp_path / "out", 2, "aligned", progress=False)
    assert not (tmp_path / "out").exists()


def _char_ids(text: str) -> torch.Tensor:
    return torch.tensor([min(ord(c), 127) for c in text], dtype=torch.long)


@pytest.mark.slow
def test_aligned_beats_mean_on_a_trained_model(tmp_path, python_docs):
    """A small Llama MHA model trained for a few hundred steps inside the test (char-level Python
    docs): at G = H/4, aligned has lower held-out perplexity than mean."""
    from conftest import tiny_config

    torch.manual_seed(0)
    text = "".join(
        p.read_text(errors="replace") for p in sorted((python_docs / "tutorial").glob("*.rst.txt"))
    )
    ids = _char_ids(text)
    train, held = ids[:-20_000], ids[-20_000:]
    cfg = tiny_config(
        "llama", num_heads=8, num_kv_heads=8, hidden=64, max_position_embeddings=128, initializer_range=0.02
    )
    model = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, bs = 64, 8
    for _ in range(200):
        starts = torch.randint(0, train.numel() - seq - 1, (bs,))
        batch = torch.stack([train[s : s + seq] for s in starts])
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(tmp_path / "src")
    calib = train[: 32 * 64].view(32, 64)
    evalx = held[: 8 * 128].view(8, 128)

    def ppl(folder) -> float:
        m = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            return math.exp(m(evalx, labels=evalx).loss.item())

    convert(tmp_path / "src", tmp_path / "mean", 2, "mean", progress=False)
    convert(tmp_path / "src", tmp_path / "aligned", 2, _aligned(calib), progress=False)
    base, mean, aligned = ppl(tmp_path / "src"), ppl(tmp_path / "mean"), ppl(tmp_path / "aligned")
    assert base < aligned < mean, (base, aligned, mean)


def _word_tokenizer(folder, text: str) -> None:
    """A word-level tokenizer (vocab 128) saved next to a tiny model, so the CLI can tokenize."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]"] + sorted(set(text.split()))[:125]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    ).save_pretrained(folder)


def test_cli_aligned_with_calibration_and_card(make_model, tmp_path):
    """--calibration makes aligned the default; the card records method, grouping, data and tokens;
    aligned without calibration text is a one-line error."""
    from typer.testing import CliRunner

    from gqa_uptrain.cli.convert import app

    g = torch.Generator().manual_seed(0)
    text = " ".join(f"w{int(i)}" for i in torch.randint(0, 120, (3000,), generator=g))
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.txt").write_text(text)
    src, _ = make_model("llama")
    _word_tokenizer(src, text)
    runner = CliRunner()
    args = [
        str(src),
        str(tmp_path / "out"),
        "-g",
        "2",
        "--calibration",
        str(calib),
        "--calibration-tokens",
        "256",
    ]
    res = runner.invoke(app, [*args, "--grouping", "similarity", "--quiet"])
    assert res.exit_code == 0, res.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`aligned`" in card and "`similarity`" in card
    assert f"{calib.name}`, 256 tokens" in card  # the card may name the folder, or only its last part
    bad = runner.invoke(app, [str(src), str(tmp_path / "bad"), "-g", "2", "--method", "aligned"])
    assert bad.exit_code != 0 and "--calibration" in bad.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("refine", [False, True])
def test_every_custom_family_converts_with_aligned(tmp_path, refine):
    """GPT-2, GPT-NeoX, OPT, BERT calibrate layer by layer, and with ``refine`` are refined through
    our modelling classes; T5 (encoder-decoder) falls back to a weights-only fit, not refined. With
    each group's heads tied, the converted model reproduces the original (refinement keeps it so)."""
    import transformers
    from test_modeling import FAMILY_NAMES, FAMILY_SPECS, VOCAB, inputs, output, tie_kv_heads

    from gqa_uptrain.merging.refine import RefineSpec
    from gqa_uptrain.modeling import register_auto_classes

    register_auto_classes()
    calib = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    fallbacks = {}
    for name in FAMILY_NAMES:
        fam = FAMILY_SPECS[name]
        torch.manual_seed(0)
        model = fam.stock_cls()(fam.stock_config_obj()).eval()
        tie_kv_heads(model, name, 2)
        model.save_pretrained(tmp_path / name)
        method = _aligned(calib)
        if refine:
            method = CalibratedMerge("aligned", tokens=calib, progress=False, refine=RefineSpec(steps=3))
        result = convert(tmp_path / name, tmp_path / f"{name}-gqa", 2, method, progress=False)
        assert result.method == "aligned"
        fallbacks[name] = method.fallback is not None
        assert bool(method.reports) == (refine and name != "t5")
        batch = inputs(fam)
        converted = getattr(transformers, fam.auto_class).from_pretrained(tmp_path / f"{name}-gqa").eval()
        torch.testing.assert_close(output(converted, batch), output(model, batch), atol=2e-4, rtol=2e-4)
    assert fallbacks == {n: n == "t5" for n in FAMILY_NAMES}


@pytest.mark.slow
def test_real_smollm2_mqa_aligned_far_better_than_mean(smollm2_gguf, python_docs, tmp_path):
    """The real SmolLM2-135M GGUF, 3 -> 1 K/V heads, calibrated on 2k tokens of library/ docs:
    aligned removes most of the cross-entropy mean pooling adds on held-out tutorial text."""
    from transformers import AutoTokenizer

    from gqa_uptrain.merging.calibration import CalibrationSpec

    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ids = tok((python_docs / "tutorial" / "controlflow.rst.txt").read_text(), add_special_tokens=False)[
        "input_ids"
    ]
    x = torch.tensor([ids[:256]])
    spec = CalibrationSpec(str(python_docs / "library"), num_tokens=2048)
    ce = {}
    for name, g, method in [
        ("original", 3, "mean"),
        ("mean", 1, "mean"),
        ("aligned", 1, CalibratedMerge("aligned", spec, progress=False)),
    ]:
        convert(smollm2_gguf, tmp_path / name, g, method, progress=False)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            ce[name] = model(x, labels=x).loss.item()
    removed = (ce["mean"] - ce["aligned"]) / (ce["mean"] - ce["original"])
    assert removed > 0.5, ce


def test_library_convert_takes_calibration_by_keyword(make_model, tmp_path):
    """``convert(..., "aligned", calibration=..., grouping=...)`` is the library twin of the CLI
    options; a method object with calibration keywords, or token counts without text, are refused."""
    g = torch.Generator().manual_seed(0)
    text = " ".join(f"w{int(i)}" for i in torch.randint(0, 120, (3000,), generator=g))
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    src, _ = make_model("llama")
    _word_tokenizer(src, text)
    result = convert(
        src, tmp_path / "out", 2, "aligned", calibration=calib, calibration_tokens=256, grouping="similarity",
        progress=False,
    )  # fmt: skip
    assert result.method == "aligned"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`similarity`" in card and "256 tokens" in card
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with pytest.raises(ConfigError, match="MergeMethod object"):
        convert(src, tmp_path / "bad", 2, _aligned(None), calibration=calib, progress=False)
    with pytest.raises(ConfigError, match="without calibration"):
        convert(src, tmp_path / "bad", 2, "mean", calibration_tokens=256, progress=False)
    assert not (tmp_path / "bad").exists()


def _random_stats(rot: int, key_mean: bool, hkv: int = 4, r: int = 2, d: int = 8, n: int = 24):
    from gqa_uptrain.merging.aligned import ModuleStats

    g = torch.Generator().manual_seed(rot * 2 + key_mean)
    x = torch.randn(64, n + 1, generator=g, dtype=torch.float64)
    x[:, -1] = 1
    return ModuleStats(
        wq=torch.randn(hkv * r, d, n + 1, generator=g, dtype=torch.float64),
        wk=torch.randn(hkv, d, n + 1, generator=g, dtype=torch.float64),
        wv=torch.randn(hkv, d, n + 1, generator=g, dtype=torch.float64),
        o=torch.randn(hkv * r, d, n, generator=g, dtype=torch.float64),
        sigma=x.T @ x / 64,
        rot=rot,
        key_mean=key_mean,
    )


@pytest.mark.parametrize(("rot", "key_mean"), [(8, False), (4, False), (0, False), (8, True)])
def test_grouping_costs_equal_their_definitions(rot, key_mean):
    """The grouping costs read per-module tables (every head against every head, computed once);
    they must equal the definitions: mean pooling's relative error and the aligned fit's residual,
    computed directly from the moments for each group."""
    from gqa_uptrain.merging.aligned import linear_fit

    stats = _random_stats(rot, key_mean)
    ref = _random_stats(rot, key_mean)  # same values, fresh caches: the direct route
    sigma = ref.sigma
    for members in [(0, 1), (1, 3), (0, 2, 3), (0, 1, 2, 3)]:
        idx = torch.tensor(members)
        mean = 0.0
        for w in (ref.wk[idx], *(() if key_mean else (ref.wv[idx],))):
            dev = w - w.mean(0, keepdim=True)
            mean += float(((dev @ sigma) * dev).sum()) / float(((w @ sigma) * w).sum())
        assert stats.mean_cost(members, keys_only=key_mean) == pytest.approx(mean, rel=1e-9)

        v = ref._v_fit(members)
        if key_mean:
            want = mean + v.residual / v.total
        else:
            k_res = k_tot = 0.0
            if rot:
                a, _ = ref._pair_gram(members)
                lam = torch.linalg.eigvalsh(a)
                k_tot, k_res = float(lam.sum()), float(lam[:, :-1].sum())
            if rot < 8:
                f = linear_fit(ref.wk[idx, rot:], sigma, *ref._weights_nonrot(members))
                k_res, k_tot = k_res + f.residual, k_tot + f.total
            want = k_res / k_tot + v.residual / v.total
        assert stats.aligned_cost(members) == pytest.approx(want, rel=1e-7, abs=1e-12)


def test_prepare_merges_and_spills_each_module_bit_for_bit(make_model, tokens):
    """prepare() fits and merges each module as its layer is calibrated and spills the merged
    blocks to disk, keeping neither the [n+1, n+1] moments nor the fitted maps in memory (memory
    bounded by one layer, not growing with depth); merge() then writes exactly what fitting at
    merge time from the (float32-stored) moments wrote before, and refuses a second merge."""
    from gqa_uptrain.architectures import get_architecture
    from gqa_uptrain.io.checkpoint import open_source
    from gqa_uptrain.merging.aligned import ModuleStats, _find, _module_tensors, _read_blocks, _write
    from gqa_uptrain.merging.calibration import collect_moments
    from gqa_uptrain.merging.methods import MergeContext

    calib, _ = tokens
    folder, _ = make_model("qwen2", num_heads=8, num_kv_heads=4, num_hidden_layers=3)  # biases, r = 2
    src = open_source(folder)
    try:
        method = _aligned(calib, "similarity")
        method.prepare(src, 2)
        assert all(plan.fit is None and plan.merged for plan in method.plans.values())
        spilled = sorted(p.name for p in method._store.folder.iterdir())
        assert spilled == sorted(f"{name}.safetensors" for name in method.plans)
        moments = {}
        collect_moments(src, calib, lambda m: moments.__setitem__(m.module_name, m), progress=False)
        units = _module_tensors(src, get_architecture(src.config))
        assert len(moments) == len(method.plans) == 3
        for name, mom in moments.items():
            blocks = _read_blocks(src, units[name])
            got = method.merge(blocks, MergeContext(name, 2))
            plan = method.plans[name]
            if plan.kv_perm is not None:
                from gqa_uptrain.merging.grouping import permute_blocks

                blocks = permute_blocks(blocks, plan.kv_perm, 8)
            old = ModuleStats.build(blocks, mom.sigma.float(), method._rot, False).merged(2)
            want = {s: dict(p) for s, p in blocks.items()}
            for role in ("q", "k", "v"):
                _write(want, role, old[role])
            want[_find(want, "o", "weight")]["o"] = old["o"].to(torch.float32)
            for s, parts in want.items():
                for role, t in parts.items():
                    assert torch.equal(got[s][role], t), (name, s, role)
            with pytest.raises(ConfigError, match="merged already"):
                method.merge(blocks, MergeContext(name, 2))
        assert list(method._store.folder.iterdir()) == []  # each spilled module is removed once taken
    finally:
        src.close()


@pytest.mark.parametrize(
    ("config", "want"),
    [
        ({"model_type": "llama"}, 16),
        ({"model_type": "phi", "partial_rotary_factor": 0.5}, 8),
        ({"model_type": "gpt_neox", "rope_parameters": {"partial_rotary_factor": 0.25}}, 4),
        ({"model_type": "gpt2_gqa"}, 0),
        ({"model_type": "opt_gqa"}, 0),
        ({"model_type": "bert_gqa"}, 0),
        ({"model_type": "t5_gqa"}, 0),
    ],
)
def test_rotary_dims_are_a_family_fact(config, want):
    """Which dims RoPE turns comes from the family's Architecture, our own ``*_gqa`` types included."""
    assert rotary_dims(config, 16) == want


def test_key_norms_are_a_family_fact():
    """K norms are declared per family: Qwen3's shared k_norm and OLMo2's whole-projection one are
    found among a module's tensors; Llama has none."""
    from gqa_uptrain.architectures import get_architecture

    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"]
    for model_type, norm, want in [("qwen3", True, True), ("olmo2", True, True), ("llama", False, False)]:
        extra = ["model.layers.0.self_attn.k_norm.weight"] if norm else []
        (mt,) = get_architecture({"model_type": model_type}).attention_modules(names + extra).values()
        assert mt.has_key_norm is want
        assert ("k_norm.weight" in mt.tensors) is (model_type == "olmo2")  # merged with the heads


def test_reconverting_a_custom_checkpoint_with_aligned_needs_no_registration(tmp_path):
    """Calibration builds the original skeleton through the Auto classes: a ``gpt2_gqa`` source
    converts again with ``aligned`` in a fresh process that never registered our classes."""
    import subprocess
    import sys

    from test_modeling import FAMILY_SPECS, VOCAB

    fam = FAMILY_SPECS["gpt2"]
    torch.manual_seed(0)
    fam.stock_cls()(fam.stock_config_obj()).save_pretrained(tmp_path / "mha")
    convert(tmp_path / "mha", tmp_path / "gqa4", 2, "mean", progress=False)
    script = (
        "import torch\n"
        "from gqa_uptrain.conversion.pipeline import convert\n"
        "from gqa_uptrain.merging.aligned import CalibratedMerge\n"
        f"t = torch.randint(3, {VOCAB}, (4, 16), generator=torch.Generator().manual_seed(0))\n"
        "m = CalibratedMerge('aligned', tokens=t, progress=False)\n"
        f"convert({str(tmp_path / 'gqa4')!r}, {str(tmp_path / 'gqa1')!r}, 1, m, progress=False)\n"
        "assert m.fallback is None, m.fallback\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
