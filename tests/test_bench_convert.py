"""Smoke run of scripts/bench_convert.py at tiny sizes: it measures all three routes and reports them.

The figures themselves are not asserted (timings of a few-MB checkpoint say nothing about the
targets); what is asserted is what a user reads them for: every route was run and measured, the
table and the target verdicts are printed, the peak RSS is the route's own (a plain copy does not
inherit the benchmark's torch-sized memory), and the working folder is cleaned up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_convert.py"


def _bench(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[str, list[dict]]:
    """Run the benchmark with ``args`` in ``tmp_path/work``; its stdout and its JSON figures (it must succeed)."""
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow  # three child processes, two of which import torch
def test_bench_convert_tiny_prints_figures(tmp_path):
    work = tmp_path / "work"
    text, figures = _bench(tmp_path, "--shape", "tiny", "--layers", "2", timeout=300)
    for needle in ("copy", "converter", "naive", "MB/s", "peak RSS", "vs copy"):
        assert needle in text
    assert "target: converter throughput >= 0.8x copy:" in text
    assert "target: converter peak RSS < 1.5 GB:" in text
    assert text.count("PASS") + text.count("FAIL") == 2

    runs = {r["route"]: r for r in figures}
    assert set(runs) == {"copy", "converter", "naive"}
    for r in runs.values():
        assert r["layers"] == 2 and r["seconds"] > 0 and r["peak_rss"] > 0 and not r["estimated"]
        assert r["src_bytes"] == runs["copy"]["src_bytes"] > 0
    # The copy writes what it reads; a 32 -> 8 K/V-head conversion writes less.
    assert runs["copy"]["out_bytes"] >= runs["copy"]["src_bytes"]
    assert 0 < runs["converter"]["out_bytes"] < runs["copy"]["out_bytes"]
    assert runs["naive"]["out_bytes"] > 0
    # Each route's own memory: a copy needs a few MB, the converter imports torch.
    assert runs["copy"]["peak_rss"] < 100e6 < runs["converter"]["peak_rss"]
    assert list(work.iterdir()) == []  # the working folder was removed


def test_bench_convert_refuses_layers_that_do_not_fit(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--layers", "100000", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "need" in proc.stderr and "--layers" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # child processes that import torch, a tokenizer trained on the docs
def test_bench_convert_aligned_prints_memory_and_grouping(tmp_path, python_docs):
    """--method aligned: the calibrated converter runs beside mean pooling at two depths, its peak
    RSS and the growth per layer are printed, and similarity grouping is timed per case with its
    search memory; the mean-pooling targets are still checked."""
    work = tmp_path / "work"
    text, figures = _bench(
        tmp_path, "--shape", "tiny", "--layers", "2", "--skip-naive", "--method", "aligned",
        "--aligned-layers", "1,2", "--calibration", str(python_docs / "tutorial"),
        "--calibration-tokens", "256", "--calibration-seq-len", "64",
        "--grouping", "16:2,4", "32:8", "--grouping-hidden", "128",
    )  # fmt: skip
    assert text.count("PASS") + text.count("FAIL") == 3  # the converter's targets and aligned's
    assert "target: aligned --no-refine peak RSS <= 1.5 GB:" in text and "at 2 layers:" in text
    assert "aligned (calibration: 256 tokens of real text, seq 64): peak RSS" in text
    assert "aligned peak RSS growth:" in text and "MB per layer from 1 to 2 layers" in text
    assert "--grouping similarity" in text and "search memory" in text

    aligned = sorted((r for r in figures if r["route"] == "aligned"), key=lambda r: r["layers"])
    assert [r["layers"] for r in aligned] == [1, 2]
    assert all(r["peak_rss"] > 100e6 and r["out_bytes"] > 0 for r in aligned)
    copy = next(r for r in figures if r["route"] == "copy")
    assert aligned[-1]["out_bytes"] < copy["out_bytes"]  # 32 -> 8 K/V heads (shapes checked by the script)
    grouping = [r for r in figures if r["route"] == "grouping"]
    cases = {(r["kind"], r["heads"], r["num_kv_heads"]) for r in grouping}
    assert cases == {(k, h, g) for k in ("mean", "aligned") for h, g in [(16, 2), (16, 4), (32, 8)]}
    for r in grouping:
        assert r["cost"] <= r["contiguous_cost"] * (1 + 1e-9)
        assert r["search_peak_bytes"] < 100e6 and r["search_s"] >= 0 and r["process_peak_rss"] > 0
    assert list(work.iterdir()) == []


@pytest.mark.slow  # child processes that import torch, a tokenizer trained on the docs
def test_bench_convert_refine_steps_reports_refinement(tmp_path, python_docs):
    """--refine-steps N: the aligned converter also runs with layer-wise refinement (RefineSpec(steps=N))
    beside the closed form; its peak RSS, the RSS after each layer, the Adam steps and their time, and
    the calibration activations it keeps are printed and written to the JSON."""
    work = tmp_path / "work"
    text, figures = _bench(
        tmp_path, "--shape", "tiny", "--layers", "1", "--skip-naive", "--method", "aligned",
        "--refine-steps", "2", "--calibration", str(python_docs / "tutorial"),
        "--calibration-tokens", "256", "--calibration-seq-len", "64", "--grouping",
    )  # fmt: skip
    assert "closed form vs layer-wise refinement (--refine-steps 2)" in text
    assert "refinement keeps 3 x 256 tokens x 256 x 4 B = 0.8 MB of calibration activations" in text
    assert "refined vs closed form at 1 layers: peak RSS" in text

    runs = {r["route"]: r for r in figures}
    assert {"aligned", "refined"} <= set(runs)
    closed, refined = runs["aligned"]["detail"], runs["refined"]["detail"]
    assert closed["refine_steps"] == 0 and closed["reports"] == []
    # The closed form merges and spills each module as it is calibrated too, so its RSS is sampled there.
    assert [m["module"] for m in closed["per_module"]] == ["model.layers.0.self_attn"]
    assert refined["refine_steps"] == 2 and refined["tokens"] == [4, 64]
    (report,) = refined["reports"]  # one attention module, refined for at most 2 steps
    assert (
        report["module"] == "model.layers.0.self_attn" and 1 <= report["steps"] <= 2 and report["seconds"] > 0
    )
    (after,) = refined["per_module"]
    assert 100e6 < after["rss"] <= after["peak_rss"] <= runs["refined"]["peak_rss"] * 1.01
    # The same tensors (shapes checked by the script); the model cards differ by the refinement note.
    assert (
        runs["aligned"]["out_bytes"] > 0
        and abs(runs["refined"]["out_bytes"] - runs["aligned"]["out_bytes"]) < 1e5
    )
    assert list(work.iterdir()) == []


def test_bench_convert_refine_steps_needs_aligned(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--refine-steps", "3", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "--method aligned" in proc.stderr
    assert list(tmp_path.iterdir()) == []
