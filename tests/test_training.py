"""The uptraining loop end to end on tiny GQA Llamas and real text (gqa_uptrain.training, gqa-uptrain)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _assets import require_asset
from _uptrain_fixtures import build_world, tiny_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from gqa_uptrain import training
from gqa_uptrain.cli.uptrain import app
from gqa_uptrain.config import config_from_dict
from gqa_uptrain.errors import CheckpointError, ConfigError, GQAError, OutputExistsError
from gqa_uptrain.training import run_lock, uptrain

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Real text, a BPE tokenizer trained on it, a tiny GQA student and a tiny MHA 'original'."""
    return build_world(tmp_path_factory.mktemp("uptrain"))


def run(world: Path, out: Path, **sections) -> training.UptrainResult:
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
    real_clip = training.Accelerator.clip_grad_norm_
    calls = {"n": 0}

    def clip_then_interrupt(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # Ctrl-C late in step 6: seen at the next step's sync, so it stops after step 7
            os.kill(os.getpid(), signal.SIGINT)
        return real_clip(self, *a, **k)

    monkeypatch.setattr(training.Accelerator, "clip_grad_norm_", clip_then_interrupt)
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
    real_clip = training.Accelerator.clip_grad_norm_
    calls = {"n": 0}

    def clip_then_crash(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 11:
            raise RuntimeError("node lost")
        return real_clip(self, *a, **k)

    monkeypatch.setattr(training.Accelerator, "clip_grad_norm_", clip_then_crash)
    with pytest.raises(RuntimeError, match="node lost"):
        run(world, out)
    monkeypatch.undo()
    assert training.latest_checkpoint(out).name == "step_00000008"
    assert not (out / ".lock").exists()
    run(world, out, output={"resume": True})
    assert_same_weights(weights(out), weights(ref_out))


def test_nan_loss_stops_naming_the_step_and_keeps_checkpoint(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = training.causal_lm_loss
    calls = {"n": 0}

    def nan_at_step_6(logits, ids, per_sequence=False):
        loss = real(logits, ids, per_sequence)
        if not per_sequence:  # training calls only
            calls["n"] += 1
            if calls["n"] == 6:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(training, "causal_lm_loss", nan_at_step_6)
    with pytest.raises(
        GQAError, match=r"loss became nan at step 6;.*last good checkpoint is .*step_00000004"
    ):
        run(world, out)
    ckpt = training.latest_checkpoint(out)
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
            return training.kl_to_teacher(student(ids).logits, teacher(ids).logits).item()

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


RANK_SPY = """
# Loaded at start-up (this folder is first on PYTHONPATH) by the processes torchrun / `accelerate
# launch` starts: records each rank's trained weights and its distributed set-up when the final
# model is saved.
import os

if os.environ.get("LOCAL_RANK") is not None and os.environ.get("GQA_RANK_DUMP"):
    import torch
    import torch.distributed as dist

    from gqa_uptrain import training

    _real = training._save_final_model

    def _spy(cfg, acc, model, *args, **kwargs):
        params = {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()}
        info = {"distributed_type": str(acc.distributed_type), "backend": dist.get_backend(),
                "processes": acc.num_processes, "device": str(acc.device)}
        torch.save({"params": params, **info}, os.environ["GQA_RANK_DUMP"].format(rank=acc.process_index))
        return _real(cfg, acc, model, *args, **kwargs)

    training._save_final_model = _spy
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


def test_fsdp_or_deepspeed_launch_on_cpu_is_refused(world, tmp_path, monkeypatch):
    """accelerate drops FSDP / DeepSpeed on CPU (plain data parallel instead): say so, do not train."""
    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        monkeypatch.setenv(var, "true")
        with pytest.raises(ConfigError, match=f"asks for {name}, which accelerate runs only on GPUs"):
            run(world, tmp_path / "run")
        monkeypatch.delenv(var)
    assert not (tmp_path / "run").exists()
