"""Recipe validation: typed sections, errors naming the key, overrides, budgets (gqa_uptrain.training.config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.training.config import (
    UptrainConfig,
    apply_overrides,
    config_from_dict,
    dump_recipe,
    load_recipe,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MINIMAL = {
    "model": {"path": "m"},
    "data": {"source": "corpus.txt"},
    "budget": {"steps": 10},
    "output": {"dir": "o"},
}


def _with(**sections):
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(optim={"lr": "abc"}), "recipe key optim.lr: expected float, got 'abc'"),
        (_with(optim={"lrr": 1e-4}), "recipe key optim.lrr: unknown key"),
        ({**MINIMAL, "optimizer": {}}, "recipe key optimizer: unknown key"),
        (_with(optim={"batch_size": 2.5}), "recipe key optim.batch_size: expected int, got 2.5"),
        (_with(data={"streaming": "yes"}), "recipe key data.streaming: expected bool, got 'yes'"),
        (_with(freeze={"mode": "qk"}), "recipe key freeze.mode: expected 'none' | 'attention' | 'kv'"),
        (_with(optim={"betas": [0.9]}), "recipe key optim.betas"),
        ({k: v for k, v in MINIMAL.items() if k != "model"}, "recipe key model.path: missing"),
        (_with(output={"dir": ""}), "recipe key output.dir: missing"),
        (_with(budget={"tokens": 1000}), "exactly one of budget.steps, budget.tokens, budget.alpha"),
        ({**MINIMAL, "budget": {"alpha": 0.05}}, "recipe key budget.pretraining_tokens: missing"),
        (_with(optim={"grad_accum": 0}), "recipe key optim.grad_accum: must be positive"),
        (
            _with(checkpoint={"save_on_each_node": "yes"}),
            "recipe key checkpoint.save_on_each_node: expected bool, got 'yes'",
        ),
        ({**MINIMAL, "model": "path/to/model"}, "recipe key model: expected a mapping"),
    ],
)
def test_bad_recipes_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_quirks_and_budgets():
    # PyYAML reads 1e-4 (no dot) as a string and 2.0e12 as a float: both mean what users wrote.
    cfg = config_from_dict(
        yaml.safe_load(
            "model: {path: m}\ndata: {source: c.txt, block_size: 128}\noutput: {dir: o}\n"
            "optim: {lr: 1e-4, batch_size: 4, grad_accum: 2}\nbudget: {alpha: 0.05, pretraining_tokens: 2.0e6}\n"
        )
    )
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.checkpoint.save_on_each_node is False  # one shared filesystem unless told otherwise
    assert cfg.budget.pretraining_tokens == 2_000_000
    # alpha × pretraining tokens / tokens per step (128 × 4 × 2 × processes), rounded up.
    assert cfg.total_steps(1) == 98
    assert cfg.total_steps(2) == 49
    cfg = config_from_dict(
        _with(budget={"steps": None, "tokens": 1025}, data={"block_size": 64}, optim={"batch_size": 4})
    )
    assert cfg.total_steps(1) == 5


def test_overrides_are_typed_and_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_recipe(path, ["optim.lr=3e-4", "budget.steps=50", "output.log_with=[]", "freeze.mode=kv"])
    assert (cfg.optim.lr, cfg.budget.steps, cfg.output.log_with, cfg.freeze.mode) == (3e-4, 50, [], "kv")
    with pytest.raises(ConfigError, match="recipe key optim.lr: expected float, got 'fast'"):
        load_recipe(path, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="recipe key optim.nope: unknown key"):
        load_recipe(path, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_recipe(path, ["optim.lr"])
    # Overrides never modify the caller's data.
    data = {"optim": {"lr": 1.0}}
    apply_overrides(data, ["optim.lr=2"])
    assert data == {"optim": {"lr": 1.0}}


def test_recipe_round_trips_and_file_errors(tmp_path):
    cfg = config_from_dict(_with(data={"source": ["a.txt", "b.txt"]}, distill={"teacher": "orig"}))
    again = config_from_dict(yaml.safe_load(dump_recipe(cfg)))
    assert again == cfg and isinstance(again, UptrainConfig)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(bad)


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_validate(recipe):
    cfg = load_recipe(RECIPES / recipe)
    assert cfg.total_steps(1) > 0


@pytest.mark.parametrize("config", sorted(p.name for p in (RECIPES / "accelerate").glob("*.yaml")))
def test_shipped_accelerate_configs_load(config):
    """Every accelerate config parses as accelerate reads it (unknown keys or values raise there)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(RECIPES / "accelerate" / config))
    assert cfg.num_processes >= 2 and cfg.mixed_precision in ("no", "bf16")
    if config == "deepspeed-zero3.yaml":
        # Filled from the recipe's optim.grad_accum / optim.grad_clip (training.setup.align_deepspeed_plugin).
        ds = cfg.deepspeed_config
        assert ds["gradient_accumulation_steps"] == "auto" and ds["gradient_clipping"] == "auto"
    if config == "multi-cpu.yaml":
        # torchrun's launcher (MULTI_CPU's starts processes only through mpirun), on the CPU.
        assert cfg.distributed_type.value == "MULTI_GPU" and cfg.use_cpu and cfg.num_processes == 2
