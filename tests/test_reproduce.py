"""scripts/reproduce_paper.py at smoke scale: runs end to end, every table cell filled, charts written."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_paper.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_paper"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_reproduction_fills_every_cell(tmp_path, python_docs):
    rp = _load_script()
    out = tmp_path / "results"
    # The tutorial (17 real documents) keeps the smoke run to about a minute on 2 cores.
    docs = python_docs / "tutorial"
    code = rp.main(
        ["--scale", "smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--data", str(docs)]
    )
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    heads = result["scale"]["heads"]
    groups = [g for g in rp.kv_heads_list(heads) if g < heads]
    # One row per (method, K/V heads, alpha), plus the MHA original and its uptrained controls.
    assert len(result["rows"]) == (len(groups) * len(rp.METHODS) + 1) * len(rp.ALPHAS)
    for row in result["rows"]:
        assert row["perplexity"] > 1 and row["kv_cache_match"], row
    # Uptraining changed the weights: each alpha > 0 checkpoint scores differently from its start.
    by_key = {(r["method"], r["kv_heads"], r["alpha"]): r["perplexity"] for r in result["rows"]}
    for (method, g, alpha), ppl in by_key.items():
        if alpha > 0:
            assert ppl != by_key[(method, g, 0.0)], (method, g, alpha)
    # KV cache halves with the K/V heads.
    kv = {r["kv_heads"]: r["kv_bytes_per_token"] for r in result["rows"]}
    assert kv[heads] == 2 * kv[heads // 2] == heads * kv[1]

    md = (out / "results.md").read_text()
    table_rows = [
        line
        for line in md.splitlines()
        if line.startswith("| ") and not line.startswith("| method") and not line.startswith("| K/V")
    ]
    assert len(table_rows) == len(groups) * len(rp.METHODS) + 1 + len(rp.kv_heads_list(heads))
    for line in table_rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(cells) and "n/a" not in cells, line
        assert all(re.search(r"\d", c) for c in cells[1:]), line
    assert md.count("Holds") + md.count("Does not hold") == 3
    # Beyond the paper: aligned and similarity grouping, each target checked or reported.
    checks = result["merging"]
    assert len(checks) == 4 and checks[2]["holds"] is None and checks[3]["holds"] is None
    assert md.count("**Met**") + md.count("**Not met**") + md.count("**Reported**") == 4
    for name in ("fig4_methods.png", "fig5_alpha.png", "fig6_groups.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # An existing results folder is not overwritten.
    assert rp.main(["--scale", "smoke", "--out", str(out), "--work", str(tmp_path / "work")]) == 2
