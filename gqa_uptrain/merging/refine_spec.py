"""The refinement budget (:class:`RefineSpec`) and what refinement reports per module (:class:`ModuleReport`)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RefineSpec:
    """How hard to train each merged attention module (the refinement budget)."""

    # Most optimizer steps per attention module (the early stop may end sooner). 260: SmolLM2 3 -> 1 at
    # the CLI's calibration defaults removes 95.1% in about 10 minutes on 2 CPU cores (300: 95.2%,
    # about 11; results/merging.md, issue 22).
    steps: int = 260
    # ... and at most this many passes over the training batches: with little calibration text the
    # later passes fit the text rather than the function (the held-out stop catches that, but late,
    # at a step size still near its peak); the schedule is laid over the shorter budget.
    max_epochs: float = 20.0
    # Adam's peak step, relative to each tensor's RMS (cosine decay to 10% of it), for a module whose
    # input is ``reference_width`` wide; a wider module gets ``lr * sqrt(reference_width / width)``:
    # Adam moves every weight of a row by about the same amount, so the row's output moves about
    # sqrt(width) times further than one weight's share of it (the 1/sqrt(fan-in) rule of muP).
    lr: float = 0.1
    reference_width: int = 128
    batch_size: int = 4  # calibration sequences per step
    # The training forward and backward in bfloat16 autocast on a GPU with bf16 tensor cores, and
    # for modules at least ``CPU_AUTOCAST_MIN_WIDTH`` wide on a CPU that computes bf16 natively
    # (AVX512-BF16 or AMX; ``device.use_autocast``): 12%
    # faster per SmolLM2 module there, the same result (the weights, the error checks, the kept
    # weights and the output solve stay in float32).
    autocast: bool = True
    # Early stop on held-out calibration text: every ``eval_every`` steps the module's error on the
    # held-out share is measured; after ``patience`` such checks without a ``min_gain`` gain, training
    # stops (after the anneal) and the best weights seen are kept. This stops a module that has
    # started to fit the calibration text rather than the function (a small calibration set; a wide
    # model).
    eval_every: int = 20
    # 3 checks (60 steps): with 2, modules halfway through their schedule stopped on a noisy check and
    # ended worse (SmolLM2: 94.9% against 95.0%, for 10% more steps at 3).
    patience: int = 3
    min_gain: float = 0.01  # a check "gains" when the held-out error falls by at least this share
    anneal: bool = True  # before stopping early, decay the step size to zero over ``eval_every`` steps
    # Share of the calibration sequences held out (at least one batch). A sixteenth: at the CLI's
    # defaults 2 batches of 4 x 512 tokens judge well enough, and the other 2 train (SmolLM2: 95.2%
    # against 95.0% with an eighth, and half the checks' time).
    validation: float = 0.0625
    warmup: int = 10  # linear learning-rate warm-up steps
    backoffs: int = 2  # restarts at a third of the step size when the first check finds things worse
    # After training, the output projection is set to its least-squares optimum given the rest.
    solve_output: bool = True
    # What the converted module is trained to output: ``original``, the original module's output on
    # the original model's own hidden states (so a layer also makes up for the error of the layers
    # before it); ``same-input``, the original module's output on the converted prefix's states.
    target: str = "same-input"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"refinement steps must be >= 0, got {self.steps}")
        if self.max_epochs <= 0:
            raise ValueError(f"refinement max_epochs must be positive, got {self.max_epochs}")
        if self.lr <= 0 or self.batch_size <= 0:
            raise ValueError("refinement lr and batch size must be positive")
        if self.eval_every <= 0 or self.patience <= 0 or self.backoffs < 0 or self.reference_width <= 0:
            raise ValueError(
                "refinement eval_every, patience and reference_width must be positive, backoffs >= 0"
            )
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"refinement min_gain must be in [0, 1), got {self.min_gain}")
        if not 0 <= self.validation < 1:
            raise ValueError(f"refinement validation share must be in [0, 1), got {self.validation}")
        if self.target not in ("original", "same-input"):
            raise ValueError(f"refinement target must be 'original' or 'same-input', not {self.target!r}")


@dataclass
class ModuleReport:
    """What refinement did to one attention module (relative output error over all batches)."""

    module_name: str
    error_before: float  # closed-form start
    error_after: float  # kept result (== before when refinement was rejected)
    steps: int
    seconds: float
    kept: bool
    lr: float = math.nan  # the peak step size the kept weights were trained at (after any back-off)
    backoffs: int = 0  # restarts at a smaller step size before the kept weights
    bf16: bool = False  # trained in bfloat16 autocast (``RefineSpec.autocast``)
