"""The converted model's card: where the source came from (named by Hub id or file name, never a path
of this machine), its license and base model, each method credited to where it comes from, what is
known of the quality, and which tools load the checkpoint. Also the portable config and tokenizer
files the converter writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _hub_fakes import FakeHubDownloads
from huggingface_hub import ModelCard

from gqa_uptrain import convert
from gqa_uptrain.conversion.card import conversion_section
from gqa_uptrain.conversion.pipeline import ConversionResult
from gqa_uptrain.hub.card import evaluation_section, parse_eval_json, scrub_paths
from gqa_uptrain.io.portability import portable_config, portable_tokenizer_config

SOURCE_CARD = "---\nlicense: mit\nbase_model: someone/tiny-base\n---\n# tiny\n"


def test_card_for_a_local_folder(make_model, tmp_path):
    """A folder: named by its folder name, license from its card, base_model the one its card names
    (said to be that, not the source), no path of this machine anywhere in the output."""
    src, _ = make_model("llama")
    (src / "README.md").write_text(SOURCE_CARD)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "_name_or_path": str(tmp_path / "elsewhere")}))
    out = tmp_path / "out"
    convert(
        src, out, 2, progress=False, command=f"gqa-convert {src} {out} -g 2 --calibration {tmp_path}/cal.txt"
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit"
    assert card.data.base_model == "someone/tiny-base"
    assert "is the base model the source's card names" in card.text
    assert f"Converted from `{src.name}` (Llama)" in card.text
    assert f"gqa-convert {src.name} out -g 2 --calibration cal.txt" in card.text
    for p in out.iterdir():
        assert str(tmp_path).encode() not in p.read_bytes(), p.name


def test_card_for_a_folder_in_the_hub_cache(make_model, tmp_path, monkeypatch):
    """A Hub id: downloaded (faked at the network boundary into a real cache layout), named by its id,
    which is the card's base_model; the license comes from the source's card (README.md is fetched)."""
    src, _ = make_model("llama")
    (src / "README.md").write_text(SOURCE_CARD.replace("mit", "apache-2.0"))
    hub = FakeHubDownloads(monkeypatch, tmp_path / "cache", {"someone/tiny-llama": src})
    convert("someone/tiny-llama", tmp_path / "from-id", 2, progress=False)
    assert "README.md" in hub.calls[0]["allow_patterns"]
    card = ModelCard.load(tmp_path / "from-id" / "README.md")
    assert (card.data.base_model, card.data.base_model_relation, card.data.license) == (
        "someone/tiny-llama",
        "finetune",
        "apache-2.0",
    )
    assert "Converted from `someone/tiny-llama` (Llama)" in card.text
    assert "source's card names" not in card.text  # the base model is the source itself

    # The same snapshot folder given as a path is recognised by its cache layout.
    snapshot = next((tmp_path / "cache").glob("models--*/snapshots/*"))
    convert(snapshot, tmp_path / "from-path", 2, progress=False)
    card = ModelCard.load(tmp_path / "from-path" / "README.md")
    assert card.data.base_model == "someone/tiny-llama"
    assert "Converted from `someone/tiny-llama` (Llama)" in card.text


def test_no_card_no_license_no_base_model(make_model, tmp_path):
    """Nothing to carry over: no license or base_model is invented."""
    src, _ = make_model("llama")
    convert(src, tmp_path / "out", 2, progress=False)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license is None and card.data.base_model is None
    assert "**Quality not measured at conversion.**" in card.text


def _result(method: str, kv_after: int, **kw) -> ConversionResult:
    base = dict(
        output="/somewhere/out",
        source="/home/me/models/src",
        architecture="Llama",
        model_type="llama",
        method=method,
        num_heads=8,
        num_kv_heads_before=4,
        num_kv_heads_after=kv_after,
        head_dim=16,
        converted_modules=2,
        params_before=1000,
        params_after=900,
        kv_bytes_per_token_before=512,
        kv_bytes_per_token_after=128 * kv_after,
        dtype="float32",
        seconds=1.0,
        needs_trust_remote_code=False,
    )
    return ConversionResult(**{**base, **kw})


@pytest.mark.parametrize(
    ("method", "credited", "not_credited"),
    [
        ("mean", "the conversion of the GQA paper (Ainslie et al. 2023", "2412.20677"),
        ("first", "an ablation in the GQA paper", "2412.20677"),
        ("random", "an ablation in the GQA paper", "2412.20677"),
        ("aligned", "arXiv:2412.20677", "Ainslie"),
    ],
)
def test_each_method_is_credited_to_where_it_comes_from(method, credited, not_credited):
    text = conversion_section(_result(method, 2))
    assert credited in text and not_credited not in text
    assert "/home/me" not in text and "Converted from `src`" in text


def test_quality_sentences():
    """Known to need uptraining: MQA and random heads say so plainly; otherwise the card asks for a
    measurement; a gqa-eval JSON with the original as baseline gives the measured comparison."""
    assert "**Not usable before uptraining.**" in conversion_section(_result("mean", 1))
    assert "**Not usable before uptraining.**" in conversion_section(_result("random", 2))
    assert "**Quality not measured at conversion.**" in conversion_section(_result("aligned", 2))
    assert "computes what the original did" in conversion_section(_result("mean", 4))

    def section(ppl: float) -> str:
        entries = parse_eval_json(
            {
                "models": [
                    {"name": "/home/me/orig", "role": "baseline", "perplexity": {"perplexity": 12.1}},
                    {"name": "/home/me/mqa", "role": "model", "perplexity": {"perplexity": ppl}},
                ],
                "data": {"source": "docs"},
            }
        )
        return evaluation_section(entries, entries[1])

    bad = section(15387.0)
    assert "**Measured: not usable as it is.** Perplexity 15,387.000 against 12.100" in bad
    assert "/home/me" not in bad and "| **mqa** (this model)" in bad
    assert "(+16%)" in section(14.0) and "within 10%" in section(12.5)


def test_refined_mqa_and_weight_range_sentences():
    """A refined MQA conversion is not called unusable (it is measured close to the original); the
    merged weights' range against the source's is stated, with a warning past 10x."""
    refined = conversion_section(_result("aligned", 1, extra={"refined_modules": 2}))
    assert "**Measure before use.**" in refined and "Not usable" not in refined
    assert "16.8 after refinement" in refined
    assert "Weight range" not in refined  # no range measured, none stated
    ok = conversion_section(
        _result("aligned", 2, extra={"attention_max_abs": {"source": 5.0, "output": 6.5}})
    )
    assert "largest merged attention weight is 6.5 against 5 in the source (1.30×), within" in ok
    assert "--round-trip q8_0" in ok
    bad = conversion_section(
        _result("aligned", 2, extra={"attention_max_abs": {"source": 5.0, "output": 2576.0}})
    )
    assert "(515.20×), **far outside the source's range" in bad


def test_conversion_measures_the_merged_weight_range(make_model, tmp_path):
    """The converter measures the largest merged attention weight of the source and of the output
    while it streams: mean pooling cannot exceed the source's (an average of heads), and the card says so."""
    folder, model = make_model("llama")
    result = convert(folder, tmp_path / "out", 2, "mean", progress=False)
    span = result.extra["attention_max_abs"]
    source_max = max(
        float(p.detach().abs().max())
        for n, p in model.named_parameters()
        if n.endswith(("k_proj.weight", "v_proj.weight"))
    )
    assert span["source"] == pytest.approx(source_max, rel=1e-6)
    assert 0 < span["output"] <= span["source"]
    assert "**Weight range:**" in (tmp_path / "out" / "README.md").read_text()


def test_loading_section_native_and_remote_code(make_model, tmp_path):
    src, _ = make_model("qwen2")
    convert(src, tmp_path / "q", 2, progress=False)
    text = (tmp_path / "q" / "README.md").read_text()
    assert "**transformers 5.x and 4.x**" in text and "convert_hf_to_gguf.py" in text and "**peft:**" in text

    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    ).save_pretrained(tmp_path / "gpt2")
    convert(tmp_path / "gpt2", tmp_path / "g", 2, progress=False)
    text = (tmp_path / "g" / "README.md").read_text()
    assert "**transformers, with remote code only:**" in text
    assert "**Not llama.cpp:** its `convert_hf_to_gguf.py` refuses `GPT2GQALMHeadModel`" in text
    assert "**transformers 5.x and 4.x**" not in text


def test_scrub_paths_keeps_urls_ids_and_prose():
    text = "from /home/me/x.gguf and ~/data/cal.txt; see https://huggingface.co/a/b, owner/name, key/value, 3 / 4"
    assert (
        scrub_paths(text)
        == "from x.gguf and cal.txt; see https://huggingface.co/a/b, owner/name, key/value, 3 / 4"
    )


def test_portable_config_carries_both_rope_forms():
    plain = portable_config(
        {"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}, "_name_or_path": "/x"}
    )
    assert plain["rope_theta"] == 1e5 and "rope_scaling" not in plain and "_name_or_path" not in plain
    yarn = portable_config(
        {
            "rope_parameters": {
                "rope_theta": 1e6,
                "rope_type": "yarn",
                "factor": 4.0,
                "partial_rotary_factor": 0.5,
            }
        }
    )
    assert yarn["rope_theta"] == 1e6 and yarn["partial_rotary_factor"] == 0.5
    assert yarn["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 4.0}
    nested = portable_config(
        {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}}
    )
    assert nested["rope_theta"] == 1e6 and "rope_scaling" not in nested
    kept = portable_config({"rope_parameters": {"rope_theta": 1.0}, "rope_theta": 2.0})
    assert kept["rope_theta"] == 2.0  # what the file already says is never overwritten


def test_portable_tokenizer_config_drops_loading_flags():
    tok = {
        "tokenizer_class": "TokenizersBackend",
        "is_local": True,
        "local_files_only": True,
        "name_or_path": "/home/me/src",
        "model_max_length": int(1e30),
        "eos_token": "</s>",
    }
    out = portable_tokenizer_config(tok, has_tokenizer_json=True, model_max_length=8192)
    assert out == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
        "eos_token": "</s>",
    }
    kept = portable_tokenizer_config(tok, has_tokenizer_json=False)
    assert kept["tokenizer_class"] == "TokenizersBackend" and kept["model_max_length"] == int(1e30)


def test_converted_tokenizer_config_has_no_loading_flags(make_model, tmp_path):
    """A tokenizer saved by transformers 5 after loading from a local folder carries is_local and
    local_files_only; the converted copy does not, and keeps the source's model_max_length."""
    from test_hub import save_tokenizer
    from transformers import AutoTokenizer

    src, _ = make_model("llama")
    save_tokenizer(src)
    AutoTokenizer.from_pretrained(src, local_files_only=True, model_max_length=64).save_pretrained(src)
    assert "is_local" in json.loads((src / "tokenizer_config.json").read_text())  # what 5.x writes
    convert(src, tmp_path / "out", 2, progress=False)
    tok = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only", "name_or_path"} & set(tok)
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and tok["model_max_length"] == 64
    assert Path(tmp_path / "out" / "tokenizer.json").is_file()
