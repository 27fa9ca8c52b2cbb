"""gqa-uptrain: turn multi-head-attention checkpoints into grouped-query attention and uptrain them.

The Python entry points are imported lazily, so ``import gqa_uptrain`` costs milliseconds and
imports neither torch nor transformers::

    from gqa_uptrain import convert, load_recipe, uptrain, evaluate

Converted checkpoints of the families transformers has no GQA for (GPT-2, GPT-NeoX, OPT, T5,
BERT) ship their modelling code and load with ``trust_remote_code=True``. To load them without it,
register our classes with transformers' Auto classes once, explicitly::

    import gqa_uptrain
    gqa_uptrain.register_auto_classes()

Our own entry points (``gqa-eval``, ``gqa-uptrain``, calibration, ``gqa-export``'s checks) do this
themselves.

The package is laid out one folder per pipeline stage, imports pointing down:
``io`` → ``architectures`` → ``merging`` → ``conversion``; ``data`` → ``training``;
``evaluation``; ``hub``; ``modeling`` (self-contained: it ships inside checkpoints); ``cli`` on top.
Modules that moved in 0.2 keep their old import paths for one release, with a
``DeprecationWarning`` (see :mod:`gqa_uptrain._moved`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _moved
from ._version import __version__ as __version__
from .errors import CheckpointError, ConfigError, GQAError, OutputExistsError

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from .conversion import ConversionPlan, ConversionResult, convert, plan_conversion
    from .evaluation import EvalOptions, EvalReport, evaluate
    from .hub.publish import push_folder
    from .modeling import register_auto_classes
    from .training import UptrainConfig, UptrainResult, load_recipe, uptrain

# name -> submodule that defines it; imported on first access (PEP 562 module __getattr__).
_LAZY = {
    "ConversionPlan": "conversion",
    "ConversionResult": "conversion",
    "convert": "conversion",
    "plan_conversion": "conversion",
    "UptrainConfig": "training.config",
    "load_recipe": "training.config",
    "UptrainResult": "training.loop",
    "uptrain": "training.loop",
    "EvalOptions": "evaluation",
    "EvalReport": "evaluation",
    "evaluate": "evaluation",
    "push_folder": "hub.publish",
    "register_auto_classes": "modeling",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionPlan",
    "ConversionResult",
    "EvalOptions",
    "EvalReport",
    "GQAError",
    "OutputExistsError",
    "UptrainConfig",
    "UptrainResult",
    "convert",
    "evaluate",
    "load_recipe",
    "plan_conversion",
    "push_folder",
    "register_auto_classes",
    "uptrain",
]


def __getattr__(name: str) -> Any:
    """Import the public API on first use (PEP 562), so ``import gqa_uptrain`` stays light."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """Module attributes, the lazy ones included."""
    return sorted(set(globals()) | set(_LAZY))


_moved.install()
