"""The refinement settings (``RefineSpec``) as command-line options, shared by the tuning scripts."""

from __future__ import annotations

import argparse

from gqa_uptrain.merging.refine import RefineSpec


def add_refine_args(p: argparse.ArgumentParser) -> None:
    """Add one option per ``RefineSpec`` knob (defaults: the converter's)."""
    p.add_argument(
        "--refine-steps",
        type=int,
        default=RefineSpec.steps,
        help="most Adam steps per module (0: closed form)",
    )
    p.add_argument(
        "--max-epochs",
        type=float,
        default=RefineSpec.max_epochs,
        help="most passes over the training batches per module",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=RefineSpec.lr,
        help="peak step relative to each tensor's RMS, at width 128",
    )
    p.add_argument("--batch-size", type=int, default=RefineSpec.batch_size, help="sequences per step")
    p.add_argument("--target", default=RefineSpec.target, choices=["same-input", "original"])
    p.add_argument(
        "--patience", type=int, default=RefineSpec.patience, help="early stop: checks without a gain"
    )
    p.add_argument(
        "--min-gain", type=float, default=RefineSpec.min_gain, help="early stop: a check's least gain"
    )
    p.add_argument(
        "--eval-every", type=int, default=RefineSpec.eval_every, help="steps between early-stop checks"
    )
    p.add_argument(
        "--validation", type=float, default=RefineSpec.validation, help="calibration share held out"
    )
    p.add_argument(
        "--no-solve-output", action="store_true", help="skip the output projection's least squares"
    )
    p.add_argument("--no-autocast", action="store_true", help="train in float32 even where bf16 is native")


def refine_spec(args: argparse.Namespace) -> RefineSpec | None:
    """The ``RefineSpec`` the options ask for; None for ``--refine-steps 0`` (the closed form only)."""
    if not args.refine_steps:
        return None
    return RefineSpec(
        steps=args.refine_steps,
        max_epochs=args.max_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        target=args.target,
        patience=args.patience,
        min_gain=args.min_gain,
        eval_every=args.eval_every,
        validation=args.validation,
        solve_output=not args.no_solve_output,
        autocast=not args.no_autocast,
    )
