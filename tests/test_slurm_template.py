"""recipes/slurm/uptrain.sbatch: what each node's `accelerate launch` gets, checked by running the
script with stand-ins for SLURM's `srun` / `scontrol` and for `accelerate` (which records its
arguments), then parsing those arguments with accelerate's own launch parser."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SRUN = """#!/bin/bash
# One task per node, as `srun --ntasks-per-node=1` runs them; srun's own options are dropped.
while [[ "$1" == --* ]]; do shift; done
for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@" || exit 1; done
"""
SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-a\\ngpu-b\\n'
"""
ACCELERATE = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def test_each_node_launches_with_its_rank_and_the_first_nodes_address(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("accelerate", ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD": str(record),
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NNODES": "2", "GPUS_PER_NODE": "4"}  # fmt: skip
    done = subprocess.run(
        ["bash", "recipes/slurm/uptrain.sbatch", "my recipe.yaml", "--resume", "optim.lr=1e-4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 2
    for rank, argv in enumerate(calls):
        assert argv[0] == "launch"
        args = launch_command_parser().parse_args(argv[1:])
        assert args.config_file == "recipes/accelerate/deepspeed-zero3.yaml"
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 8, rank)
        assert (args.main_process_ip, args.main_process_port, args.rdzv_backend) == ("gpu-a", 29500, "static")
        assert args.module and args.training_script == "gqa_uptrain.cli.uptrain"
        assert args.training_script_args == ["my recipe.yaml", "--resume", "optim.lr=1e-4"]
