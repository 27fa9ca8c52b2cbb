"""Converted outputs load the same in the tools users load them with.

- transformers 4.x (``.venv-tf4``, the version llama.cpp's converter pins) and 5.x give the same
  logits, RoPE base and tokenizer ids for every native family and for the real SmolLM2 output;
- llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python source distribution, in
  ``.assets/llama.cpp``) turns Llama, Mistral, Qwen2 and SmolLM2 outputs into GGUFs with the reduced
  K/V head count whose logits, read back with transformers' GGUF loader, are the folder's; it
  refuses a non-native family (GPT-2), as the card says;
- peft attaches LoRA adapters to a converted model, saves, reloads and merges them.

``scripts/setup.sh`` installs both clients; without them these tests skip locally and fail under
``GQA_REQUIRE_ASSETS=1`` (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _assets import require_asset
from conftest import NATIVE_FAMILIES, tiny_config

from gqa_uptrain import convert

ROOT = Path(__file__).resolve().parents[1]
TF4_PYTHON = ROOT / ".venv-tf4" / "bin" / "python"
LLAMA_CPP = ROOT / ".assets" / "llama.cpp"
CLIENT = Path(__file__).with_name("compat_client.py")
# A RoPE base no family defaults to: a config that loses it loads with the default, and fails here.
THETA = 123456.0
# Families whose RoPE settings differ from transformers' defaults in more than the base.
ROPE_EXTRA = {
    "llama": {"rope_type": "linear", "factor": 2.0},
    "qwen2": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
    "phi": {"partial_rotary_factor": 0.75},
    "stablelm": {"partial_rotary_factor": 0.5},
}
LLAMA_CPP_FAMILIES = ("llama", "mistral", "qwen2")


def _env() -> dict[str, str]:
    """The clients run offline, single-threaded, with nothing of this interpreter's path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tf4_python() -> Path:
    require_asset(TF4_PYTHON.is_file(), f"{TF4_PYTHON} is missing (scripts/setup.sh builds .venv-tf4)")
    return TF4_PYTHON


@pytest.fixture(scope="module")
def llama_cpp(tf4_python) -> Path:
    script = LLAMA_CPP / "convert_hf_to_gguf.py"
    require_asset(script.is_file(), f"{script} is missing (scripts/setup.sh extracts llama.cpp's converter)")
    return script


@pytest.fixture(scope="module")
def smol_output(smollm2_gguf, tmp_path_factory) -> Path:
    """The real SmolLM2 GGUF converted 3 -> 1 K/V heads with the default settings."""
    out = tmp_path_factory.mktemp("compat") / "smollm2-mqa"
    convert(smollm2_gguf, out, 1, progress=False, command=f"gqa-convert {smollm2_gguf} {out} -g 1")
    return out


def _tiny_output(root: Path, family: str, rope: dict, **config) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(family, rope_parameters={"rope_type": "default", "rope_theta": THETA, **rope}, **config)
    src = root / f"{family}-src"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    return src


@pytest.fixture(scope="module")
def family_outputs(tmp_path_factory) -> dict[str, Path]:
    """Every native family, tiny and random with non-default RoPE, converted 4 -> 2 K/V heads."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in NATIVE_FAMILIES:
        src = _tiny_output(root, family, ROPE_EXTRA.get(family, {}))
        out[family] = root / family
        convert(src, out[family], 2, progress=False)
    return out


@pytest.fixture(scope="module")
def llama_cpp_outputs(smol_output, tmp_path_factory) -> dict[str, Path]:
    """Llama, Mistral and Qwen2 outputs with a tokenizer llama.cpp knows (SmolLM2's, copied into the
    source, so the converter copies it on) and its vocabulary size; plain RoPE (transformers' GGUF
    loader reads no RoPE scaling back)."""
    root = tmp_path_factory.mktemp("lcpp")
    out = {}
    for family in LLAMA_CPP_FAMILIES:
        src = _tiny_output(root, family, {}, vocab_size=49152, tie_word_embeddings=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copyfile(smol_output / name, src / name)
        out[family] = root / family
        convert(src, out[family], 2, progress=False)
    return out


@pytest.fixture(scope="module")
def tf4_report(tf4_python, family_outputs, llama_cpp_outputs, smol_output, tmp_path_factory) -> dict:
    """compat_client.py run once in transformers 4.x over every output: {folder: description}."""
    folders = [*family_outputs.values(), *llama_cpp_outputs.values(), smol_output]
    dest = tmp_path_factory.mktemp("tf4") / "report.npz"
    r = _run([str(tf4_python), str(CLIENT), str(dest), *map(str, folders)], cwd=dest.parent, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    z = np.load(dest)
    meta = json.loads(str(z["meta"]))
    assert meta["transformers"].startswith("4."), meta["transformers"]
    report = {}
    for i, folder in enumerate(folders):
        report[folder] = {**meta["folders"][str(folder)], "logits": z[f"logits_{i}"]}
    return report


def test_native_families_load_alike_in_transformers_4_and_5(family_outputs, tf4_report):
    """Same RoPE base and logits in 4.x and 5.x: config.json carries rope_theta, partial_rotary_factor
    and rope_scaling beside 5.x's rope_parameters (without them 4.x silently uses its defaults)."""
    import compat_client

    for family, folder in family_outputs.items():
        v4, v5 = tf4_report[folder], compat_client.describe(folder)
        assert v4["rope_theta"] == v5["rope_theta"] == THETA, family
        assert v4["num_key_value_heads"] == v5["num_key_value_heads"] == 2, family
        np.testing.assert_allclose(v4["logits"], v5["logits"], atol=1e-3, rtol=1e-3, err_msg=family)


def test_smollm2_output_loads_alike_in_transformers_4_and_5(smol_output, llama_cpp_outputs, tf4_report):
    """The real SmolLM2 output: model, tokenizer (a class 4.x has), chat template, greedy generation
    and context length."""
    import compat_client

    for folder in [smol_output, *llama_cpp_outputs.values()]:
        v4, v5 = tf4_report[folder], compat_client.describe(folder)
        assert v4["tokenizer_class"] == "PreTrainedTokenizerFast", v4["tokenizer_class"]
        assert v4["text_ids"] == v5["text_ids"] and v4["chat_ids"] == v5["chat_ids"], folder.name
        assert v4["generated_ids"] == v5["generated_ids"] and v5["generated_ids"], folder.name
        np.testing.assert_allclose(v4["logits"], v5["logits"], atol=1e-3, rtol=1e-3, err_msg=folder.name)
    v4, v5 = tf4_report[smol_output], compat_client.describe(smol_output)
    assert v4["rope_theta"] == v5["rope_theta"] == 100000.0
    assert v4["model_max_length"] == v5["model_max_length"] == 8192


def test_gguf_source_output_size_card_and_files(smol_output, smollm2_gguf, tmp_path, monkeypatch):
    """The SmolLM2 GGUF output as a user gets it: bfloat16 by default (half of float32), a card with the
    GGUF's license that names the source by file, says it needs uptraining and where the method comes
    from, no loading flags in the tokenizer config, and no path of this machine in any file."""
    from _hub_fakes import use_fake_login
    from huggingface_hub import ModelCard

    from gqa_uptrain.hub.publish import push_folder
    from gqa_uptrain.io.checkpoint import read_safetensors_header

    config = json.loads((smol_output / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["rope_theta"] == 100000.0
    infos = read_safetensors_header(smol_output / "model.safetensors")
    assert {str(i.dtype) for i in infos} == {"torch.bfloat16"}
    assert (smol_output / "model.safetensors").stat().st_size < 300e6  # float32 was 520 MB

    card = ModelCard.load(smol_output / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model is None  # the GGUF names no base
    text = card.text
    assert "Converted from `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama)" in text
    assert "**Not usable before uptraining.**" in text and "Ainslie et al. 2023" in text
    assert "Weights dequantized from the GGUF's Q4_1 tensors and written in bfloat16." in text
    assert "License `apache-2.0`, carried over from the GGUF metadata." in text
    assert "gqa-convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2-mqa -g 1" in text

    tok = json.loads((smol_output / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(tok)
    assert tok["model_max_length"] == 8192 and tok["tokenizer_class"] == "PreTrainedTokenizerFast"

    needles = {
        str(smollm2_gguf.parent),
        str(smol_output.parent),
        str(ROOT),
        sys.prefix,
        str(Path.home()) + "/",
    }
    for p in smol_output.iterdir():
        data = p.read_bytes()
        assert not [n for n in needles if n.encode() in data], p.name

    # Publishing: the card asks for the base model the GGUF cannot name, and keeps the license.
    use_fake_login(tmp_path, monkeypatch, "hf_FAKEtoken1234567890")
    plan = push_folder(smol_output, "someone/smollm2-mqa", dry_run=True).plan
    assert any("--base-model" in w for w in plan.warnings)
    plan = push_folder(
        smol_output, "someone/smollm2-mqa", dry_run=True, base_model="HuggingFaceTB/SmolLM2-135M-Instruct"
    ).plan
    assert plan.warnings == [] and plan.card.data.license == "apache-2.0"
    assert plan.card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def _gguf_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}


# Runs convert_hf_to_gguf.py once per argument list in one interpreter, exactly as `python
# convert_hf_to_gguf.py ARGS` does (run_path with __name__ == "__main__"), so torch and transformers
# are imported once for all the outputs rather than once each.
_BATCH = (
    "import json, os, runpy, sys\n"
    "script, jobs = sys.argv[1], json.loads(sys.argv[2])\n"
    "sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` puts the script's folder first\n"
    "for args in jobs:\n"
    "    print('converting', args[0], file=sys.stderr, flush=True)\n"
    "    sys.argv = [script, *args]\n"
    "    runpy.run_path(script, run_name='__main__')\n"
)


@pytest.mark.slow
def test_llama_cpp_converts_native_outputs(llama_cpp, tf4_python, llama_cpp_outputs, smol_output, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py, in the transformers version it pins, converts each output;
    the GGUF has the reduced K/V head count and, read back with transformers' GGUF loader, the
    folder's logits (f32 for the float32 tiny models, bf16 for the bf16 SmolLM2 output: no rounding)."""
    from transformers import AutoModelForCausalLM

    cases = [(f, p, "f32", 2) for f, p in llama_cpp_outputs.items()] + [("smollm2", smol_output, "bf16", 1)]
    jobs = [
        [str(folder), "--outfile", str(tmp_path / f"{name}.gguf"), "--outtype", t]
        for name, folder, t, _ in cases
    ]
    r = _run([str(tf4_python), "-c", _BATCH, str(llama_cpp), json.dumps(jobs)], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]

    ids = torch.tensor([[1, 5, 9, 23, 7, 2, 11, 3, 17, 4, 8, 6]])
    for name, folder, _, kv_heads in cases:
        gguf_path = tmp_path / f"{name}.gguf"
        fields = _gguf_fields(gguf_path)
        arch = fields["general.architecture"]
        config = json.loads((folder / "config.json").read_text())
        assert fields[f"{arch}.attention.head_count_kv"] == kv_heads, name
        assert fields[f"{arch}.attention.head_count"] == config["num_attention_heads"], name
        assert fields[f"{arch}.rope.freq_base"] == pytest.approx(config["rope_theta"]), name

        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        theirs = AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        assert theirs.config.num_key_value_heads == kv_heads
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4, msg=name)
        del ours, theirs
    assert fields["general.license"] == "apache-2.0"  # the SmolLM2 card's license reaches the GGUF


@pytest.mark.slow
def test_llama_cpp_refuses_a_remote_code_family(llama_cpp, tf4_python, tmp_path):
    """GPT-2 has no GQA in transformers, so its output ships code llama.cpp does not know: the converter
    refuses it (what the card and the README say)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    convert(tmp_path / "gpt2", tmp_path / "gpt2-gqa2", 2, progress=False)
    r = _run(
        [str(tf4_python), str(llama_cpp), str(tmp_path / "gpt2-gqa2"), "--outfile", "x.gguf"], cwd=tmp_path
    )
    assert r.returncode != 0 and "GPT2GQALMHeadModel" in r.stderr and "not supported" in r.stderr
    assert "Not llama.cpp" in (tmp_path / "gpt2-gqa2" / "README.md").read_text()


def test_peft_lora_attaches_saves_reloads_and_merges(make_model, tmp_path):
    """The documented peft route: LoRA on q/k/v/o of a converted model trains, saves, reloads and merges."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    src, _ = make_model("llama")
    out = tmp_path / "gqa2"
    convert(src, out, 2, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    k_lora = model.base_model.model.model.layers[0].self_attn.k_proj
    assert k_lora.lora_B["default"].weight.shape[0] == 2 * 16  # the reduced K projection: 2 heads of 16
    ids = torch.randint(0, 128, (2, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(out), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, expected)  # the adapter changed the model
