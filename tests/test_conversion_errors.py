"""Bad input: one clear error naming the problem and the fix, a non-zero exit, nothing half-written."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from gqa_uptrain import CheckpointError, ConfigError, OutputExistsError, convert
from gqa_uptrain.cli.convert import app


def leftovers(parent, name="out"):
    """Anything the converter left next to (or at) the output path."""
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.mark.parametrize(
    ("g", "message"),
    [
        (3, "does not divide the model's 4 K/V heads; pick one of \\[1, 2, 4\\]"),
        (8, "larger than"),
        (0, "positive"),
    ],
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
    with pytest.raises(
        CheckpointError, match=r"unsupported architecture model_type='mamba'; supported: .*llama"
    ):
        convert(src, tmp_path / "out", 2, progress=False)


def test_missing_shard_and_index_naming_absent_file(make_model, tmp_path):
    src, _ = make_model("llama", save_kwargs={"max_shard_size": "60KB"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (src / shard).unlink()
    with pytest.raises(
        CheckpointError, match=f"shard {shard} named in model.safetensors.index.json is missing"
    ):
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
    with pytest.raises(
        CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \[64, 64\]"
    ):
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
    from gqa_uptrain.io import writer

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
    for opt in (
        "--num-kv-heads",
        "--method",
        "--dtype",
        "--max-shard-size",
        "--overwrite",
        "--revision",
        "--allow-pickle",
    ):
        assert opt in help_.output


def test_truncated_or_corrupt_gguf(smollm2_gguf, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for data in (b"garbage", smollm2_gguf.open("rb").read(5000), smollm2_gguf.open("rb").read(20_000_000)):
        (bad / "model.gguf").write_bytes(data)
        with pytest.raises(CheckpointError, match="could not be read as GGUF .*re-download it"):
            convert(bad / "model.gguf", tmp_path / "out", 1, progress=False)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# --overwrite never loses the original; a full disk is one line; killed runs are cleaned up
# --------------------------------------------------------------------------------------------------


def one_error_line(result) -> str:
    """The CLI's output for a refused run: exactly one line, no traceback; returns it."""
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_overwrite_failing_after_moving_original_aside_restores_it(make_model, tmp_path, monkeypatch):
    from pathlib import Path

    src, _ = make_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    real_rename = Path.rename

    def rename(self, target):  # the final rename of the finished output fails (e.g. EXDEV, EIO)
        if self.name.startswith(".out.tmp-"):
            raise OSError(errno.EIO, "simulated I/O error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated I/O error"):
        convert(src, out, 2, overwrite=True, progress=False)
    assert leftovers(tmp_path) == ["out"]
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A folder on a 1 MiB filesystem: a real tmpfs where this process may mount one (root, no
    sandbox refusal), else a normal folder whose free space reads as 1 MiB. Returns (folder, real)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    real = (
        shutil.which("mount") is not None
        and hasattr(os, "geteuid")
        and os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
        ).returncode
        == 0
    )
    if not real:
        fake_disk_usage(monkeypatch, free=1 << 20)
    yield disk, real
    if real:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fake_disk_usage(monkeypatch, free: int, total: int = 1 << 40) -> None:
    usage = shutil._ntuple_diskusage(total, total - free, free)  # what shutil.disk_usage returns
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


def test_disk_too_small_is_refused_before_writing(make_model, small_disk):
    from typer.testing import CliRunner

    disk, _ = small_disk
    src, _ = make_model("llama", hidden=256)  # about 5.5 MB of weights
    res = CliRunner().invoke(app, [str(src), str(disk / "out"), "-g", "2", "-q"])
    line = one_error_line(res)
    assert f"not enough disk space for {disk / 'out'}" in line
    assert "the converted checkpoint needs 5.8 MiB" in line and "1.0 MiB free" in line
    assert "free up 4.8 MiB there or choose an output folder on a disk with room" in line
    assert leftovers(disk) == []


def test_disk_filling_up_mid_write_is_one_line_and_leaves_nothing(make_model, small_disk, monkeypatch):
    """Another writer takes the space after the check: ENOSPC mid-write is reported in one line,
    the partial output removed and the existing OUTPUT (replaced with --overwrite) kept."""
    from typer.testing import CliRunner

    from gqa_uptrain.io.checkpoint import SafetensorsReader

    disk, real = small_disk
    src, _ = make_model("llama", hidden=256)
    out = disk / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    fake_disk_usage(monkeypatch, free=1 << 40)  # the up-front check passes...
    if not real:  # ...and the disk fills up under the copy of the second tensor
        calls = {"n": 0}
        real_copy = SafetensorsReader.copy_raw

        def copy_raw(self, info, f, *args):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_copy(self, info, f, *args)

        monkeypatch.setattr(SafetensorsReader, "copy_raw", copy_raw)
    res = CliRunner().invoke(app, [str(src), str(out), "-g", "2", "-q", "--overwrite"])
    line = one_error_line(res)
    assert f"the disk filled up while writing {out} (No space left on device" in line
    assert "the partial output was removed and nothing else changed" in line
    assert leftovers(disk) == ["out"]
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


# A conversion that hangs once a few tensors of its shard are on disk, for the parent to kill.
_HANGING_CONVERSION = r"""
import sys, time
from pathlib import Path
from gqa_uptrain.io import writer
from gqa_uptrain.conversion.pipeline import convert

src, out, marker = sys.argv[1:4]
real_next = writer.ShardedWriter._next

def next_then_hang(self, name):
    result = real_next(self, name)
    if self._pos == 4:
        self._file.flush()
        Path(marker).touch()
        time.sleep(600)
    return result

writer.ShardedWriter._next = next_then_hang
convert(src, out, 2, progress=False)
"""


def test_killed_conversion_is_cleaned_up_by_the_next_run(make_model, tmp_path, caplog):
    import signal
    import time

    from gqa_uptrain.io.outputs import _host_tag

    src, _ = make_model("llama", hidden=256)
    out, marker = tmp_path / "out", tmp_path / "marker"
    log = (tmp_path / "child.log").open("w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _HANGING_CONVERSION, str(src), str(out), str(marker)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    holder = None
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, f"conversion exited early: {log.seek(0) or log.read()}"
            assert time.monotonic() < deadline, "conversion did not reach its shard in 240 s"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        (stale,) = tmp_path.glob(".out.tmp-*")
        assert stale.name.startswith(f".out.tmp-{child.pid}@{_host_tag()}-")
        partial = (stale / "model.safetensors").stat().st_size  # the shard's header and a few tensors
        assert 0 < partial < (src / "model.safetensors").stat().st_size
        # Another run into the same place that is still alive: its folder must be left alone.
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        live = tmp_path / f".out.tmp-{holder.pid}@{_host_tag()}-live1234"
        live.mkdir()
        (live / "model.safetensors").write_bytes(b"in progress")

        with caplog.at_level(logging.WARNING, logger="gqa_uptrain.io.outputs"):
            convert(src, out, 2, progress=False)
        assert not stale.exists()
        assert f"removed {stale}, left by an interrupted run (pid {child.pid}" in caplog.text
        assert (live / "model.safetensors").read_bytes() == b"in progress"
        assert sorted(leftovers(tmp_path)) == sorted(["out", live.name])
        assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    finally:
        for proc in (child, holder):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()
