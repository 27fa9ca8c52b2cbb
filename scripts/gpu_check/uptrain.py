#!/usr/bin/env python
"""gpu_check section ``uptrain``: uptraining speed and memory on a GPU (issue: uptraining at GPU speed).

On a GPU (about 120 s):
  bench      a ~1B GQA Llama in bf16 (block 2048, batch 8): the HF Trainer, gqa-uptrain eager and
             compiled (chunked loss): tokens/s, MFU, peak memory       (targets: >= 45% MFU, >= 1.3x Trainer)
  lora_7b    LoRA and QLoRA at Llama-2-7B width (GQA-8), 2 layers: tokens/s, peak memory
  fsdp       FSDP (accelerate, one process on one GPU) for a few steps, killed after a checkpoint,
             then --resume to the end
With ``--tiny`` (CI, CPU, well under 60 s): the same at a tiny size; what cannot run on the device
says so in the figures ("not on this device: ..."): FSDP through accelerate needs a GPU.

    python scripts/gpu_check/uptrain.py --out figures.json [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[1]
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import bench_uptrain  # noqa: E402  (scripts/bench_uptrain.py: the benchmark this section runs)


def bench_args(**kw) -> argparse.Namespace:
    base = {"model": None, "preset": "tiny", "modes": "trainer,eager,compiled", "steps": 2, "warmup": 1,
            "block_size": 32, "batch_size": 4, "grad_accum": 1, "chunk_tokens": 4096, "repeats": 1,
            "explain": False, "json": None}  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def section_bench(tiny: bool, work: Path) -> dict:
    if tiny:
        args = bench_args(modes="trainer,eager,chunked,compiled", explain=True)
    else:
        args = bench_args(preset="1b", block_size=2048, batch_size=8, steps=10, warmup=3, explain=True)
    res = bench_uptrain.bench(args, work / "bench")
    bench_uptrain.print_table(res)
    out = {"model": res["model"], "tokens_per_step": args.batch_size * args.block_size, "peak": res["peak"],
           "graph_breaks": res["graph_breaks"]}  # fmt: skip
    for mode, r in res["modes"].items():
        out[f"{mode}_tokens_per_s"] = round(r["tokens_per_s"], 1)
        out[f"{mode}_mfu_pct"] = round(100 * r["mfu"], 2)
        if r.get("peak_gib") is not None:
            out[f"{mode}_peak_gib"] = round(r["peak_gib"], 2)
    t = res["modes"]["trainer"]["tokens_per_s"]
    for mode in ("eager", "chunked", "compiled"):
        if mode in res["modes"]:
            out[f"{mode}_vs_trainer_x"] = round(res["modes"][mode]["tokens_per_s"] / t, 3)
    return out


def section_lora(tiny: bool, work: Path) -> dict:
    if tiny:
        args = bench_args(modes="lora,qlora")
    else:
        args = bench_args(
            preset="7b-width", modes="lora,qlora", block_size=2048, batch_size=2, steps=4, warmup=2
        )
    res = bench_uptrain.bench(args, work / "lora")
    bench_uptrain.print_table(res)
    out: dict = {"model": res["model"], "tokens_per_step": args.batch_size * args.block_size}
    for mode in ("lora", "qlora"):
        r = res["modes"].get(mode, {})
        if "tokens_per_s" not in r:
            out[f"{mode}"] = f"not on this device: {r.get('error', 'did not run')}"
            continue
        out[f"{mode}_tokens_per_s"] = round(r["tokens_per_s"], 1)
        out[f"{mode}_trainable_params"] = r["trainable"]
        out[f"{mode}_peak_gib"] = (
            round(r["peak_gib"], 2)
            if r.get("peak_gib") is not None
            else "not on this device: CPU has no peak counter"
        )
    return out


def section_fsdp(tiny: bool, work: Path) -> dict:
    """FSDP through accelerate, one process: a few steps, SIGKILL after the first checkpoint, --resume."""
    if not torch.cuda.is_available():
        return {
            "status": "not on this device: accelerate runs FSDP only on GPUs (tests cover DDP/DeepSpeed on CPU)"
        }
    model = bench_uptrain.build_world(work / "fsdp", "tiny" if tiny else "1b")
    text = bench_uptrain.text_folder(work / "fsdp")
    out = work / "fsdp" / "run"
    recipe = work / "fsdp" / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": {"path": str(model)},
        "data": {"source": str(text), "block_size": 512, "eval_fraction": 0.0, "cache_dir": str(work / "fsdp" / "cache")},
        "optim": {"batch_size": 4}, "budget": {"steps": 8}, "eval": {"every": 0, "at_start": False},
        "checkpoint": {"every": 2, "keep_last": 2}, "output": {"dir": str(out), "log_with": [], "log_every": 1},
    }))  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/fsdp.yaml"), "--num_processes", "1",
           "-m", "gqa_uptrain.cli.uptrain", str(recipe)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    first = out / "checkpoints" / "step_00000002"
    while (
        proc.poll() is None and not (first / "trainer_state.json").exists() and time.perf_counter() - t0 < 60
    ):
        time.sleep(0.2)
    killed_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    done = subprocess.run([*cmd, "output.resume=true"], env=env, timeout=120)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    ok = done.returncode == 0 and results.get("steps") == 8 and bool(ckpts)
    fig = {"killed_while_running": killed_running, "checkpoints_at_kill": ckpts, "resume_exit_code": done.returncode,
           "steps_after_resume": results.get("steps"), "seconds": round(time.perf_counter() - t0, 1), "ok": ok}  # fmt: skip
    if not ok:
        raise RuntimeError(f"FSDP kill and --resume failed: {fig}")
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where the JSON object of figures goes")
    p.add_argument("--tiny", action="store_true", help="tiny models on whatever device there is (CI)")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "datasets", "accelerate", "gqa_uptrain", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    figures: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "tiny": args.tiny,
    }
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("bench", section_bench), ("lora_7b_width", section_lora), ("fsdp", section_fsdp)):
            t = time.perf_counter()
            try:
                figures[name] = fn(args.tiny, Path(tmp))
            except Exception as e:  # recorded, and the exit code says so
                figures[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                failed.append(name)
            figures[name]["seconds"] = round(time.perf_counter() - t, 1)
            print(f"uptrain/{name}: {json.dumps(figures[name])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    if failed:
        sys.exit(f"uptrain: {', '.join(failed)} failed")


if __name__ == "__main__":
    main()
