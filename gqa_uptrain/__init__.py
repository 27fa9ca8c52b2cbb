"""gqa-uptrain: turn multi-head-attention checkpoints into grouped-query attention and uptrain them.

The Python entry points are imported lazily, so ``import gqa_uptrain`` costs milliseconds and
imports neither torch nor transformers::

    from gqa_uptrain import convert, load_recipe, uptrain, evaluate

Importing the package also arranges for the GQA modelling classes of the families transformers has
no GQA for (GPT-2, GPT-NeoX, OPT, T5, BERT) to be registered with the Auto classes, so converted
checkpoints of those families load without ``trust_remote_code`` where the package is installed.
The registration imports transformers' modelling code (seconds, with torch), so it is not done
here but as soon as transformers' Auto classes are imported, before they can be used (see
:class:`_RegisterWithTransformers`); if they already are, it is done at once.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from importlib.machinery import ModuleSpec
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError, GQAError, OutputExistsError

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from .config import UptrainConfig, load_recipe
    from .conversion import ConversionResult, convert
    from .evaluation import EvalOptions, EvalReport, evaluate
    from .hub import push_folder
    from .training import UptrainResult, uptrain

__version__ = "0.1.0"

logger = logging.getLogger(__name__)

# name -> submodule that defines it; imported on first access (PEP 562 module __getattr__).
_LAZY = {
    "ConversionResult": "conversion",
    "convert": "conversion",
    "UptrainConfig": "config",
    "load_recipe": "config",
    "UptrainResult": "training",
    "uptrain": "training",
    "EvalOptions": "evaluation",
    "EvalReport": "evaluation",
    "evaluate": "evaluation",
    "push_folder": "hub",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
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
    "push_folder",
    "uptrain",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# ----------------------------------------------------------------------------------------------
# Registration of the GQA modelling classes, deferred until transformers' Auto classes exist
# ----------------------------------------------------------------------------------------------

# Importing either defines the Auto classes: the registration must be done before they are used.
_AUTO_MODULES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")


def _watched(name: str) -> bool:
    """Modules whose import may be under way when registration would import modelling code."""
    return name == "transformers" or name.startswith(("transformers.", f"{__name__}.modeling"))


class _RegisterWithTransformers:
    """A ``sys.meta_path`` finder that registers the GQA classes once transformers' Auto classes load.

    It finds nothing itself: for a ``transformers`` (or ``gqa_uptrain.modeling``) module it asks the
    finders after it for the spec and wraps that spec's loader's ``exec_module`` (on the loader
    instance only; the module keeps its real loader), to notice when the import is done. The
    registration then runs when an Auto module is loaded and no watched import is under way any
    more, i.e. at the end of the outermost ``import``/``from transformers import ...`` statement,
    never inside a half-initialised transformers module (which registration imports from). After
    that the finder removes itself from ``sys.meta_path``.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loading: set[str] = set()
        self._done = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if self._done or not _watched(fullname):
            return None
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        # A loader shared by several modules (zipimport) may already be wrapped: the outer import
        # still reports when it is done.
        if spec is None or not hasattr(loader, "exec_module") or "exec_module" in vars(loader):
            return spec
        real_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            with self._lock:
                self._loading.add(fullname)
            try:
                real_exec(module)
            finally:
                del loader.exec_module  # the loader is itself again
                with self._lock:
                    self._loading.discard(fullname)
            self.register_if_ready()

        loader.exec_module = exec_module
        return spec

    def register_if_ready(self) -> None:
        """Register when an Auto module is loaded and no watched import is under way."""
        with self._lock:
            if self._done or self._loading or not any(m in sys.modules for m in _AUTO_MODULES):
                return
            self._done = True
            _uninstall(self)
            try:
                from .modeling import register_auto_classes

                register_auto_classes()
            except Exception as e:  # never break the user's transformers import over this
                logger.warning(
                    "could not register the GQA model classes with transformers (%s: %s); converted "
                    "GPT-2/NeoX/OPT/T5/BERT checkpoints load with trust_remote_code=True",
                    type(e).__name__,
                    e,
                )


def _uninstall(finder: _RegisterWithTransformers) -> None:
    # Compare by identity: another finder's __eq__ must not be consulted (or matter).
    sys.meta_path[:] = [f for f in sys.meta_path if f is not finder]


def _install() -> None:
    if any(type(f).__name__ == _RegisterWithTransformers.__name__ for f in sys.meta_path):
        return  # the package was imported again under another name or reloaded
    finder = _RegisterWithTransformers()
    sys.meta_path.insert(0, finder)
    # transformers' Auto classes may be there already (imported before this package): register now,
    # unless a transformers import is under way (this package imported from inside one), in which
    # case the finder registers when it finishes.
    in_progress = any(
        _watched(name) and getattr(getattr(mod, "__spec__", None), "_initializing", False)
        for name, mod in list(sys.modules.items())
    )
    if not in_progress:
        finder.register_if_ready()


_install()
