"""Converted outputs run in llama.cpp's engine (llama-cpp-python, built by scripts/setup.sh) as in transformers.

Each output (tiny Llama, Mistral and Qwen2 converted 4 -> 2 K/V heads, and the real SmolLM2 converted
3 -> 1 by mean pooling) and its original go through llama.cpp's own ``convert_hf_to_gguf.py`` into f16
and Q8_0 GGUFs, built once for the module. In llama.cpp:

- greedy tokens equal transformers' on the same folder (f16; float32 in transformers);
- the KV cache llama.cpp allocates is G/H of the original's, and exactly what gqa-eval computes from
  the folder's config for an f16 cache;
- perplexity on real text equals transformers' on the same token ids: within 1% in f16, 3% in Q8_0;
- ``gqa-eval --engine llama.cpp`` measures it all from the command line, and refuses a non-GGUF file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from _assets import require_asset
from conftest import tiny_config
from test_compat import _BATCH, LLAMA_CPP, TF4_PYTHON, _run
from typer.testing import CliRunner

from gqa_uptrain import convert
from gqa_uptrain.cli.evaluate import app

FAMILIES = ("llama", "mistral", "qwen2")
PPL_TOLERANCE = {"f16": 0.01, "q8_0": 0.03}  # |log perplexity difference| (nats per token)
runner = CliRunner()


@pytest.fixture(scope="module")
def llama_cpp_lib():
    present = importlib.util.find_spec("llama_cpp") is not None
    require_asset(present, "llama-cpp-python is not installed (scripts/setup.sh builds and installs it)")
    require_asset(TF4_PYTHON.is_file(), f"{TF4_PYTHON} is missing (scripts/setup.sh builds .venv-tf4)")
    script = LLAMA_CPP / "convert_hf_to_gguf.py"
    require_asset(script.is_file(), f"{script} is missing (scripts/setup.sh extracts llama.cpp's converter)")
    return script


@pytest.fixture(scope="module")
def cases(llama_cpp_lib, smollm2_gguf, tmp_path_factory) -> dict[str, dict]:
    """{name: {"folder", "original", "kv", "heads", "f16", "q8_0", "original_f16"}} with GGUFs built once."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lcpp-engine")
    out: dict[str, dict] = {}
    smol_orig, smol = root / "smollm2", root / "smollm2-mqa"
    convert(smollm2_gguf, smol_orig, 3, progress=False)  # the original, written as a folder (unchanged)
    convert(smollm2_gguf, smol, 1, progress=False)  # mean pooling 3 -> 1
    out["smollm2"] = {"folder": smol, "original": smol_orig, "kv": 1, "heads": 3}
    for family in FAMILIES:
        torch.manual_seed(0)
        cfg = tiny_config(family, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=512)
        src = root / f"{family}-mha"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # a tokenizer llama.cpp knows
            shutil.copyfile(smol / name, src / name)
        convert(src, root / family, 2, progress=False)
        out[family] = {"folder": root / family, "original": src, "kv": 2, "heads": 4}
    jobs = []
    for name, c in out.items():
        for kind, folder, outtype in (("f16", c["folder"], "f16"), ("q8_0", c["folder"], "q8_0"),
                                      ("original_f16", c["original"], "f16")):  # fmt: skip
            c[kind] = root / f"{name}.{kind}.gguf"
            jobs.append([str(folder), "--outfile", str(c[kind]), "--outtype", outtype])
    r = _run([str(TF4_PYTHON), "-c", _BATCH, str(llama_cpp_lib), json.dumps(jobs)], cwd=root, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def text_ids(python_docs, cases) -> list[int]:
    """Up to 512 tokens of real text (SmolLM2's tokenizer, which every case shares)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cases["smollm2"]["folder"])
    text = (python_docs / "tutorial" / "classes.rst.txt").read_text(encoding="utf-8")[:6000]
    return tok(text, add_special_tokens=False)["input_ids"][:512]


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_in_f16(cases, text_ids):
    """Greedy continuation of a real prompt: the same 12 tokens in llama.cpp (f16 GGUF) and transformers."""
    from gqa_uptrain.evaluation.llama_cpp import EngineModel, engine_generate

    prompt = text_ids[:40]
    for name, c in cases.items():
        model = _hf(c["folder"])
        x = torch.tensor([prompt])
        with torch.no_grad():
            ours = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                pad_token_id=0,
            )[0, len(prompt):].tolist()  # fmt: skip
        with EngineModel(c["f16"], threads=2) as engine:
            assert engine.layout.num_kv_heads == c["kv"], name
            theirs = engine_generate(engine, prompt, 12)
        assert theirs == ours, name


@pytest.mark.slow
def test_kv_cache_allocated_by_llama_cpp_is_g_over_h(cases):
    """llama.cpp's allocated cache (its log line) for the output is kv/heads of the original's, and equals
    the bytes per token gqa-eval computes from the folder's config for an f16 cache, times the cells
    (llama.cpp runs Mistral's GGUF without a sliding window: every cell is kept)."""
    from transformers import AutoConfig

    from gqa_uptrain.evaluation import kv_layout
    from gqa_uptrain.evaluation.llama_cpp import EngineModel

    cells = 8192
    for name, c in cases.items():
        allocated = {}
        for kind in ("f16", "original_f16"):
            with EngineModel(c[kind], threads=1) as engine, engine.context(cells) as ctx:
                assert ctx.kv.match and ctx.kv.cells == cells, (name, ctx.kv)
                allocated[kind] = ctx.kv.allocated_bytes
        assert allocated["f16"] * c["heads"] == allocated["original_f16"] * c["kv"], name
        per_token = kv_layout(AutoConfig.from_pretrained(c["folder"]), torch.float16).bytes_per_token
        assert allocated["f16"] == per_token * cells, name


@pytest.mark.slow
def test_perplexity_in_llama_cpp_matches_transformers(cases, text_ids):
    """Same windows, same token ids: llama.cpp's perplexity is transformers' within 1% (f16) / 3% (Q8_0);
    llama.cpp's tokenizer gives the ids transformers' does."""
    from gqa_uptrain.evaluation import perplexity
    from gqa_uptrain.evaluation.llama_cpp import EngineModel, engine_perplexity

    text = "Classes provide a means of bundling data and functionality together."
    for name, c in cases.items():
        ids = text_ids[:384] if name == "smollm2" else text_ids[:192]  # tiny models: fewer windows suffice
        ref = perplexity(_hf(c["folder"]), torch.tensor(ids), 128, 96, progress=False)
        for kind in ("f16", "q8_0"):
            with EngineModel(c[kind], threads=2) as engine:
                if name == "smollm2" and kind == "f16":
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(c["folder"])
                    assert engine.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
                got = engine_perplexity(engine, ids, 128, 96, progress=False)
            assert got.tokens_scored == ref.tokens_scored == len(ids) - 1
            gap = abs(math.log(got.perplexity) - math.log(ref.perplexity))
            assert gap < PPL_TOLERANCE[kind], (name, kind, got.perplexity, ref.perplexity)


@pytest.mark.slow
def test_gqa_eval_engine_llama_cpp_command(cases, python_docs, tmp_path):
    """gqa-eval --engine llama.cpp MODEL.gguf --baseline ORIGINAL.gguf: perplexity, prompt and decode speed with
    parallel sequences, KV cache, JSON and a tokens/s-vs-batch chart; a non-GGUF file is a one-line error."""
    c = cases["llama"]
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    args = ["--engine", "llama.cpp", str(c["f16"]), "--baseline", str(c["original_f16"]), "--context", "64",
            "--batch-size", "1,2", "--new-tokens", "4", "--repeats", "1", "--threads", "2",
            "--data", str(python_docs / "tutorial" / "appetite.rst.txt"), "--max-eval-tokens", "200",
            "--max-length", "64", "--flash-attn", "off", "--json", str(out), "--plot", str(plots)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    model, base = report["models"]
    assert report["engine"] == "llama.cpp" and model["layout"]["num_kv_heads"] == 2
    assert report["options"]["flash_attn"] == "off" and "flash attention off" in result.output
    assert [(s["context"], s["sequences"]) for s in model["speed"]] == [(64, 1), (64, 2)]
    for s in model["speed"] + base["speed"]:
        assert s["decode_tokens_per_s"] > 0 and s["prompt_tokens_per_s"] > 0 and s["kv"]["match"]
    for a, b in zip(model["speed"], base["speed"], strict=True):  # the log line's MiB have 2 decimals:
        assert 2 * a["kv"]["computed_bytes"] == b["kv"]["computed_bytes"]  # tiny caches compare computed
        assert a["kv"]["match"] and b["kv"]["match"]
    assert model["speed"][1]["kv"]["cells"] >= 128  # 2 sequences of 64 (llama.cpp rounds small caches up)
    assert model["perplexity"]["tokens_scored"] == 199 and base["perplexity"]["perplexity"] > 1
    assert (plots / "tokens_per_s_vs_batch.png").read_bytes()[:4] == b"\x89PNG"

    bad = runner.invoke(app, ["--engine", "llama.cpp", str(c["folder"] / "config.json")])
    assert bad.exit_code != 0 and "not a GGUF file" in bad.output
    bad = runner.invoke(app, ["--engine", "llama.cpp", str(c["f16"]), "--decode-path", "static"])
    assert bad.exit_code != 0 and "--decode-path static" in bad.output
    bad = runner.invoke(app, [str(c["folder"]), "--flash-attn", "on"])
    assert bad.exit_code != 0 and "--flash-attn applies to --engine llama.cpp" in bad.output
