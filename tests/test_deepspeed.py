"""DeepSpeed ZeRO-2 and ZeRO-3 uptraining on two CPU processes (gloo), through the shipped accelerate
configs: the same result as data parallel, weight decay on the matrices, exact resume after a crash,
an error on one process ending both within 60 s, a final model/ that stock transformers loads in
the input checkpoint's dtype, and distillation (the teacher sharded like the student under ZeRO-3).

Runs shared between assertions (each launch costs about 25 s): one uninterrupted ZeRO-3 run, and one
ZeRO-2 run on a bf16 checkpoint that fails on process 0 at step 3 and is resumed (ZeRO-3's crash and
resume: tests/test_multinode.py); the data-parallel references run in this process (two
data-parallel processes with per-device batch 2 give the one-process batch-4 run's weights to 1e-5:
tests/test_training.py::test_accelerate_launch_multi_cpu_config_matches_one_process).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _launch import REPO, Fail, launch, ok, write_recipe
from _uptrain_fixtures import build_world, tiny_recipe
from safetensors import safe_open
from safetensors.torch import load_file

from gqa_uptrain.training.config import config_from_dict
from gqa_uptrain.training.loop import uptrain
from gqa_uptrain.training.setup import _param_groups, align_deepspeed_plugin

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Held-out loss: ZeRO and data parallel sum the same gradients in another order (float32).
LOSS_TOL = 1e-4
WEIGHT_ATOL = 2e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import deepspeed  # noqa: F401  (the `deepspeed` extra; scripts/setup.sh installs it: fail, never skip)

    root = build_world(tmp_path_factory.mktemp("ds"))
    # The same student stored in bf16 (a bf16 checkpoint from the Hub): bf16 in, bf16 out.
    from transformers import AutoModelForCausalLM

    bf16 = root / "student-bf16"
    AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.bfloat16).save_pretrained(bf16)
    for f in (root / "student").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, bf16 / f.name)
    return root


def recipe(world: Path, out: Path, student: str = "student", **sections) -> dict:
    """12 steps, weight decay 0.1, a checkpoint every 2 steps (keep 2), per-device batch ``batch``."""
    r = tiny_recipe(world, out, **sections)
    r["model"]["path"] = str(world / student)
    r["optim"]["weight_decay"] = 0.1
    r["checkpoint"] = {"every": 2, "keep_last": 2}
    return r


def reference(world: Path, out: Path, student: str = "student", weight_decay: float = 0.1) -> Path:
    """The data-parallel result in one process: per-device batch 4 = 2 processes x 2."""
    r = recipe(world, out, student)
    r["optim"]["weight_decay"] = weight_decay
    uptrain(config_from_dict(r))
    return out


def two_process_recipe(world: Path, tmp: Path, student: str = "student") -> Path:
    return write_recipe(tmp / "r.yaml", recipe(world, tmp / "run", student, optim={"batch_size": 2}))


def model_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def eval_after(out: Path) -> float:
    return json.loads((out / "results.json").read_text())["eval_after"]["loss"]


def fp32_of_zero_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    """The float32 weights of a ZeRO checkpoint, consolidated by DeepSpeed's own tool (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {
        k: v.float()
        for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model").items()
    }


def close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def refs(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refs")
    return {
        "fp32": reference(world, tmp / "fp32"),
        "fp32-no-decay": reference(world, tmp / "nowd", weight_decay=0.0),
        "bf16": reference(world, tmp / "bf16", "student-bf16"),
    }


@pytest.fixture(scope="module")
def zero3(world, tmp_path_factory):
    """An uninterrupted ZeRO-3 run."""
    tmp = tmp_path_factory.mktemp("zero3")
    launched = ok(launch("deepspeed-zero3.yaml", two_process_recipe(world, tmp), tmp))
    return tmp / "run", launched


@pytest.mark.slow
def test_zero3_trains_like_data_parallel_with_decay_on_the_matrices(zero3, refs):
    out, launched = zero3
    assert "2 process(es)" in launched.log and "DeepSpeed" in launched.log
    assert abs(eval_after(out) - eval_after(refs["fp32"])) < LOSS_TOL
    close(model_weights(out), model_weights(refs["fp32"]), WEIGHT_ATOL)
    # The comparison would catch weight decay applied to nothing (what ZeRO-3's 1-D shards did to the
    # p.ndim rule): without decay the matrices end far outside the tolerance.
    no_decay, ref = model_weights(refs["fp32-no-decay"]), model_weights(refs["fp32"])
    worst = max((no_decay[k] - ref[k]).abs().max().item() for k in ref if ref[k].ndim >= 2)
    assert worst > 20 * WEIGHT_ATOL
    # The sharded checkpoint consolidates (DeepSpeed's zero_to_fp32) to the weights model/ holds.
    close(fp32_of_zero_checkpoint(out / "checkpoints" / "step_00000012"), model_weights(out), 0)


@pytest.mark.slow
def test_zero3_model_loads_in_stock_transformers(zero3, world):
    from transformers import AutoConfig, AutoModelForCausalLM

    out, _ = zero3
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    assert AutoConfig.from_pretrained(out / "model").dtype == torch.float32
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_distillation_under_zero_trains_like_data_parallel(world, refs, tmp_path, stage):
    """Distillation under ZeRO: same loss and weights as the one-process run. Under ZeRO-3 the teacher
    is loaded while ``zero.Init`` partitions every model transformers builds, so it must run through a
    DeepSpeed engine that gathers its shards (a teacher left partitioned has empty weights)."""
    distill = {"teacher": str(world / "teacher"), "weight": 0.5}
    ref = tmp_path / "ref"
    uptrain(config_from_dict(recipe(world, ref, distill=distill)))
    r = write_recipe(
        tmp_path / "r.yaml", recipe(world, tmp_path / "run", optim={"batch_size": 2}, distill=distill)
    )
    ok(launch(f"deepspeed-zero{stage}.yaml", r, tmp_path))
    out = tmp_path / "run"
    assert abs(eval_after(out) - eval_after(ref)) < LOSS_TOL
    close(model_weights(out), model_weights(ref), WEIGHT_ATOL)
    # The teacher counted: the same run without it ends elsewhere.
    no_kd, kd = model_weights(refs["fp32"]), model_weights(ref)
    worst = max((no_kd[k] - kd[k]).abs().max().item() for k in kd)
    assert worst > 20 * WEIGHT_ATOL


@pytest.mark.slow
def test_zero2_bf16_in_bf16_out_and_resume(world, refs, tmp_path):
    """ZeRO-2 from a bf16 checkpoint: process 0 fails at step 3, --resume finishes; the float32
    weights of the last checkpoint are the data-parallel run's, and model/ is bf16."""
    r = two_process_recipe(world, tmp_path, "student-bf16")
    crashed = launch("deepspeed-zero2.yaml", r, tmp_path, fail=Fail(rank=0, step=3))
    # A rank raising at step 3 ends both processes within 60 s, each naming it in one line.
    assert crashed.returncodes[0] != 0 and crashed.failed_at is not None
    assert crashed.ended - crashed.failed_at < 60, crashed.log[-3000:]
    named = [line for line in crashed.log.splitlines()
             if "process 0 of 2 failed while training (step 3 of 12): RuntimeError: disk on fire" in line]  # fmt: skip
    assert len(named) == 2, crashed.log[-3000:]
    resumed = ok(launch("deepspeed-zero2.yaml", r, tmp_path, "--resume"))
    assert "step_00000002 at step 2" in resumed.log
    out = tmp_path / "run"
    assert abs(eval_after(out) - eval_after(refs["bf16"])) < LOSS_TOL
    ref_fp32 = load_file(str(refs["bf16"] / "checkpoints" / "step_00000012" / "model.safetensors"))
    close(fp32_of_zero_checkpoint(out / "checkpoints" / "step_00000012"), ref_fp32, WEIGHT_ATOL)
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.dtype == torch.bfloat16 and model.config.num_key_value_heads == 2


def test_param_groups_decay_matrices_by_their_unsharded_shape():
    """ZeRO-3 leaves every parameter a 1-D shard with the real shape in ds_shape: the matrices still
    go to the weight-decay group, and no group is empty."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for p in model.parameters():  # as zero.Init leaves them
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    decay, no_decay = _param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.ds_shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, norm weight and bias
    frozen_norms = torch.nn.Linear(4, 4, bias=False)
    assert len(_param_groups(frozen_norms, 0.1)) == 1  # no empty no-decay group


def test_zero3_config_gathers_the_final_model():
    """The final model/ of a ZeRO-3 run needs the 16-bit gather on save: set even if a config leaves it off."""
    from accelerate.utils import DeepSpeedPlugin

    cfg = config_from_dict(
        {"model": {"path": "m"}, "data": {"source": "d"}, "output": {"dir": "o"}, "budget": {"steps": 1}}
    )
    plugin = DeepSpeedPlugin(zero_stage=3, zero3_save_16bit_model=False)
    align_deepspeed_plugin(plugin, cfg.optim)
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_shipped_configs_are_gpu_configs_that_name_the_cpu_rehearsal():
    for name in ("deepspeed-zero2.yaml", "deepspeed-zero3.yaml"):
        text = (REPO / "recipes/accelerate" / name).read_text()
        assert "distributed_type: DEEPSPEED" in text and "use_cpu: false" in text
        assert (
            "--num_processes 2 --mixed_precision no" in text
            and "deepspeed_multinode_launcher: standard" in text
        )
