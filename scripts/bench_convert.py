"""Benchmark gqa-convert on a Llama-2-7B-shaped checkpoint against a plain copy and the naive route.

Issue 2's targets, measured side by side on the same disk:

- throughput: the converter must reach at least 0.8x the throughput of a plain copy of the same
  files (the disk's limit);
- memory: its peak RSS must stay under 1.5 GB for the full 32-layer shape with the default shard
  size, where the naive route (``from_pretrained`` -> edit -> ``save_pretrained``) holds the
  whole model in memory.

How it measures:

1. A synthetic checkpoint with the tensor names, shapes and dtype of Llama-2-7B (32 query heads,
   32 K/V heads, hidden 4096, intermediate 11008, vocab 32000, float16, ~10 GB shards like the
   real one) is written tensor by tensor with :class:`gqa_uptrain.writer.ShardedWriter` from a
   64 MB pool of random values, so building it never holds the model in memory. ``--layers``
   sets how many decoder layers it has (32, the real model, by default: 13.5 GB).
2. Each route runs in its own child process: ``copy`` (every file copied with
   ``shutil.copyfile``, i.e. kernel ``sendfile``), ``converter`` (``gqa_uptrain.convert`` to
   8 K/V heads with mean pooling, what ``gqa-convert`` runs) and ``naive`` (transformers). Wall
   time runs from the child's start until every output file is flushed to disk with ``fsync``,
   so page cache cannot hide writes. Peak RSS is the child's ``ru_maxrss`` from ``wait4``.
3. Page cache: the source files are flushed and evicted (``posix_fadvise(DONTNEED)``) before
   every route, so every route reads a cold checkpoint from disk; outputs are evicted after.
4. The converter's output is checked: K/V projections of the first and last layer must equal the
   mean of each group of 4 source heads, and a query projection must be copied bit for bit.
5. The naive route needs the whole model in RAM (13.5 GB at 32 layers), so it runs by default on
   a ``--naive-layers 4`` checkpoint (2.1 GB) beside the converter and the copy of that same
   checkpoint; its figures at the full size are extrapolated (labelled ``est.``): peak RSS as the
   process's RSS after imports plus the measured growth scaled by checkpoint size, wall time
   scaled by checkpoint size. ``--naive-layers 32`` measures it for real where RAM allows.

Usage::

    .venv/bin/python scripts/bench_convert.py                 # full 32 layers, ~40 GB disk, minutes
    .venv/bin/python scripts/bench_convert.py --layers 8 --skip-naive
    .venv/bin/python scripts/bench_convert.py --shape tiny --layers 2   # seconds (the smoke test)

Timings are of one machine at one moment: other processes sharing the disk or the cores make them
noisy; ``--repeat N`` keeps the best of N runs of the copy and the converter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RSS_TARGET = 1.5e9  # bytes: issue 2's peak-RSS limit for the converter at 32 layers
RATIO_TARGET = 0.8  # converter throughput / copy throughput
TARGET_LAYERS = 32
DEFAULT_SHARD = "5GB"  # gqa-convert's default --max-shard-size

# meta-llama/Llama-2-7b-hf's config.json (num_hidden_layers is set from --layers).
LLAMA2_7B: dict = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 32000,
}
# Same layout (32 heads -> 8 K/V heads), sizes for a test run of a few seconds.
SHAPES = {
    "llama-2-7b": LLAMA2_7B,
    "tiny": {**LLAMA2_7B, "hidden_size": 256, "intermediate_size": 688, "vocab_size": 1000},
}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


# --------------------------------------------------------------------------------------------
# The synthetic checkpoint


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama checkpoint in ``state_dict`` order (as transformers saves it)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def checkpoint_bytes(cfg: dict, dtype: str) -> int:
    """Bytes of tensor data in a checkpoint of ``cfg`` (config and headers aside)."""
    total = 0
    for _, shape in tensor_shapes(cfg):
        n = 1
        for s in shape:
            n *= s
        total += n
    return total * ITEMSIZE[dtype]


def build_checkpoint(folder: Path, cfg: dict, dtype: str, shard_size: str, seed: int = 0) -> int:
    """Write a random checkpoint of ``cfg`` into ``folder`` without holding it in memory.

    Every tensor is a run of a 64 MB pool of N(0, 0.02) values starting at an offset derived from
    its name, so tensors (and heads) differ and no value is NaN, inf or subnormal. Returns the
    bytes of tensor data written.
    """
    import torch
    from tqdm.auto import tqdm

    from gqa_uptrain.writer import PlannedTensor, ShardedWriter, parse_size

    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(64 << 20 >> 2, generator=gen) * 0.02).to(tdtype)  # [16M] values
    raw = memoryview(pool.view(torch.uint8).numpy()).cast("B")
    itemsize = ITEMSIZE[dtype]
    plan = [PlannedTensor(name, shape, tdtype) for name, shape in tensor_shapes(cfg)]

    def fill(f, name: str, nbytes: int) -> None:
        off = (zlib.crc32(name.encode()) % (len(raw) // itemsize)) * itemsize
        while nbytes:
            n = min(nbytes, len(raw) - off)
            f.write(raw[off : off + n])
            nbytes -= n
            off = 0

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}, indent=2) + "\n")
    total = sum(t.nbytes for t in plan)
    with (
        ShardedWriter(folder, plan, parse_size(shard_size)) as writer,
        tqdm(total=total, unit="B", unit_scale=True, desc="building", disable=None) as bar,
    ):
        for t in plan:
            writer.write_with(t.name, lambda f, t=t: fill(f, t.name, t.nbytes))
            bar.update(t.nbytes)
    flush_and_evict(folder)
    return total


# --------------------------------------------------------------------------------------------
# Page cache and disk helpers


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def evict(folder: Path) -> None:
    """Drop ``folder``'s clean pages from the page cache, so the next reader reads the disk."""
    for p in files_under(folder):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def flush_and_evict(folder: Path) -> None:
    """``fsync`` every file under ``folder`` (the write is on disk), then evict it from the cache."""
    for p in files_under(folder):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fmt_bytes(n: float) -> str:
    """Decimal GB, or MB below 1 GB (the smoke test's checkpoints are a few MB)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def du(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except FileNotFoundError:  # the converter renames its temporary folder at the end
            pass
    return total


# --------------------------------------------------------------------------------------------
# Routes: each runs in a child process

# Peak RSS comes from wait4's ru_maxrss, which on Linux keeps the high-water mark of the memory
# the child had *before* exec, i.e. a copy of its parent's (this script's, torch included). So a
# route is started by this few-MB launcher (``python -S``, nothing imported), which spawns it
# with posix_spawn and writes its exit code and ru_maxrss (KiB) to the file named by argv[1].
LAUNCHER = """
import json, os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump({"exit": code, "maxrss_kib": usage.ru_maxrss}, f)
sys.exit(code if code >= 0 else 1)
"""


@dataclass
class Run:
    """One route's measurement."""

    route: str
    layers: int
    src_bytes: int
    out_bytes: int
    seconds: float
    peak_rss: int  # bytes
    estimated: bool = False  # extrapolated from a smaller checkpoint, not measured
    base_rss: int = 0  # naive route: RSS after imports, before any weight is loaded

    @property
    def mb_per_s(self) -> float:
        """Source checkpoint bytes processed per second (decimal MB): the same numerator for all routes."""
        return self.src_bytes / 1e6 / self.seconds


def route_command(route: str, src: Path, dst: Path, args: argparse.Namespace, report: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", route, "--worker-src", str(src),
            "--worker-dst", str(dst), "--num-kv-heads", str(args.num_kv_heads),
            "--max-shard-size", args.max_shard_size, "--worker-report", str(report)]  # fmt: skip


def measure(
    route: str, src: Path, layers: int, work: Path, args: argparse.Namespace, expect: int
) -> tuple[Run, Path]:
    """Run ``route`` from ``src`` into a fresh folder under ``work``; time it and take its peak RSS.

    The clock stops once the child has exited and its output is fsync'ed. Returns the run and the
    output folder (the caller checks and deletes it).
    """
    from tqdm.auto import tqdm

    box = work / f"{route}-out"
    shutil.rmtree(box, ignore_errors=True)
    box.mkdir()
    dst = box / "model"
    log = work / f"{route}.log"
    report = work / f"{route}.json"
    rusage = work / f"{route}.rusage.json"
    os.sync()
    evict(src)
    print(f"running {route} on {layers} layers ({fmt_bytes(src_bytes_of(src))})...", flush=True)
    with (
        open(log, "wb") as logf,
        tqdm(total=expect, unit="B", unit_scale=True, desc=route, disable=None) as bar,
    ):
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-S",
            "-c",
            LAUNCHER,
            str(rusage),
            *route_command(route, src, dst, args, report),
        ]
        proc = subprocess.Popen(cmd, stdout=logf, stderr=logf)
        while proc.poll() is None:
            time.sleep(0.1)
            bar.update(du(box) - bar.n)
        if proc.returncode == 0:
            flush_and_evict(box)
        seconds = time.perf_counter() - t0
        bar.update(du(box) - bar.n)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"error: the {route} route failed (exit {proc.returncode}); its log ends with:\n{tail}")
    maxrss = json.loads(rusage.read_text())["maxrss_kib"] * 1024
    run = Run(route, layers, src_bytes_of(src), du(dst), seconds, maxrss)
    print(
        f"  {route}: {seconds:.1f} s, {run.mb_per_s:.0f} MB/s, peak RSS {fmt_bytes(run.peak_rss)}",
        flush=True,
    )
    return run, dst


def src_bytes_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def worker(args: argparse.Namespace) -> None:
    """Child-process side of a route."""
    src, dst = Path(args.worker_src), Path(args.worker_dst)
    if args.worker == "converter":
        # What `gqa-convert SRC DST -g G --max-shard-size S --quiet` runs, through the library so the
        # package next to this script is the one measured.
        from gqa_uptrain import convert

        convert(src, dst, args.num_kv_heads, "mean", max_shard_size=args.max_shard_size, progress=False)
        return
    if args.worker == "copy":
        dst.mkdir()
        for p in sorted(src.iterdir()):
            shutil.copyfile(p, dst / p.name)  # sendfile(2) on Linux: no user-space buffer
        return
    # naive: what one writes without a streaming converter.
    import torch
    from transformers import AutoModelForCausalLM

    # RSS after imports, before any weight: the part of the peak that does not grow with the model.
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.worker_report).write_text(json.dumps({"base_rss": base}))
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    cfg = model.config
    g, h, hkv = args.num_kv_heads, cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // h
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for name in ("k_proj", "v_proj"):
                old = getattr(attn, name)
                # [Hkv * d, hidden] -> [G, Hkv/G, d, hidden] -> group mean -> [G * d, hidden]
                w = (
                    old.weight.view(g, hkv // g, d, -1)
                    .float()
                    .mean(1)
                    .to(old.weight.dtype)
                    .reshape(g * d, -1)
                )
                new = torch.nn.Linear(old.in_features, g * d, bias=False, device="meta")
                new.weight = torch.nn.Parameter(w, requires_grad=False)
                setattr(attn, name, new)
            attn.num_key_value_groups = h // g
    cfg.num_key_value_heads = g
    model.save_pretrained(dst, max_shard_size=args.max_shard_size)


# --------------------------------------------------------------------------------------------
# Checking the outputs are a real conversion


def check_mean_pooled(src: Path, dst: Path, layers: int, g: int) -> None:
    """Exit with an error unless ``dst`` holds ``src``'s K/V heads mean-pooled to ``g`` heads."""
    import torch

    from gqa_uptrain.checkpoint import SafetensorsReader

    a, b = SafetensorsReader(src), SafetensorsReader(dst)
    try:
        ia, ib = {i.name: i for i in a.infos()}, {i.name: i for i in b.infos()}
        if set(ia) != set(ib):
            sys.exit(f"error: {dst} does not hold the same tensors as {src}")
        for n in sorted({0, layers - 1}):
            p = f"model.layers.{n}.self_attn."
            for proj in ("k_proj", "v_proj"):
                x, y = a.read(ia[p + proj + ".weight"]), b.read(ib[p + proj + ".weight"])
                hkv_d, hidden = x.shape  # [Hkv * d, hidden]
                d = hkv_d // LLAMA2_7B["num_key_value_heads"]
                want = x.view(g, -1, d, hidden).float().mean(1).to(x.dtype).reshape(g * d, hidden)
                if y.shape != want.shape or not torch.allclose(y.float(), want.float(), rtol=0, atol=1e-4):
                    sys.exit(f"error: {dst}: {p}{proj} is not the mean of each group of source heads")
            if not torch.equal(a.read(ia[p + "q_proj.weight"]), b.read(ib[p + "q_proj.weight"])):
                sys.exit(f"error: {dst}: {p}q_proj was not copied unchanged")
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------------------------
# Report


def print_report(runs: list[Run], args: argparse.Namespace, layers: int) -> bool:
    """Print the table and the targets; returns whether every checked target passed."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(110, shutil.get_terminal_size().columns), highlight=False)
    table = Table(title=f"Llama-2-7B shape ({args.shape}), {args.dtype}, 32 -> {args.num_kv_heads} K/V heads, "
                  f"output shards {args.max_shard_size}")  # fmt: skip
    for col in ("route", "layers", "checkpoint", "wall time", "throughput", "peak RSS", "vs copy"):
        table.add_column(col, justify="left" if col == "route" else "right")
    copies = {r.layers: r for r in runs if r.route == "copy"}
    for r in runs:
        est = " (est.)" if r.estimated else ""
        copy = copies.get(r.layers)
        ratio = f"{r.mb_per_s / copy.mb_per_s:.2f}x" if copy and not r.estimated else "-"
        table.add_row(r.route + est, str(r.layers), fmt_bytes(r.src_bytes), f"{r.seconds:.1f} s",
                      f"{r.mb_per_s:.0f} MB/s", fmt_bytes(r.peak_rss), ratio)  # fmt: skip
    console.print(table)
    print(
        "throughput = source checkpoint bytes / wall time (child start to outputs fsync'ed, cold page cache)"
    )

    ok = True
    conv = next(r for r in runs if r.route == "converter" and r.layers == layers)
    ratio = conv.mb_per_s / copies[layers].mb_per_s
    verdict = "PASS" if ratio >= RATIO_TARGET else "FAIL"
    ok &= verdict == "PASS"
    print(f"target: converter throughput >= {RATIO_TARGET}x copy: {ratio:.2f}x at {layers} layers: {verdict}")
    verdict = "PASS" if conv.peak_rss < RSS_TARGET else "FAIL"
    ok &= verdict == "PASS"
    note = ""
    if layers != TARGET_LAYERS or args.max_shard_size != DEFAULT_SHARD:
        note = f" (the target is defined for {TARGET_LAYERS} layers and {DEFAULT_SHARD} shards)"
    print(f"target: converter peak RSS < {RSS_TARGET / 1e9:.1f} GB: {fmt_bytes(conv.peak_rss)} at {layers} layers"
          f", {args.max_shard_size} shards: {verdict}{note}")  # fmt: skip
    naive = [r for r in runs if r.route == "naive"]
    if naive:
        big = max(naive, key=lambda r: r.layers)
        how = "estimated" if big.estimated else "measured"
        print(f"naive route peak RSS at {big.layers} layers ({how}): {fmt_bytes(big.peak_rss)}, "
              f"{big.peak_rss / conv.peak_rss:.1f}x the converter's")  # fmt: skip
    return ok


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"decoder layers of the synthetic checkpoint (default {TARGET_LAYERS}, fewer if the "
        "disk cannot hold ~2x the checkpoint; an explicit value that does not fit is an error)",
    )
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="llama-2-7b",
        help="tensor sizes: the real Llama-2-7B, or tiny ones (hidden 256) for a smoke test",
    )
    p.add_argument(
        "--dtype", choices=sorted(ITEMSIZE), default="float16", help="dtype of the synthetic checkpoint"
    )
    p.add_argument("--num-kv-heads", type=int, default=8, help="K/V heads after conversion (32 before)")
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_SHARD,
        help="output shard size for the converter and the naive route (gqa-convert's default)",
    )
    p.add_argument(
        "--source-shard-size",
        default="10GB",
        help="shard size of the synthetic source (Llama-2-7b-hf ships ~10 GB shards)",
    )
    p.add_argument(
        "--naive-layers",
        type=int,
        default=4,
        help="layers of the checkpoint the naive route runs on (it needs the whole model in RAM); "
        "its full-size figures are extrapolated unless this equals --layers",
    )
    p.add_argument("--skip-naive", action="store_true", help="do not run the naive transformers route")
    p.add_argument(
        "--repeat", type=int, default=1, help="run the copy and the converter N times, keep the best"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder to create the working folder in (default: the system temp dir); "
        "it must be on the disk you want to measure",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the working folder (default: removed at the end)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--check", action="store_true", help="exit with status 1 if a target fails")
    # Child-process side of a route (internal).
    p.add_argument("--worker", choices=("copy", "converter", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--worker-src", help=argparse.SUPPRESS)
    p.add_argument("--worker-dst", help=argparse.SUPPRESS)
    p.add_argument("--worker-report", help=argparse.SUPPRESS)
    return p.parse_args(argv)  # fmt: skip


def config_for(args: argparse.Namespace, layers: int) -> dict:
    return {**SHAPES[args.shape], "num_hidden_layers": layers}


def choose_layers(args: argparse.Namespace, free: int) -> int:
    """The layer count to benchmark: what was asked, or the most that fits ``free`` bytes of disk.

    The working set is the source plus one route's output (outputs are deleted after each route).
    """
    margin = 2e9

    def need(n: int) -> float:
        return 2 * checkpoint_bytes(config_for(args, n), args.dtype) + margin

    if args.layers is not None:
        if need(args.layers) > free:
            sys.exit(f"error: {args.layers} layers need {need(args.layers) / 1e9:.1f} GB of disk, "
                     f"{free / 1e9:.1f} GB free; pass fewer --layers or another --workdir")  # fmt: skip
        return args.layers
    layers = TARGET_LAYERS
    while layers > 1 and need(layers) > free:
        layers -= 1
    if need(layers) > free:
        sys.exit(f"error: not even 1 layer fits in {free / 1e9:.1f} GB free; pass another --workdir")
    if layers < TARGET_LAYERS:
        print(f"warning: {free / 1e9:.1f} GB free, {need(TARGET_LAYERS) / 1e9:.1f} GB needed for "
              f"{TARGET_LAYERS} layers: benchmarking {layers} layers instead")  # fmt: skip
    return layers


def run_size(args: argparse.Namespace, work: Path, layers: int, routes: list[str]) -> list[Run]:
    """Build a ``layers``-layer checkpoint and measure ``routes`` on it (best of --repeat)."""
    cfg = config_for(args, layers)
    src = work / f"src-{layers}"
    t0 = time.perf_counter()
    nbytes = build_checkpoint(src, cfg, args.dtype, args.source_shard_size)
    print(
        f"built a {layers}-layer checkpoint ({fmt_bytes(nbytes)}) in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    g = args.num_kv_heads
    out_cfg = {**cfg, "num_key_value_heads": g}
    expect = {"copy": du(src), "converter": checkpoint_bytes(out_cfg, args.dtype)}
    expect["naive"] = expect["converter"]
    best: dict[str, Run] = {}
    for rep in range(args.repeat):
        for route in routes:
            if route == "naive" and rep:
                continue  # once is enough to show it needs the whole model
            run, dst = measure(route, src, layers, work, args, expect[route])
            if rep == 0 and route != "copy":
                check_mean_pooled(src, dst, layers, g)
            shutil.rmtree(dst.parent)
            if route == "naive":
                run.base_rss = json.loads((work / "naive.json").read_text())["base_rss"]
            old = best.get(route)
            if old is None or run.seconds < old.seconds:
                if old is not None:
                    run.peak_rss = max(run.peak_rss, old.peak_rss)
                best[route] = run
            else:
                old.peak_rss = max(old.peak_rss, run.peak_rss)
    shutil.rmtree(src)
    return [best[r] for r in routes]


def extrapolate(naive: Run, full_bytes: int, layers: int) -> Run:
    """The naive route at ``full_bytes`` of checkpoint: RSS growth and time scaled by size."""
    base = naive.base_rss
    scale = full_bytes / naive.src_bytes
    rss = base + (naive.peak_rss - base) * scale
    return Run(
        "naive", layers, full_bytes, int(naive.out_bytes * scale), naive.seconds * scale, int(rss), True
    )


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    import psutil

    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    layers = choose_layers(args, shutil.disk_usage(parent).free)
    if args.naive_layers > layers:
        args.naive_layers = layers
    work = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=parent))
    print(
        f"load average {os.getloadavg()[0]:.1f} (other processes compete for the {os.cpu_count()} CPUs and the disk)"
    )
    print(f"working folder {work} ({shutil.disk_usage(work).free / 1e9:.0f} GB free); "
          f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM", flush=True)  # fmt: skip
    try:
        routes = ["copy", "converter"]
        naive_here = not args.skip_naive and args.naive_layers == layers
        naive_bytes = checkpoint_bytes(config_for(args, args.naive_layers), args.dtype)
        if not args.skip_naive:
            # from_pretrained holds the model, and the edit copies K/V: refuse rather than be OOM-killed.
            need = 1.3 * naive_bytes + 1.5e9
            avail = psutil.virtual_memory().available
            if need > avail:
                print(f"warning: the naive route on {args.naive_layers} layers needs ~{need / 1e9:.1f} GB RAM, "
                      f"{avail / 1e9:.1f} GB available: skipped (pass fewer --naive-layers)")  # fmt: skip
                args.skip_naive, naive_here = True, False
        runs = run_size(args, work, layers, routes + (["naive"] if naive_here else []))
        if not args.skip_naive and not naive_here:
            small = run_size(args, work, args.naive_layers, [*routes, "naive"])
            runs += small
            runs.append(extrapolate(small[-1], runs[0].src_bytes, layers))
        ok = print_report(runs, args, layers)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        if args.json:
            args.json.write_text(
                json.dumps([asdict(r) | {"mb_per_s": r.mb_per_s} for r in runs], indent=2) + "\n"
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
