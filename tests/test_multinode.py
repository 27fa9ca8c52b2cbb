"""Two nodes simulated on one machine: two `accelerate launch --num_machines 2 --machine_rank R
--main_process_ip 127.0.0.1` side by side, one CPU process each, as recipes/slurm/uptrain.sbatch
starts them on a cluster.

* Data parallel, one output folder shared by both nodes (the default): node 1's process is SIGKILLed
  mid-step; node 0 ends within 60 s (it does not wait for the process group's 30-minute timeout);
  `--resume` on both nodes finishes with the uninterrupted run's weights; only the newest
  checkpoint.keep_last checkpoints are left, and no half-written one.
* ZeRO-3 with checkpoint.save_on_each_node: true and each node in its own folder (its own "disk"):
  node 1's process raises at step 5, both end naming it; each node checkpoints and rotates its own
  copy (node 1 holds only its shard) and resumes from it.
* Two processes started by hand, the failed one lingering with its connections open (what NCCL's
  collectives would leave the others waiting on): the survivor's failure watch ends it in seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _launch import Fail, launch, ok, write_recipe
from _uptrain_fixtures import build_world, tiny_recipe
from safetensors.torch import load_file

from gqa_uptrain.training.config import config_from_dict
from gqa_uptrain.training.loop import uptrain

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

WEIGHT_ATOL = 2e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("nodes"))


def recipe(world: Path, out: str | Path, batch: int, **checkpoint) -> dict:
    r = tiny_recipe(world, Path(out), optim={"batch_size": batch, "weight_decay": 0.1})
    r["output"]["dir"] = str(out)  # may be relative: then each node's working folder holds its run folder
    r["checkpoint"] = {"every": 2, "keep_last": 2, **checkpoint}
    return r


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The same 12 steps in one process (per-device batch 4 = 2 nodes x 2)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    uptrain(config_from_dict(recipe(world, out, 4)))
    return load_file(str(out / "model" / "model.safetensors"))


def close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=WEIGHT_ATOL, rtol=1e-4, msg=k)


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_ddp_two_nodes_shared_folder_survive_a_killed_node_and_resume(world, reference, tmp_path):
    out = tmp_path / "run"
    r = write_recipe(tmp_path / "r.yaml", recipe(world, out, 2))
    killed = launch("multi-cpu.yaml", r, tmp_path, nodes=2, fail=Fail(rank=1, step=5, how="kill"))
    assert killed.failed_at is not None and all(rc != 0 for rc in killed.returncodes), killed.log[-3000:]
    assert killed.ended - killed.failed_at < 60, killed.log[-3000:]
    assert checkpoint_names(out) == ["step_00000002", "step_00000004"]

    resumed = ok(launch("multi-cpu.yaml", r, tmp_path, "--resume", nodes=2))
    assert "step_00000004 at step 4" in resumed.log
    close(load_file(str(out / "model" / "model.safetensors")), reference)
    assert checkpoint_names(out) == ["step_00000010", "step_00000012"]  # rotated once, by node 0
    assert json.loads((out / "results.json").read_text())["processes"] == 2


def test_zero3_two_nodes_each_with_its_own_disk(world, reference, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for n in nodes:
        n.mkdir()
    r = write_recipe(tmp_path / "r.yaml", recipe(world, "run", 2, save_on_each_node=True))
    crashed = launch("deepspeed-zero3.yaml", r, tmp_path, nodes=2, cwds=nodes, fail=Fail(rank=1, step=5))
    assert all(rc != 0 for rc in crashed.returncodes) and crashed.ended - crashed.failed_at < 60
    for log in crashed.logs:  # each node's launcher output names the failed process once
        assert (
            log.count("process 1 of 2 failed while training (step 5 of 12): RuntimeError: disk on fire") == 1
        ), log[-3000:]

    resumed = ok(launch("deepspeed-zero3.yaml", r, tmp_path, "--resume", nodes=2, cwds=nodes))
    assert "step_00000004 at step 4" in resumed.logs[0]
    for n in nodes:  # each node rotated its own copy
        assert checkpoint_names(n / "run") == ["step_00000010", "step_00000012"]
    shards = sorted(p.name for p in (nodes[1] / "run/checkpoints/step_00000012/pytorch_model").iterdir())
    assert shards and all(s.startswith("zero_pp_rank_1_") for s in shards)  # node 1 holds its own shard only
    assert not (nodes[1] / "run" / "model").exists()  # the final model is written once, by node 0
    close(load_file(str(nodes[0] / "run/model/model.safetensors")), reference)


LINGER = """
if os.environ.get("GQA_FAIL_STEP") and os.environ.get("RANK") == os.environ.get("GQA_FAIL_RANK"):
    import atexit

    atexit.register(time.sleep, 120)  # the failed process stays, holding its connections
"""


def test_a_failed_process_that_lingers_does_not_hold_the_others(world, tmp_path):
    """Two processes started by hand (no launcher to end the survivor). Process 1 raises at step 3,
    then stays alive holding its connections, as a process whose collectives cannot fail fast (NCCL)
    would leave the others blocked: the survivor's failure watch ends it within seconds, naming
    process 1 and its error."""
    import subprocess
    import sys
    import time

    from _launch import INJECTOR, REPO, free_port

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECTOR + LINGER)
    r = write_recipe(tmp_path / "r.yaml", recipe(world, tmp_path / "run", 2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "400",
           "PYTHONPATH": os.pathsep.join([str(inject), str(REPO)]), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "GQA_FAIL_RANK": "1", "GQA_FAIL_STEP": "3",
           "GQA_FAIL_STAMP": str(tmp_path / "failed_at")}  # fmt: skip
    logs = [open(tmp_path / f"rank{rank}.log", "w+") for rank in (0, 1)]  # noqa: SIM115 (closed below)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gqa_uptrain.cli.uptrain", str(r)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=logs[rank],
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        assert procs[0].wait(timeout=180) == 2
        ended = time.time()
        assert procs[1].poll() is None, "the failed process lingers"
        assert ended - float((tmp_path / "failed_at").read_text()) < 60
        logs[0].seek(0)
        text = logs[0].read()
        named = "process 1 of 2 failed while training (step 3 of 12): RuntimeError: disk on fire"
        assert text.count(named) == 1 and "Traceback" not in text, text[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
