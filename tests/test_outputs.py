"""outputs.py: replacing an output never loses the old one, stale temporary folders are cleaned up,
and a full disk is a one-line error with nothing left behind."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gqa_uptrain.errors import DiskFullError, GQAError, OutputExistsError
from gqa_uptrain.io.outputs import (
    _host_tag,
    atomic_output_dir,
    check_free_space,
    clean_stale_siblings,
    format_bytes,
)


def siblings(parent: Path, name: str = "out") -> list[str]:
    """The output and every temporary or moved-aside folder of it."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def original(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    return out


def fail_rename_of(monkeypatch, prefix: str, exc: BaseException) -> None:
    """Make ``Path.rename`` of folders whose name starts with ``prefix`` raise ``exc``."""
    real = Path.rename

    def rename(self, target):
        if self.name.startswith(prefix):
            raise exc
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


@pytest.mark.parametrize("exc", [OSError(errno.EXDEV, "simulated"), KeyboardInterrupt()])
def test_overwrite_failing_final_rename_restores_the_original(tmp_path, original, monkeypatch, exc):
    # The old folder is moved aside before the new one is renamed in; if that rename fails
    # (or Ctrl-C lands between the two), the original must come back, contents and all.
    fail_rename_of(monkeypatch, ".out.tmp-", exc)
    with pytest.raises(type(exc)), atomic_output_dir(original, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert siblings(tmp_path) == ["out"]
    assert [p.name for p in original.iterdir()] == ["precious.txt"]
    assert (original / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_only_when_complete(tmp_path, original):
    with atomic_output_dir(original, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        # Until the block ends the original is untouched.
        assert (original / "precious.txt").read_text() == "keep me"
    assert [p.name for p in original.iterdir()] == ["new.txt"]
    assert siblings(tmp_path) == ["out"]  # the moved-aside copy is gone once the new one is in


def test_overwrite_failure_in_block_leaves_original(tmp_path, original):
    with pytest.raises(RuntimeError), atomic_output_dir(original, overwrite=True) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert siblings(tmp_path) == ["out"] and (original / "precious.txt").read_text() == "keep me"


def test_existing_output_refused_without_overwrite(tmp_path, original):
    with pytest.raises(OutputExistsError, match="--overwrite"), atomic_output_dir(original):
        pass
    assert siblings(tmp_path) == ["out"]


def test_temporary_folder_names_its_owner(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}@{_host_tag()}-")


def test_stale_folder_of_dead_process_removed_live_and_unknown_kept(tmp_path, caplog):
    host = _host_tag()
    dead = tmp_path / f".out.tmp-{dead_pid()}@{host}-abcd1234"
    live = tmp_path / f".out.tmp-{os.getpid()}@{host}-efgh5678"
    remote = tmp_path / ".out.tmp-12345@some-other-host-ijkl9012"
    legacy = tmp_path / ".out.tmp-mnop3456"  # written before owners were recorded
    moved_aside = tmp_path / f".out.old-{dead_pid()}@{host}-qrst7890"
    unrelated = tmp_path / ".outer.tmp-1@x-y"
    for p in (dead, live, remote, legacy, moved_aside, unrelated):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"\0" * 1000)
    with caplog.at_level(logging.INFO, logger="gqa_uptrain.io.outputs"):
        removed = clean_stale_siblings(tmp_path / "out")
    assert removed == [dead] and not dead.exists()
    for kept in (live, remote, legacy, moved_aside, unrelated):
        assert (kept / "model.safetensors").exists(), kept
    text = caplog.text
    assert f"removed {dead}" in text and "no longer running" in text
    assert f"{live} is being written by running process {os.getpid()}" in text
    assert f"{remote} belongs to process 12345 on host some-other-host" in text
    assert f"{legacy} is a temporary folder of an interrupted run" in text
    assert f"{moved_aside} holds a previous out moved aside" in text and "rename it back" in text
    assert str(unrelated) not in text


def test_dry_run_cleanup_only_reports(tmp_path, caplog):
    dead = tmp_path / f".out.tmp-{dead_pid()}@{_host_tag()}-abcd1234"
    dead.mkdir()
    with caplog.at_level(logging.WARNING, logger="gqa_uptrain.io.outputs"):
        assert clean_stale_siblings(tmp_path / "out", remove=False) == [dead]
    assert dead.exists() and "a real run removes it" in caplog.text


def test_atomic_output_dir_cleans_stale_before_writing(tmp_path):
    dead = tmp_path / f".out.tmp-{dead_pid()}@{_host_tag()}-abcd1234"
    dead.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert siblings(tmp_path) == ["out"]


def fake_disk(monkeypatch, free: int, total: int = 1 << 40) -> None:
    usage = shutil._ntuple_diskusage(total, total - free, free)  # what shutil.disk_usage returns
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


def test_check_free_space_names_both_numbers_and_the_fix(tmp_path, monkeypatch):
    fake_disk(monkeypatch, free=3 << 20)
    with pytest.raises(DiskFullError) as e:
        check_free_space(tmp_path / "new" / "out", 5 << 20, "the converted checkpoint")
    msg = str(e.value)
    assert "\n" not in msg
    assert "the converted checkpoint needs 5.0 MiB" in msg and "has 3.0 MiB free" in msg
    assert "free up 2.0 MiB" in msg and "choose an output folder on a disk with room" in msg
    assert isinstance(e.value, GQAError) and isinstance(e.value, OSError)
    check_free_space(tmp_path / "out", 3 << 20)  # exactly enough is enough
    fake_disk(monkeypatch, free=0, total=0)  # a filesystem that reports no size is not checked
    check_free_space(tmp_path / "out", 5 << 20)


def test_enospc_in_block_becomes_one_line_and_removes_temporary(tmp_path, original, monkeypatch):
    fake_disk(monkeypatch, free=1 << 20)
    with pytest.raises(DiskFullError) as e, atomic_output_dir(original, overwrite=True) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(e.value)
    assert "\n" not in msg and "disk filled up while writing" in msg and "1.0 MiB free now" in msg
    assert "partial output was removed" in msg
    assert siblings(tmp_path) == ["out"] and (original / "precious.txt").read_text() == "keep me"


def test_needed_bytes_checked_before_the_block(tmp_path, monkeypatch):
    fake_disk(monkeypatch, free=10)
    ran = []
    with (
        pytest.raises(DiskFullError, match="needs 100 B but .* has 10 B free"),
        atomic_output_dir(tmp_path / "out", needed_bytes=100),
    ):
        ran.append(True)
    assert not ran and siblings(tmp_path) == []


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1536, 5 << 30, 3 << 40)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 GiB",
        "3.0 TiB",
    ]
