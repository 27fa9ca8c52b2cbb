"""Conversion of native-GQA families: exactness against the original model, I/O formats, methods."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import NATIVE_FAMILIES, tie_kv_groups
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gqa_uptrain import ConversionResult, convert

IDS = torch.tensor([[1, 5, 9, 33, 17, 64, 3, 99, 12, 7, 80, 41]])


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def all_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@torch.no_grad()
def mean_oracle(model: torch.nn.Module, groups: int) -> torch.nn.Module:
    """The original model with every K/V head (and bias, and K-norm slice) replaced by its group's
    mean, repeated across the group: what a mean-pooled GQA model must compute exactly."""
    m = copy.deepcopy(model)
    cfg = m.config
    h, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h

    def pool(t, start=0):
        block = t[start : start + hkv * d].view(groups, hkv // groups, d, *t.shape[1:])
        block.copy_(block.mean(1, keepdim=True).expand_as(block))

    for name, attn in m.named_modules():
        if not name.endswith("self_attn"):
            continue
        if hasattr(attn, "qkv_proj"):
            pool(attn.qkv_proj.weight, h * d)
            pool(attn.qkv_proj.weight, h * d + hkv * d)
            continue
        for proj in (attn.k_proj, attn.v_proj):
            pool(proj.weight)
            if proj.bias is not None:
                pool(proj.bias)
        if getattr(attn, "k_norm", None) is not None and attn.k_norm.weight.numel() == hkv * d:
            pool(attn.k_norm.weight)
        if hasattr(getattr(attn, "k_layernorm", None), "norms"):  # StableLM: a LayerNorm per head
            for kind in ("weight", "bias"):
                params = [getattr(n, kind) for n in attn.k_layernorm.norms]
                if params[0] is not None:
                    stacked = torch.stack(params)  # [Hkv, d]
                    pool(stacked.view(-1))
                    for param, row in zip(params, stacked, strict=True):
                        param.copy_(row)
    return m


@pytest.mark.parametrize("family", sorted(NATIVE_FAMILIES))
def test_identical_groups_convert_exactly(family, make_model, tmp_path):
    """Heads identical within each group: the GQA model loads with stock transformers and
    reproduces the original's logits."""
    src, model = make_model(family, groups=2)
    out = tmp_path / "out"
    result = convert(src, out, 2, progress=False)
    conv = load(out)
    assert conv.config.num_key_value_heads == 2
    assert conv.config.num_attention_heads == 4
    torch.testing.assert_close(logits(conv), logits(model), rtol=1e-5, atol=1e-5)
    assert result.num_kv_heads_before == 4 and result.num_kv_heads_after == 2
    assert result.kv_bytes_per_token_after * 2 == result.kv_bytes_per_token_before
    assert result.params_after < result.params_before


@pytest.mark.parametrize("family", sorted(NATIVE_FAMILIES))
def test_mean_matches_oracle_on_random_heads(family, make_model, tmp_path):
    """On heads that differ, the converted model equals the original with K/V heads mean-pooled
    in place (the exact oracle), and is not the original (merging changed something)."""
    src, model = make_model(family)
    convert(src, tmp_path / "mqa", 1, progress=False)
    conv = load(tmp_path / "mqa")
    expected = logits(mean_oracle(model, 1))
    torch.testing.assert_close(logits(conv), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(conv), logits(model), atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "phi3", "olmo2", "qwen2"])
def test_same_head_count_is_bit_identical(family, make_model, tmp_path):
    src, _ = make_model(family)
    convert(src, tmp_path / "same", 4, progress=False)
    a, b = all_tensors(src), all_tensors(tmp_path / "same")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("groups", [2, None])
def test_stablelm_per_head_qk_layernorm(groups, make_model, tmp_path):
    """StableLM's qk_layernorm keeps one LayerNorm per head (k_layernorm.norms.{i}): the per-head
    K norms are merged like the heads and the output has one norm per new K/V head."""
    _, model = make_model("stablelm", qk_layernorm=True)
    with torch.no_grad():  # LayerNorms start at weight 1: make the per-head norms differ
        for name, p in model.named_parameters():
            if "layernorm.norms" in name:
                p.normal_(1.0, 0.5)
    if groups:
        tie_kv_groups(model, groups)
    src = tmp_path / "stablelm-qk"
    model.save_pretrained(src)
    convert(src, tmp_path / "out", 2, progress=False)
    conv = load(tmp_path / "out")
    assert len(conv.model.layers[0].self_attn.k_layernorm.norms) == 2
    assert len(conv.model.layers[0].self_attn.q_layernorm.norms) == 4
    names = set(all_tensors(tmp_path / "out"))
    assert "model.layers.1.self_attn.k_layernorm.norms.1.weight" in names
    assert "model.layers.1.self_attn.k_layernorm.norms.2.weight" not in names
    expected = logits(model) if groups else logits(mean_oracle(model, 2))
    torch.testing.assert_close(logits(conv), expected, rtol=1e-5, atol=1e-5)


def test_gqa_to_fewer_heads(make_model, tmp_path):
    """A model that is already GQA (8 query heads, 4 K/V heads) goes to 2 K/V heads."""
    src, model = make_model("llama", groups=2, num_heads=8, num_kv_heads=4)
    convert(src, tmp_path / "g2", 2, progress=False)
    conv = load(tmp_path / "g2")
    assert conv.config.num_key_value_heads == 2
    assert conv.model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 64)
    torch.testing.assert_close(logits(conv), logits(model), rtol=1e-5, atol=1e-5)


def test_sharded_input_and_output(make_model, tmp_path):
    src, model = make_model("llama", groups=1, save_kwargs={"max_shard_size": "60KB"})
    assert (src / "model.safetensors.index.json").exists()
    out = tmp_path / "out"
    convert(src, out, 1, max_shard_size="50KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in all_tensors(out).values()
    )
    torch.testing.assert_close(logits(load(out)), logits(model), rtol=1e-5, atol=1e-5)


def test_bf16_input_keeps_dtype_and_dtype_option_casts(make_model, tmp_path):
    src, model = make_model("llama", groups=2, save_kwargs={})
    bf16 = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf16)
    convert(bf16, tmp_path / "out", 2, progress=False)
    tensors = all_tensors(tmp_path / "out")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_key_value_heads"] == 2
    convert(bf16, tmp_path / "f16", 2, dtype="float16", progress=False)
    assert {t.dtype for t in all_tensors(tmp_path / "f16").values()} == {torch.float16}
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["dtype"] == "float16"


def test_first_and_random_methods(make_model, tmp_path):
    src, _ = make_model("qwen2")  # q/k/v biases
    orig = all_tensors(src)
    k, kb = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.bias"
    convert(src, tmp_path / "first", 2, method="first", progress=False)
    first = all_tensors(tmp_path / "first")
    heads = orig[k].view(4, 16, 64)
    torch.testing.assert_close(first[k].view(2, 16, 64), heads[::2])
    convert(src, tmp_path / "r1", 2, method="random", seed=1, progress=False)
    convert(src, tmp_path / "r1b", 2, method="random", seed=1, progress=False)
    convert(src, tmp_path / "r2", 2, method="random", seed=2, progress=False)
    r1, r1b, r2 = (all_tensors(tmp_path / n) for n in ("r1", "r1b", "r2"))
    assert torch.equal(r1[k], r1b[k]) and not torch.equal(r1[k], r2[k])
    assert torch.count_nonzero(r1[kb]) == 0  # random init starts biases at zero
    assert r1[k].std().item() == pytest.approx(orig[k].std().item(), rel=0.3)
    # Q and O are never touched by these methods.
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(r1[q], orig[q]) and torch.equal(first[q], orig[q])
    load(tmp_path / "r1")  # loads with stock transformers


def test_output_folder_is_complete(make_model, tmp_path):
    from huggingface_hub import ModelCard

    src, _ = make_model("llama")
    # tokenizer and chat template files are carried over
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    result = convert(src, tmp_path / "out", 1, command="gqa-convert src out -g 1", progress=False)
    out = tmp_path / "out"
    for f in (
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
    ):
        assert (out / f).is_file(), f
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert "gqa" in card.data.tags and "mqa" in card.data.tags
    assert "gqa-convert src out -g 1" in card.text
    assert "| key/value heads | 4 | 1 |" in card.text
    assert "75.0% smaller" in card.text
    assert isinstance(result, ConversionResult) and result.kv_reduction == pytest.approx(0.75)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_hub_source_goes_through_snapshot_download(make_model, tmp_path, monkeypatch):
    """A repo id is downloaded with the right revision and file patterns; no network here."""
    import huggingface_hub

    src, model = make_model("llama", groups=2)
    calls = {}

    def fake_snapshot_download(repo_id, revision=None, token=None, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, revision=revision, token=token, allow_patterns=allow_patterns)
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    result = convert("someone/tiny-llama", tmp_path / "out", 2, revision="v1", progress=False)
    assert calls["repo_id"] == "someone/tiny-llama" and calls["revision"] == "v1"
    assert "*.safetensors" in calls["allow_patterns"] and "*.json" in calls["allow_patterns"]
    from huggingface_hub import ModelCard

    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == "someone/tiny-llama"
    assert result.source == "someone/tiny-llama"
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(model), rtol=1e-5, atol=1e-5)


def test_pickled_weights_need_the_flag(make_model, tmp_path):
    from gqa_uptrain import CheckpointError

    _, model = make_model("llama", groups=2)
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    model.config.save_pretrained(pkl)
    torch.save(model.state_dict(), pkl / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        convert(pkl, tmp_path / "out", 2, progress=False)
    convert(pkl, tmp_path / "out", 2, allow_pickle=True, progress=False)
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(model), rtol=1e-5, atol=1e-5)


def test_query_and_output_projections_are_copied_not_decoded(make_model, tmp_path, monkeypatch):
    """Methods that change only K/V (mean/first/random) copy q_proj/o_proj byte for byte through
    the reader's raw copy (the fast path that keeps the converter near disk speed); K/V are merged.
    A method that rewrites Q/O (aligned) or a dtype cast goes through tensors instead."""
    from gqa_uptrain.io.checkpoint import SafetensorsReader

    src, _ = make_model("llama")
    copied: list[str] = []
    raw = SafetensorsReader.copy_raw

    def spy(self, info, f):
        copied.append(info.name)
        return raw(self, info, f)

    monkeypatch.setattr(SafetensorsReader, "copy_raw", spy)
    convert(src, tmp_path / "mean", 2, progress=False)
    attn = [n for n in copied if ".self_attn." in n]
    assert attn and all(n.endswith(("q_proj.weight", "o_proj.weight")) for n in attn), attn
    assert len(attn) == 2 * 2  # two layers, q and o each
    a, b = all_tensors(src), all_tensors(tmp_path / "mean")
    for name in attn:
        assert torch.equal(a[name], b[name]), name
    copied.clear()
    convert(src, tmp_path / "cast", 2, dtype="bfloat16", progress=False)
    assert not copied
    assert all(t.dtype == torch.bfloat16 for t in all_tensors(tmp_path / "cast").values())
