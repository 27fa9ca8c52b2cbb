"""Uptraining stage: the recipe (typed config from YAML), and the accelerate training loop.

* ``config``: the recipe (light: no torch, no ``datasets``);
* ``loop``: :func:`uptrain` = ``setup`` -> ``fit`` (``train_step``, held-out perplexity) -> ``finish``;
* ``setup``: accelerator, run folder, data, models, optimizer, ``prepare``, resume;
* ``finish``: final checkpoint, model in the checkpoint's dtype, results.json, card, push;
* ``state``: the typed :class:`TrainState` (checkpointed progress), ``Run`` and ``UptrainResult``;
* ``checkpointing``: run lock, checkpoints (save, rotate, newest, resume);
* ``distributed``: one outcome for all processes (``all_ranks``, ``ProcessError``);
* ``models``: loading student and teacher, the checkpoint's dtype, freezing;
* ``losses``: LM loss and distillation KL.

Everything but ``config`` loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "UptrainConfig": "config",
    "dump_recipe": "config",
    "load_recipe": "config",
    "UptrainResult": "state",
    "uptrain": "loop",
}


def __getattr__(name: str) -> Any:
    """Import the named part on first use, so reading a recipe never loads torch."""
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
