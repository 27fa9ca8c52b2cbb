"""Bad input: one clear error naming the problem and the fix, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json

import pytest

from gqa_uptrain import CheckpointError, ConfigError, OutputExistsError, convert
from gqa_uptrain.cli.convert import app


def leftovers(parent, name="out"):
    """Anything the converter left next to (or at) the output path."""
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.mark.parametrize(
    ("g", "message"),
    [(3, "does not divide the model's 4 K/V heads; pick one of \\[1, 2, 4\\]"), (8, "larger than"), (0, "positive")],
)
def test_bad_num_kv_heads(make_model, tmp_path, g, message):
    src, _ = make_model("llama")
    with pytest.raises(ConfigError, match=message):
        convert(src, tmp_path / "out", g, progress=False)
    assert leftovers(tmp_path) == []


def test_unknown_architecture_lists_supported(make_model, tmp_path):
    src, _ = make_model("llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported architecture model_type='mamba'; supported: .*llama"):
        convert(src, tmp_path / "out", 2, progress=False)


def test_missing_shard_and_index_naming_absent_file(make_model, tmp_path):
    src, _ = make_model("llama", save_kwargs={"max_shard_size": "60KB"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (src / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard} named in model.safetensors.index.json is missing"):
        convert(src, tmp_path / "out", 2, progress=False)
    assert leftovers(tmp_path) == []


def test_index_names_tensor_in_no_shard(make_model, tmp_path):
    src, _ = make_model("llama", save_kwargs={"max_shard_size": "60KB"})
    path = src / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.layers.9.self_attn.k_proj.weight"] = next(iter(index["weight_map"].values()))
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.9.self_attn.k_proj.weight.*in no shard"):
        convert(src, tmp_path / "out", 2, progress=False)


def test_truncated_and_corrupt_safetensors(make_model, tmp_path):
    src, _ = make_model("llama")
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(src, tmp_path / "out", 2, progress=False)
    f.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        convert(src, tmp_path / "out", 2, progress=False)
    f.write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match="truncated"):
        convert(src, tmp_path / "out", 2, progress=False)
    assert leftovers(tmp_path) == []


def test_config_and_weights_disagree_names_the_tensor(make_model, tmp_path):
    src, _ = make_model("llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_key_value_heads"] = 2  # the weights have 4
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \[64, 64\]"):
        convert(src, tmp_path / "out", 1, progress=False)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert(tmp_path / "empty", tmp_path / "out", 1, progress=False)
    with pytest.raises(CheckpointError, match="neither a local folder nor a Hub repo id"):
        convert(tmp_path / "does" / "not" / "exist", tmp_path / "out", 1, progress=False)


def test_existing_output_refused_unless_overwrite(make_model, tmp_path):
    src, _ = make_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        convert(src, out, 2, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    convert(src, out, 2, overwrite=True, progress=False)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").exists()
    # An empty existing folder is fine without the flag.
    (tmp_path / "empty").mkdir()
    convert(src, tmp_path / "empty", 2, progress=False)


def test_failure_mid_write_leaves_nothing(make_model, tmp_path, monkeypatch):
    from gqa_uptrain import writer

    src, _ = make_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    calls = {"n": 0}
    real_write = writer.ShardedWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("No space left on device")
        return real_write(self, name, tensor)

    monkeypatch.setattr(writer.ShardedWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        convert(src, out, 2, overwrite=True, progress=False)
    # The previous output is untouched and no temporary folder is left behind.
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert leftovers(tmp_path) == ["out"]


def test_bad_shard_size_and_dtype(make_model, tmp_path):
    src, _ = make_model("llama")
    with pytest.raises(ConfigError, match="--max-shard-size"):
        convert(src, tmp_path / "out", 2, max_shard_size="huge", progress=False)
    with pytest.raises(ConfigError, match="--dtype"):
        convert(src, tmp_path / "out", 2, dtype="int3", progress=False)


def test_cli_success_and_errors(make_model, tmp_path):
    from typer.testing import CliRunner

    runner = CliRunner()
    src, _ = make_model("llama")
    ok = runner.invoke(app, [str(src), str(tmp_path / "out"), "--num-kv-heads", "2", "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "model.safetensors").exists()

    res = runner.invoke(app, [str(src), str(tmp_path / "out2"), "-g", "2"])
    assert res.exit_code == 0, res.output
    assert "4 → 2 K/V heads" in res.output and "50.0% smaller" in res.output

    bad = runner.invoke(app, [str(src), str(tmp_path / "out3"), "-g", "3"])
    assert bad.exit_code == 2
    lines = [line for line in bad.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "pick one of [1, 2, 4]" in lines[0]
    assert "Traceback" not in bad.output

    exists = runner.invoke(app, [str(src), str(tmp_path / "out"), "-g", "2"])
    assert exists.exit_code == 2 and "--overwrite" in exists.output

    help_ = runner.invoke(app, ["--help"])
    assert help_.exit_code == 0
    for opt in ("--num-kv-heads", "--method", "--dtype", "--max-shard-size", "--overwrite", "--revision", "--allow-pickle"):
        assert opt in help_.output


def test_truncated_or_corrupt_gguf(smollm2_gguf, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for data in (b"garbage", smollm2_gguf.open("rb").read(5000), smollm2_gguf.open("rb").read(20_000_000)):
        (bad / "model.gguf").write_bytes(data)
        with pytest.raises(CheckpointError, match="could not be read as GGUF .*re-download it"):
            convert(bad / "model.gguf", tmp_path / "out", 1, progress=False)
    assert leftovers(tmp_path) == []
