"""What a run writes for others to read (results.json, the model card, the trackers' logs) names the
model and data by Hub id or folder name, never by a path of the machine it ran on."""

from __future__ import annotations

import json

from _uptrain_fixtures import build_world, tiny_recipe

from gqa_uptrain.training.config import config_from_dict
from gqa_uptrain.training.finish import display_name
from gqa_uptrain.training.loop import uptrain


def test_results_card_and_logs_hold_no_machine_paths(tmp_path):
    world = build_world(tmp_path / "world")
    out = tmp_path / "run"
    r = tiny_recipe(world, out, budget={"steps": 2}, checkpoint={"every": 0},
                    distill={"teacher": str(world / "teacher")},
                    output={"log_with": ["tensorboard"]})  # fmt: skip
    uptrain(config_from_dict(r))

    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "student"
    card = (out / "model" / "README.md").read_text()
    assert "`text`" in card and "`teacher`" in card
    written = [
        out / "results.json",
        out / "model" / "README.md",
        *(p for p in (out / "logs").rglob("*") if p.is_file()),
    ]
    assert any("events" in p.name for p in written)  # TensorBoard wrote its hparams
    for f in written:
        data = f.read_bytes()
        assert str(tmp_path).encode() not in data, f


def test_display_name():
    assert display_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert display_name("/home/alice/runs/smollm2-mqa") == "smollm2-mqa"
    assert display_name("~/data/wiki/") == "wiki"
