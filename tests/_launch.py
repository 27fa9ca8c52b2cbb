"""Launching real multi-process uptraining runs for the distributed tests: `accelerate launch` on CPU
processes (one machine, or two "nodes" over the loopback interface), with an optional injected failure.

Every launch is bounded by a timeout, so a hang fails the test instead of hanging CI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"

# Loaded at start-up by every process the launcher starts (its folder is first on PYTHONPATH). On the
# process whose RANK is GQA_FAIL_RANK, the GQA_FAIL_STEP-th backward pass (= that optimizer step with
# grad_accum 1) raises a RuntimeError ("raise") or SIGKILLs the process ("kill"), after writing the
# time to GQA_FAIL_STAMP.
INJECTOR = """
import os

if os.environ.get("GQA_FAIL_STEP") and os.environ.get("RANK") == os.environ.get("GQA_FAIL_RANK"):
    import signal
    import time

    from accelerate import Accelerator

    _real = Accelerator.backward
    _calls = {"n": 0}

    def _backward(self, *args, **kwargs):
        _calls["n"] += 1
        if _calls["n"] == int(os.environ["GQA_FAIL_STEP"]):
            with open(os.environ["GQA_FAIL_STAMP"], "w") as f:
                f.write(repr(time.time()))
            if os.environ.get("GQA_FAIL_HOW") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("disk on fire")
        return _real(self, *args, **kwargs)

    Accelerator.backward = _backward
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@dataclass
class Fail:
    """Make process ``rank`` fail at optimizer step ``step`` ("raise" an error or be "kill"ed)."""

    rank: int
    step: int
    how: str = "raise"


@dataclass
class Launched:
    """One finished launch (or several side by side, one per node)."""

    returncodes: list[int]
    logs: list[str]
    ended: float  # time.time() when the last launcher exited
    failed_at: float | None  # time.time() of the injected failure

    @property
    def log(self) -> str:
        return "\n".join(self.logs)


def _env(tmp: Path, fail: Fail | None) -> dict[str, str]:
    inject = tmp / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(INJECTOR)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "COLUMNS": "400",  # one log record per line (rich wraps at the terminal's width)
        "PYTHONPATH": os.pathsep.join([str(inject), str(REPO)]),
        "GQA_FAIL_STAMP": str(tmp / "failed_at"),
    }
    for k in ("GQA_FAIL_STEP", "GQA_FAIL_RANK", "GQA_FAIL_HOW"):
        env.pop(k, None)
    if fail is not None:
        env.update(GQA_FAIL_RANK=str(fail.rank), GQA_FAIL_STEP=str(fail.step), GQA_FAIL_HOW=fail.how)
    return env


def launch(
    config: str,
    recipe: Path,
    tmp: Path,
    *args: str,
    nodes: int = 1,
    processes: int = 2,
    cwds: list[Path] | None = None,
    fail: Fail | None = None,
    timeout: float = 240,
) -> Launched:
    """``accelerate launch --config_file recipes/accelerate/CONFIG -m gqa_uptrain.cli.uptrain RECIPE ARGS``
    on CPU processes; with ``nodes=2`` two launchers side by side (``--machine_rank 0/1`` over
    127.0.0.1), each in its own working folder ``cwds[r]`` (so a relative output.dir is a per-node disk).
    """
    (tmp / "failed_at").unlink(missing_ok=True)
    env = _env(tmp, fail)
    port = str(free_port())
    procs, logs = [], []
    for node in range(nodes):
        cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "recipes/accelerate" / config),
               "--num_processes", str(processes), "--mixed_precision", "no"]  # fmt: skip
        if nodes > 1:
            cmd += ["--num_machines", str(nodes), "--machine_rank", str(node),
                    "--main_process_ip", "127.0.0.1", "--main_process_port", port]  # fmt: skip
        cmd += ["-m", "gqa_uptrain.cli.uptrain", str(recipe), *args]
        log = open(tmp / f"launch{len(list(tmp.glob('launch*.log')))}.log", "w+")  # noqa: SIM115 (closed below)
        logs.append(log)
        cwd = cwds[node] if cwds else tmp
        # Its own session, so that a hang can be ended with every process the launcher started.
        procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:  # a hang: end it and its workers; the TimeoutExpired fails the test
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    ended = time.time()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    stamp = tmp / "failed_at"
    return Launched(
        returncodes=[p.returncode for p in procs],
        logs=texts,
        ended=ended,
        failed_at=float(stamp.read_text()) if stamp.exists() else None,
    )


def ok(launched: Launched) -> Launched:
    """``launched``, asserting that every launcher exited 0 (else the end of its log)."""
    assert launched.returncodes == [0] * len(launched.returncodes), launched.log[-4000:]
    return launched
