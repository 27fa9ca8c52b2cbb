"""The uptraining loop end to end on tiny GQA Llamas and real text (gqa_uptrain.training, gqa-uptrain)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from _assets import require_asset
from _uptrain_fixtures import build_world, tiny_recipe
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from gqa_uptrain.cli.uptrain import app
from gqa_uptrain.errors import CheckpointError, ConfigError, GQAError, OutputExistsError
from gqa_uptrain.training import checkpointing, distributed, loop, losses
from gqa_uptrain.training.checkpointing import run_lock
from gqa_uptrain.training.config import config_from_dict
from gqa_uptrain.training.loop import uptrain
from gqa_uptrain.training.models import checkpoint_dtype
from gqa_uptrain.training.setup import align_deepspeed_plugin

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Real text, a BPE tokenizer trained on it, a tiny GQA student and a tiny MHA 'original'."""
    return build_world(tmp_path_factory.mktemp("uptrain"))


def run(world: Path, out: Path, **sections) -> loop.UptrainResult:
    return uptrain(config_from_dict(tiny_recipe(world, out, **sections)))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=k)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One uninterrupted 12-step run that the resume and multi-process tests compare against."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = run(world, out)
    return out, result


def test_uptraining_lowers_held_out_loss_and_saves_a_stock_checkpoint(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    r = run(world, out, budget={"steps": 30}, eval={"every": 10}, output={"log_with": ["tensorboard"]})
    assert r.eval_before and r.eval_after
    assert r.eval_after["loss"] < r.eval_before["loss"] - 0.3
    assert r.steps == 30 and r.tokens == 30 * 4 * 32
    # A stock transformers load, with the GQA layout kept and the learned weights in it.
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_key_value_heads == 2 and model.config.use_cache
    AutoTokenizer.from_pretrained(out / "model")
    card = (out / "model" / "README.md").read_text()
    assert "## Uptraining" in card and "held-out perplexity" in card and "| steps | 30 |" in card
    assert card.startswith("---\n")
    results = json.loads((out / "results.json").read_text())
    assert results["eval_after"]["perplexity"] < results["eval_before"]["perplexity"]
    assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard events were written"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000028",
        "step_00000030",
    ]  # keep_last=2
    assert not (out / ".lock").exists()


def test_ctrl_c_checkpoints_and_resume_matches_uninterrupted_run(world, reference, tmp_path, monkeypatch):
    ref_out, ref = reference
    out = tmp_path / "run"
    real_clip = Accelerator.clip_grad_norm_
    calls = {"n": 0}

    def clip_then_interrupt(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # Ctrl-C late in step 6: seen at the next step's sync, so it stops after step 7
            os.kill(os.getpid(), signal.SIGINT)
        return real_clip(self, *a, **k)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip_then_interrupt)
    r = run(world, out)
    monkeypatch.undo()
    assert r.interrupted and r.steps == 7 and r.model_dir is None
    assert r.last_checkpoint == out / "checkpoints" / "step_00000007"
    assert not (out / "model").exists()

    with pytest.raises(OutputExistsError, match="--resume"):
        run(world, out)
    r2 = run(world, out, output={"resume": True})
    assert r2.steps == 12 and not r2.interrupted
    assert r2.eval_before == ref.eval_before  # carried over from the first session
    assert_same_weights(weights(out), weights(ref_out))


def test_crash_then_resume_from_last_checkpoint_matches(world, reference, tmp_path, monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "run"
    real_clip = Accelerator.clip_grad_norm_
    calls = {"n": 0}

    def clip_then_crash(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 11:
            raise RuntimeError("node lost")
        return real_clip(self, *a, **k)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip_then_crash)
    with pytest.raises(RuntimeError, match="node lost"):
        run(world, out)
    monkeypatch.undo()
    assert checkpointing.latest_checkpoint(out).name == "step_00000008"
    assert not (out / ".lock").exists()
    run(world, out, output={"resume": True})
    assert_same_weights(weights(out), weights(ref_out))


@pytest.mark.parametrize("chunk", [0, 4096])  # the plain loss, the chunked loss
def test_nan_loss_stops_naming_the_step_and_keeps_checkpoint(world, tmp_path, monkeypatch, chunk):
    out = tmp_path / "run"
    name = "chunked_lm_loss" if chunk else "causal_lm_loss"
    real = getattr(loop, name)
    calls = {"n": 0}

    def nan_at_step_6(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:
            return (loss[0] * float("nan"), loss[1]) if chunk else loss * float("nan")
        return loss

    monkeypatch.setattr(loop, name, nan_at_step_6)
    with pytest.raises(
        GQAError, match=r"loss became nan at step 6;.*last good checkpoint is .*step_00000004"
    ):
        run(world, out, speed={"loss_chunk_tokens": chunk})
    ckpt = checkpointing.latest_checkpoint(out)
    assert ckpt.name == "step_00000004"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4


@pytest.mark.parametrize("mode", ["kv", "attention"])
def test_freezing_keeps_frozen_tensors_bit_identical(world, tmp_path, mode):
    out = tmp_path / "run"
    r = run(world, out, freeze={"mode": mode}, budget={"steps": 4}, checkpoint={"every": 0})
    before = load_file(str(world / "student" / "model.safetensors"))
    after = weights(out)
    trainable = {"kv": ("k_proj", "v_proj"), "attention": ("self_attn",)}[mode]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if any(t in k for t in trainable)}
    assert changed == expected
    assert r.trainable_parameters == sum(before[k].numel() for k in expected)


_KV = {"self_attn.k_proj.weight", "self_attn.v_proj.weight"}
_KV_BIAS = _KV | {"self_attn.k_proj.bias", "self_attn.v_proj.bias"}


@pytest.mark.parametrize(
    ("model_type", "extra", "kv"),
    [
        ("llama", {}, _KV),
        ("qwen2", {}, _KV_BIAS),
        ("qwen3", {}, _KV | {"self_attn.k_norm.weight"}),  # one K norm shared by the heads
        ("olmo2", {}, _KV | {"self_attn.k_norm.weight"}),  # a norm over the whole K projection
        (
            "stablelm",
            {"qk_layernorm": True},
            _KV_BIAS | {f"self_attn.k_layernorm.norms.{i}.weight" for i in range(2)},
        ),
        ("phi3", {}, {"self_attn.qkv_proj.weight"}),  # fused: trains whole
        ("gpt2", {"n_embd": 64, "n_head": 4, "n_layer": 2}, {"attn.c_attn.weight", "attn.c_attn.bias"}),
        ("falcon", {"new_decoder_architecture": False}, {"self_attention.query_key_value.weight"}),  # by name
    ],
)
def test_freezing_selects_each_familys_attention_and_kv(model_type, extra, kv):
    """freeze.mode's parameters come from the family's architecture entry (gqa_uptrain.architectures.
    trainable); a family without one (Falcon) is read by parameter-name parts."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from gqa_uptrain.training.models import select_trainable

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_kv_heads=2, **extra))
    layer0 = next(n for n, _ in model.named_parameters() if ".0." in n).split(".0.")[0] + ".0."
    in_layer0 = {n.removeprefix(layer0) for n in select_trainable(model, "kv") if n.startswith(layer0)}
    assert in_layer0 == kv
    attention = {n.removeprefix(layer0) for n in select_trainable(model, "attention") if n.startswith(layer0)}
    assert kv < attention and all(n.split(".")[0] == next(iter(kv)).split(".")[0] for n in attention)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.removeprefix(layer0) for n in trained if n.startswith(layer0)} == attention


def test_distillation_pulls_student_towards_teacher(world, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher_before = load_file(str(world / "teacher" / "model.safetensors"))
    common = {"budget": {"steps": 15}, "checkpoint": {"every": 0}, "eval": {"at_start": False}}
    run(world, tmp_path / "lm", **common)
    run(world, tmp_path / "kd", distill={"teacher": str(world / "teacher"), "weight": 5.0}, **common)
    assert_same_weights(load_file(str(world / "teacher" / "model.safetensors")), teacher_before)

    teacher = AutoModelForCausalLM.from_pretrained(world / "teacher").eval()
    ids = torch.randint(0, teacher.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))

    def kl(folder: Path) -> float:
        student = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
        with torch.no_grad():
            return losses.kl_to_teacher(student(ids).logits, teacher(ids).logits).item()

    assert kl(tmp_path / "kd") < 0.5 * kl(tmp_path / "lm")


def test_user_errors_are_clear(world, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "notackpt").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        run(world, out, model={"path": str(tmp_path / "notackpt")})
    with pytest.raises(GQAError, match="no column 'body'"):
        run(world, tmp_path / "run2", data={"text_column": "body"})
    with run_lock(tmp_path / "busy"), pytest.raises(OutputExistsError, match="in use by another run"):
        run(world, tmp_path / "busy")
    # An output.dir that cannot be a folder (here: a file) is one line naming the key, not a traceback.
    (tmp_path / "afile").write_text("")
    with pytest.raises(
        ConfigError, match=r"output.dir: cannot use .*afile/run as the run folder \(Not a directory\)"
    ) as e:
        run(world, tmp_path / "afile" / "run")
    assert "\n" not in str(e.value)
    # A lock left by a dead process is taken over.
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    with run_lock(tmp_path / "stale"):
        pass


def test_cli_check_and_errors(world, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(world, tmp_path / "run")))
    runner = CliRunner()
    ok = runner.invoke(app, [str(path), "optim.lr=1e-3", "--steps", "7", "--check"])
    assert ok.exit_code == 0, ok.output
    assert "lr: 0.001" in ok.output and "steps: 7" in ok.output
    bad = runner.invoke(app, [str(path), "optim.lr=abc"])
    assert bad.exit_code == 2
    assert "recipe key optim.lr: expected float, got 'abc'" in " ".join(bad.output.split())
    done = runner.invoke(app, [str(path), "--steps", "3"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_cli_keeps_stdout_clean_on_a_cpu(world, tmp_path):
    """The run's story goes to stderr; stdout carries nothing else. DeepSpeed (installed with the
    deepspeed extra) is imported by transformers' save_pretrained and, on a machine without a GPU,
    printed its accelerator warning to stdout."""
    import deepspeed  # noqa: F401  (the `deepspeed` extra; scripts/setup.sh installs it: fail, never skip)

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(world, tmp_path / "run")))
    proc = subprocess.run(
        [sys.executable, "-m", "gqa_uptrain.cli.uptrain", str(path), "--steps", "2"],
        env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "", proc.stdout
    assert "held-out" in proc.stderr


RANK_SPY = """
# Loaded at start-up (this folder is first on PYTHONPATH) by the processes torchrun / `accelerate
# launch` starts: records each rank's trained weights and its distributed set-up when the final
# model is saved.
import os

if os.environ.get("LOCAL_RANK") is not None and os.environ.get("GQA_RANK_DUMP"):
    import torch
    import torch.distributed as dist

    from gqa_uptrain.training import finish

    _real = finish.save_final_model

    def _spy(cfg, acc, model, *args, **kwargs):
        params = {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()}
        info = {"distributed_type": str(acc.distributed_type), "backend": dist.get_backend(),
                "processes": acc.num_processes, "device": str(acc.device)}
        torch.save({"params": params, **info}, os.environ["GQA_RANK_DUMP"].format(rank=acc.process_index))
        return _real(cfg, acc, model, *args, **kwargs)

    finish.save_final_model = _spy
"""


def run_two_ranks(launcher: list[str], world, tmp_path: Path) -> tuple[Path, str, list[dict]]:
    """``LAUNCHER -m gqa_uptrain.cli.uptrain RECIPE`` with per-device batch 2 on two CPU processes.

    Returns the run folder, the launcher's output and each rank's record (see ``RANK_SPY``).
    """
    out = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(world, out, optim={"batch_size": 2})))
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir()
    (spy_dir / "sitecustomize.py").write_text(RANK_SPY)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(spy_dir), str(REPO)]),
        "GQA_RANK_DUMP": str(tmp_path / "rank{rank}.pt"),
    }
    proc = subprocess.run(
        [*launcher, "-m", "gqa_uptrain.cli.uptrain", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return out, proc.stdout, [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_match_one_process(world, reference, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) with per-device batch 2 = the global batch 4 of the
    single-process reference: same weights on both ranks and as the reference."""
    torchrun = Path(sys.executable).parent / "torchrun"
    require_asset(torchrun.exists(), "torchrun is not installed (it comes with torch)")
    ref_out, _ = reference
    out, _, ranks = run_two_ranks(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29517"], world, tmp_path
    )
    assert_same_weights(ranks[0]["params"], ranks[1]["params"])  # DDP keeps ranks bit-identical
    assert_same_weights(weights(out), weights(ref_out), atol=1e-5)
    assert json.loads((out / "results.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_accelerate_launch_multi_cpu_config_matches_one_process(world, reference, tmp_path):
    """`accelerate launch --config_file recipes/accelerate/multi-cpu.yaml -m gqa_uptrain.cli.uptrain`:
    two gloo processes on the CPU with per-device batch 2 = the global batch 4 of the single-process
    reference; both ranks end with the same weights, and those are the reference's."""
    accelerate = Path(sys.executable).parent / "accelerate"
    require_asset(accelerate.exists(), "accelerate's launcher is not installed (pip install accelerate)")
    ref_out, _ = reference
    config = REPO / "recipes/accelerate/multi-cpu.yaml"
    out, stdout, ranks = run_two_ranks(
        [str(accelerate), "launch", "--config_file", str(config)], world, tmp_path
    )
    for r in ranks:
        assert r["distributed_type"] == "DistributedType.MULTI_CPU" and r["backend"] == "gloo"
        assert r["processes"] == 2 and r["device"].startswith("cpu")
    assert_same_weights(ranks[0]["params"], ranks[1]["params"])  # DDP keeps ranks bit-identical
    assert_same_weights(weights(out), weights(ref_out), atol=1e-5)
    assert_same_weights(weights(out), ranks[0]["params"])
    assert json.loads((out / "results.json").read_text())["processes"] == 2
    assert "2 process(es)" in stdout and stdout.count("held-out after") == 1  # rank 0 logs


def test_fsdp_launch_on_cpu_is_refused(world, tmp_path, monkeypatch):
    """accelerate drops FSDP on CPU (plain data parallel instead): say so, do not train. (DeepSpeed
    does run on CPU processes: tests/test_deepspeed.py.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="asks for FSDP, which accelerate runs only on GPUs"):
        run(world, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# The saved model keeps the checkpoint's dtype
# --------------------------------------------------------------------------------------------------


def _student_in(world: Path, dest: Path, dtype: torch.dtype) -> Path:
    """The world's student saved in ``dtype`` (as a bf16 / fp16 checkpoint from the Hub would be)."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(world / "student", dtype=dtype).save_pretrained(dest)
    for f in (world / "student").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dest / f.name)
    return dest


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_uptrained_model_is_saved_in_the_checkpoints_dtype(world, tmp_path, dtype):
    """bf16 in, bf16 out (fp16, fp32 likewise): training runs on float32 master weights, but the
    saved tensors and config.json carry the original dtype, not float32 (twice the size)."""
    name = str(dtype).removeprefix("torch.")
    src = _student_in(world, tmp_path / f"student-{name}", dtype)
    assert json.loads((src / "config.json").read_text())["dtype"] == name
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            tiny_recipe(
                world, out, model={"path": str(src)}, checkpoint={"every": 0}, eval={"at_start": False}
            )
        )
    )
    done = CliRunner().invoke(app, [str(recipe), "--steps", "2"])
    assert done.exit_code == 0, done.output
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not a dict)
    expected = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    assert set(dtypes.values()) == {expected}, dtypes
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == name
    # The weights did train (in float32) and were rounded once, at the save.
    before = load_file(str(src / "model.safetensors"))
    after = weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_dtype_reads_config_then_safetensors_header(world, tmp_path):
    """config.json's dtype, else the legacy torch_dtype, else the first floating tensor's dtype in
    the safetensors header (read without loading any tensor)."""
    src = _student_in(world, tmp_path / "bf16", torch.bfloat16)
    assert checkpoint_dtype(str(src)) == torch.bfloat16
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype")
    config["torch_dtype"] = "float16"  # what transformers 4.x wrote
    (src / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(str(src)) == torch.float16
    config.pop("torch_dtype")
    (src / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(str(src)) == torch.bfloat16  # from the header


# --------------------------------------------------------------------------------------------------
# Checkpoint folders: who rotates them
# --------------------------------------------------------------------------------------------------


def _process(main: bool, local_main: bool) -> SimpleNamespace:
    """The parts of an Accelerator that save_checkpoint uses, for one process of a 2-node run."""

    def save_state(folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "random_states.pkl").write_text("x")

    return SimpleNamespace(
        is_main_process=main,
        is_local_main_process=local_main,
        num_processes=1,  # all_ranks needs no process group for this single-process stand-in
        process_index=0,
        distributed_type=DistributedType.MULTI_GPU,
        save_state=save_state,
        wait_for_everyone=lambda: None,
    )


@pytest.mark.parametrize(
    ("role", "main", "local_main", "shared_fs_rotates", "own_disks_rotates"),
    [
        ("global main (node 0, local rank 0)", True, True, True, True),
        ("first process of node 1", False, True, False, True),
        ("any other process", False, False, False, False),
    ],
)
def test_checkpoint_rotation_happens_once_per_filesystem(
    tmp_path, role, main, local_main, shared_fs_rotates, own_disks_rotates
):
    """Shared filesystem (the default): only the run's main process renames and deletes checkpoint
    folders, where every node's first process used to (racing). checkpoint.save_on_each_node=true
    (every node its own disk): each node's first process rotates its own copy."""
    for save_on_each_node, rotates in ((False, shared_fs_rotates), (True, own_disks_rotates)):
        root = tmp_path / f"each{save_on_each_node}" / "checkpoints"
        for step in (1, 2):
            (root / f"step_{step:08d}").mkdir(parents=True)
            (root / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
        checkpointing.save_checkpoint(
            _process(main, local_main), root, {"step": 3}, keep_last=1, save_on_each_node=save_on_each_node
        )
        names = sorted(p.name for p in root.iterdir())
        if rotates:
            assert names == ["step_00000003"], (role, save_on_each_node, names)
        else:
            assert "step_00000003" not in names and {"step_00000001", "step_00000002"} <= set(names), (
                role,
                save_on_each_node,
                names,
            )


def test_save_on_each_node_reaches_accelerate(world, tmp_path, monkeypatch):
    """checkpoint.save_on_each_node is accelerate's ProjectConfiguration.save_on_each_node (which
    decides where save_state writes model and optimizer files)."""
    seen = {}
    real = Accelerator.__init__

    def spy(self, *a, **k):
        seen["save_on_each_node"] = k["project_config"].save_on_each_node
        return real(self, *a, **k)

    monkeypatch.setattr(Accelerator, "__init__", spy)
    for value in (False, True):
        run(world, tmp_path / f"run{value}", budget={"steps": 1}, checkpoint={"every": 0, "save_on_each_node": value},
            eval={"at_start": False})  # fmt: skip
        assert seen["save_on_each_node"] is value


# --------------------------------------------------------------------------------------------------
# DeepSpeed: accumulation and clipping are the recipe's
# --------------------------------------------------------------------------------------------------


def _deepspeed_plugin_from(config_file: Path, monkeypatch):
    """The DeepSpeedPlugin a process started by `accelerate launch --config_file CONFIG_FILE` builds:
    the launcher's own parsing and environment, without DeepSpeed (not installed, no GPU here)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(config_file), "-m", "gqa_uptrain.cli.uptrain", "r.yaml"]
    )
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed
    # As accelerate's launch_command does before it calls the DeepSpeed launcher.
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    for k, v in env.items():
        if k.startswith("ACCELERATE_"):
            monkeypatch.setenv(k, v)
    return DeepSpeedPlugin()


def test_deepspeed_config_takes_accumulation_and_clipping_from_the_recipe(tmp_path, monkeypatch):
    shipped = REPO / "recipes/accelerate/deepspeed-zero3.yaml"
    cfg = config_from_dict(
        {"model": {"path": "m"}, "data": {"source": "d"}, "output": {"dir": "o"}, "budget": {"steps": 1},
         "optim": {"grad_accum": 4, "grad_clip": 0.5}}
    )  # fmt: skip
    plugin = _deepspeed_plugin_from(shipped, monkeypatch)
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    align_deepspeed_plugin(plugin, cfg.optim)
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 4
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    assert (plugin.gradient_accumulation_steps, plugin.gradient_clipping) == (4, 0.5)

    # A config that hard-codes other values (what the shipped one did: 32 and 1.0) is refused.
    hard = tmp_path / "ds.yaml"
    hard.write_text(
        shipped.read_text()
        .replace("gradient_accumulation_steps: auto", "gradient_accumulation_steps: 32")
        .replace("gradient_clipping: auto", "gradient_clipping: 1.0")
    )
    plugin = _deepspeed_plugin_from(hard, monkeypatch)
    with pytest.raises(ConfigError) as e:
        align_deepspeed_plugin(plugin, cfg.optim)
    msg = str(e.value)
    assert "gradient_accumulation_steps: 32" in msg and "optim.grad_accum: 4" in msg and "auto" in msg
    assert "\n" not in msg
    # Equal values pass; a clipping mismatch alone is named too.
    cfg.optim.grad_accum, cfg.optim.grad_clip = 32, 1.0
    align_deepspeed_plugin(_deepspeed_plugin_from(hard, monkeypatch), cfg.optim)
    cfg.optim.grad_clip = 0.0
    with pytest.raises(ConfigError, match=r"gradient_clipping: 1.0 but the recipe has optim.grad_clip: 0.0"):
        align_deepspeed_plugin(_deepspeed_plugin_from(hard, monkeypatch), cfg.optim)


# --------------------------------------------------------------------------------------------------
# Exact resume across an epoch boundary and with accumulation
# --------------------------------------------------------------------------------------------------


def _train_blocks(world: Path, tmp_path: Path, **sections) -> int:
    """How many training blocks the recipe's data gives (from the cache the runs share)."""
    from transformers import AutoTokenizer

    from gqa_uptrain.data.text import prepare_data

    cfg = config_from_dict(tiny_recipe(world, tmp_path / "unused", **sections))
    data = prepare_data(
        cfg.data, AutoTokenizer.from_pretrained(world / "student"), max_eval_blocks=cfg.eval.max_blocks
    )
    return data.num_train_blocks


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_across_an_epoch_boundary_matches_uninterrupted_run(world, tmp_path, monkeypatch, grad_accum):
    """A short epoch (one document), so the run goes round the data more than twice, and the
    checkpoint it resumes from lies in a later epoch than the first (its own shuffle).

    grad_accum=1: Ctrl-C so that the checkpoint falls exactly on the last batch of epoch 1; the
    resumed run starts epoch 2 from its first batch.
    grad_accum=2 with an odd number B of batches per epoch, so that a step can hold the last batch
    of one epoch and the first of the next: the checkpoint is in epoch 2, and the crash hits the
    step that straddles epochs 2 and 3; the resumed run replays it, and the accumulation counter,
    the data position and the schedule line up across the boundary.
    """
    data = {"max_documents": 1}
    blocks = _train_blocks(world, tmp_path, data=data)
    batch = next(b for b in range(16, 1, -1) if (blocks // b) % 2 == 1 and blocks // b >= 5)
    per_epoch = blocks // batch  # B, odd
    if grad_accum == 1:
        # Ctrl-C during step 2B - 1 is seen at the next step's sync: the run stops after step 2B.
        steps, every, expect_ckpt = 2 * per_epoch + 3, 0, 2 * per_epoch
        stop = ("ctrl-c", 2 * per_epoch - 1)
    else:
        c = (per_epoch - 1) // 2  # checkpoints at c, 2c, 3c (micro-batch 3B - 3: epoch 2)
        straddle = (3 * per_epoch + 1) // 2  # = 3c + 2: micro-batches 3B (epoch 2) and 3B + 1 (epoch 3)
        steps, every, stop, expect_ckpt = straddle + 1, c, ("crash", straddle), 3 * c
    sections = {
        "data": data,
        "optim": {"batch_size": batch, "grad_accum": grad_accum},
        "budget": {"steps": steps},
        "checkpoint": {"every": every, "keep_last": 1},
        "eval": {"at_start": False},
    }
    ref = run(world, tmp_path / "ref", **sections)
    assert ref.steps == steps and steps * grad_accum > 2 * per_epoch  # into a third epoch

    out = tmp_path / "run"
    real_clip = Accelerator.clip_grad_norm_
    calls = {"n": 0}
    kind, at = stop

    def clip_then_stop(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            if kind == "crash":
                raise RuntimeError("node lost")
            os.kill(os.getpid(), signal.SIGINT)  # seen at the next step's sync: stops after step at+1
        return real_clip(self, *a, **k)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip_then_stop)
    if kind == "crash":
        with pytest.raises(RuntimeError, match="node lost"):
            run(world, out, **sections)
    else:
        assert run(world, out, **sections).interrupted
    monkeypatch.undo()
    ckpt = checkpointing.latest_checkpoint(out)
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    assert saved["step"] == expect_ckpt
    micro = expect_ckpt * grad_accum  # micro-batches consumed; the last one is in epoch (micro - 1) // B
    epoch = (micro - 1) // per_epoch
    assert (saved["epoch"], saved["batch_in_epoch"]) == (epoch, micro - epoch * per_epoch)
    assert saved["epoch"] >= 1

    r = run(world, out, **{**sections, "output": {"resume": True}})
    assert r.steps == steps and r.tokens == ref.tokens
    assert_same_weights(weights(out), weights(tmp_path / "ref"))


# --------------------------------------------------------------------------------------------------
# Any error on any process ends every process
# --------------------------------------------------------------------------------------------------

FAILURE_INJECTOR = """
# Loaded at start-up (this folder is first on PYTHONPATH): makes one rank fail with an error that
# is not a GQAError, as a full disk, a bug or a lost mount would, and keeps that process alive for
# a while after its error (GQA_LINGER seconds), as a slow teardown or a wrapper script would: the
# other rank must stop on its own, not because the failed one closed its connections.
import atexit
import os
import time

if os.environ.get("RANK") == os.environ.get("GQA_FAIL_RANK") and os.environ.get("GQA_FAIL_AT"):
    from gqa_uptrain.training import setup as training

    def _fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    setattr(training, os.environ["GQA_FAIL_AT"], _fail)
    atexit.register(time.sleep, float(os.environ.get("GQA_LINGER", "0")))
"""


def test_errors_cross_processes_typed(monkeypatch):
    """What all_ranks hands the other processes: the exception object itself (pickled), so a
    GQAError arrives as the same class with the same message; anything else as a ProcessError that
    names the failed process, the phase and the original type. Here process 1 of 2, with process 0's
    report faked (the two-process tests below run the real exchange)."""
    import pickle

    me = SimpleNamespace(num_processes=2, process_index=1)

    def exchange_with(remote_error: Exception):
        def all_gather_object(outcomes, mine):
            theirs = distributed.Outcome(
                rank=0, error_type=f"x.{type(remote_error).__name__}", message=str(remote_error)
            )
            with contextlib.suppress(Exception):
                theirs.error = pickle.loads(pickle.dumps(remote_error))
            outcomes[:] = pickle.loads(pickle.dumps([theirs, mine]))  # as the wire would deliver them

        monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)

    exchange_with(OutputExistsError("output folder /o holds a previous run; pass --resume"))
    with (
        pytest.raises(OutputExistsError, match="holds a previous run; pass --resume"),
        distributed.all_ranks(me, "preparing the output folder"),
    ):
        pass

    class Unpicklable(Exception):  # a local class: pickling fails, its name and text still travel
        pass

    exchange_with(Unpicklable("mount lost"))
    with pytest.raises(distributed.ProcessError) as e, distributed.all_ranks(me, "loading the model"):
        pass
    assert (e.value.rank, e.value.phase, e.value.error_type) == (0, "loading the model", "x.Unpicklable")
    assert "process 0 of 2 failed while loading the model: Unpicklable: mount lost" in str(e.value)
    assert pickle.loads(pickle.dumps(e.value)).rank == 0  # itself picklable (keyword-only fields)

    # No failure anywhere: each process's shared value reaches all.
    def all_ok(outcomes, mine):
        outcomes[:] = [distributed.Outcome(rank=0, share="from 0"), mine]

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_ok)
    with distributed.all_ranks(me, "agreeing") as phase:
        phase.share = "from 1"
    assert phase.shared == ["from 0", "from 1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fail_rank", "fail_at", "phase"),
    [(0, "prepare_output", "preparing the output folder"), (1, "load_pretrained", "loading the model")],
)
def test_non_gqa_error_on_one_process_stops_every_process(world, tmp_path, fail_rank, fail_at, phase):
    """Two processes started on their own (as on two nodes: no launcher kills the survivor), one of
    which fails during set-up with a plain RuntimeError and then lingers. Both must exit non-zero
    with the same one-line error naming the failed process; the survivor within seconds, while the
    failed one is still alive (it used to wait in a broadcast for as long as the peer lived)."""
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(world, out, optim={"batch_size": 2})))
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAILURE_INJECTOR)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(inject), str(REPO)]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "GQA_FAIL_RANK": str(fail_rank),
        "GQA_FAIL_AT": fail_at,
        "GQA_LINGER": "120",
    }
    procs = {}
    logs = {}
    for rank in (0, 1):
        logs[rank] = open(tmp_path / f"rank{rank}.log", "w+")  # noqa: SIM115 (closed below)
        procs[rank] = subprocess.Popen(
            [sys.executable, "-m", "gqa_uptrain.cli.uptrain", str(recipe)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=logs[rank],
            stderr=subprocess.STDOUT,
            text=True,
        )
    survivor = 1 - fail_rank
    try:
        procs[survivor].wait(timeout=150)
        assert procs[fail_rank].poll() is None, "the failed process lingers (GQA_LINGER)"
        errors, texts = {}, {}
        for rank in (0, 1):
            logs[rank].seek(0)
            texts[rank] = text = logs[rank].read()
            lines = [line for line in text.splitlines() if line.startswith("error:")]
            assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
            errors[rank] = lines[0]
        # Seen in CI (about 1 run in 6) before uptrain destroyed its process group on the way out:
        # the survivor printed its one error line, then gloo's threads, torn down at interpreter exit,
        # aborted it ("terminate called without an active exception", -6 instead of 2).
        assert procs[survivor].returncode == 2, texts[survivor][-3000:]
        for line in errors.values():
            assert f"process {fail_rank} of 2 failed while {phase}" in line, line
            assert "RuntimeError: disk on fire" in line, line
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs.values():
            f.close()
    assert not (out / ".lock").exists()
