"""scripts/gpu_check.sh, the prepared GPU check, runs end to end on the CPU at a tiny scale.

A GPU is lent to few sessions; this keeps the script that measures on one from rotting in between:
every section must run, write figures, and be gathered into the one report file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
SECTIONS = ("convert", "uptrain", "decode")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_tiny_run_gathers_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu" / "check.json"
    proc = _run("--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True
    assert report["device"] and report["versions"]["torch"]
    assert set(report["sections"]) == set(SECTIONS)
    for name, section in report["sections"].items():
        assert section["ok"], (name, section)
        assert section["figures"], f"section {name} wrote no figures"
        assert section["seconds"] <= section["limit_s"]
    md = out.with_suffix(".md").read_text()
    for name in SECTIONS:
        assert f"## {name}: ok" in md


def test_unknown_section_is_one_line_error() -> None:
    proc = _run("--only", "convert,bogus")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: unknown section 'bogus' (known: convert, uptrain, decode)"
    ]


def test_unknown_argument_is_one_line_error() -> None:
    proc = _run("--fast")
    assert proc.returncode == 2
    assert "unknown argument '--fast'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
