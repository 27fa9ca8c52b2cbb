"""Tune layer-wise refinement on validation text, never on the held-out text the targets are read on.

Converts the reproduction's pretrained MHA model (``scripts/reproduce_paper.py``; pass its
``--work``) to H/4 K/V heads with ``aligned`` + refinement at the given settings and prints the share
of mean pooling's added cross-entropy that the conversion removes on **validation** text: training
documents the calibration text does not contain (the last documents of the training split; the
model saw them in pretraining, as it saw the calibration text, but no conversion is fitted on them).
The reproduction's held-out documents are scored only with ``--held-out``, to report a setting
chosen on validation.

    python scripts/tune_refine.py --work runs/reproduce-full --refine-steps 300
    python scripts/tune_refine.py --work runs/reproduce-full --refine-steps 300 --lr 0.01 --held-out
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce_paper as rp  # noqa: E402
from refine_args import add_refine_args, refine_spec  # noqa: E402

from gqa_uptrain.conversion.pipeline import convert  # noqa: E402
from gqa_uptrain.evaluation import perplexity, tokenize_documents  # noqa: E402
from gqa_uptrain.evaluation.loading import load_model  # noqa: E402
from gqa_uptrain.merging.aligned import CalibratedMerge  # noqa: E402
from gqa_uptrain.merging.calibration import CalibrationSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/reproduce-full"), help="reproduce_paper's --work")
    p.add_argument("--scale", default="full", choices=sorted(rp.SCALES))
    p.add_argument("--kv-heads", type=int, default=None, help="default: H/4")
    add_refine_args(p)
    p.add_argument(
        "--grouping",
        default="contiguous",
        choices=["contiguous", "similarity"],
        help="similarity: groups searched by the aligned fit's residual",
    )
    p.add_argument("--validation-tokens", type=int, default=30_000)
    p.add_argument("--held-out", action="store_true", help="also score the reproduction's held-out text")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scale = rp.SCALES[args.scale]
    work: Path = args.work
    original = work / "original" / "model"
    if not (original / "config.json").is_file():
        raise SystemExit(f"error: {original} is missing; run scripts/reproduce_paper.py --work {work} first")
    g = args.kv_heads or scale.heads // 4
    dcfg = rp.data_config(rp.DEFAULT_DATA, scale, 0, (work / "cache").absolute())
    train_docs, held_docs = rp.split_train_eval(dcfg)
    tokenizer = rp.train_tokenizer(train_docs, dcfg.text_column, scale.vocab, work / "tokenizer")
    calibration = rp.write_calibration_text(train_docs, dcfg.text_column, scale.calibration_tokens, work)
    calibration_text = calibration.read_text()
    # Validation: training documents from the end of the split, none of them in the calibration text.
    docs = [row[dcfg.text_column] for row in train_docs]
    val_docs = [d for d in reversed(docs) if d and d not in calibration_text][:200]
    sets = {"validation": tokenize_documents(iter(val_docs), tokenizer, args.validation_tokens)}
    if args.held_out:
        sets["held-out"] = tokenize_documents(
            (row[dcfg.text_column] for row in held_docs), tokenizer, scale.max_eval_tokens
        )

    def nll(folder: Path) -> dict[str, float]:
        model = load_model(folder, dtype="float32").model
        return {
            k: perplexity(model, ids, max_length=scale.block_size, stride=scale.block_size // 2,
                          batch_size=16, progress=False).nll_per_token
            for k, ids in sets.items()
        }  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        base = nll(original)
        convert(original, Path(tmp) / "mean", g, "mean", progress=False)
        mean = nll(Path(tmp) / "mean")
        spec = refine_spec(args)  # fmt: skip
        method = CalibratedMerge(
            "aligned",
            CalibrationSpec(str(calibration), num_tokens=scale.calibration_tokens, seq_len=scale.block_size),
            args.grouping,
            refine=spec,
        )
        t0 = time.perf_counter()
        convert(original, Path(tmp) / "out", g, method, progress=False)
        seconds = time.perf_counter() - t0
        out = nll(Path(tmp) / "out")
    steps = sum(r.steps for r in method.reports)
    print(
        f"{args.scale} H={scale.heads} -> {g} ({args.grouping}): {spec or 'closed form'}; {seconds:.1f} s, {steps} steps in all"
    )
    for k in sets:
        removed = (mean[k] - out[k]) / (mean[k] - base[k])
        print(
            f"  {k}: perplexity {math.exp(out[k]):.3f} (original {math.exp(base[k]):.3f}, +"
            f"{math.exp(out[k] - base[k]) - 1:.1%}; mean pooling {math.exp(mean[k]):.1f}); removed {removed:.2%}"
        )


if __name__ == "__main__":
    main()
