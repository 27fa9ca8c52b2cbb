"""Old import paths of the modules that moved into the stage folders in 0.2, kept for one release.

``import gqa_uptrain.checkpoint`` (say) still works: it warns with a ``DeprecationWarning`` naming
the new path and returns the module at that path, the same object, so monkeypatching either name
patches both. Remove this file (and its ``install()`` call) in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

# old module (relative to the package) -> where it lives now
MOVED = {
    "checkpoint": "io.checkpoint",
    "gguf_source": "io.gguf",
    "writer": "io.writer",
    "outputs": "io.outputs",
    "portability": "io.portability",
    "aligned": "merging.aligned",
    "grouping": "merging.grouping",
    "calibration": "merging.calibration",
    "config": "training.config",
    "card": "hub.card",
}
_PACKAGE = __name__.rpartition(".")[0]


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``gqa_uptrain.<old>`` and loads it as the module at its new path."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        prefix, _, old = fullname.rpartition(".")
        if prefix != _PACKAGE or old not in MOVED or _is_real_module(old):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        new = f"{_PACKAGE}.{MOVED[spec.name.rpartition('.')[2]]}"
        warnings.warn(
            f"{spec.name} moved to {new}; the old path goes away in gqa-uptrain 0.3",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is the new one, already imported."""


def _is_real_module(old: str) -> bool:
    # While a name is both an old module and a real package (merging: the package replaced the
    # module), the package wins.
    paths = getattr(sys.modules.get(_PACKAGE), "__path__", None) or []
    return importlib.machinery.PathFinder.find_spec(f"{_PACKAGE}.{old}", paths) is not None


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
