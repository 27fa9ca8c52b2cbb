"""Publishing stage: repo ids and tokens, model cards, checks of a folder before upload, upload.

``import gqa_uptrain.hub`` is light; ``push_folder`` and friends load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLISH = {
    "HubError",
    "PushResult",
    "check_folder",
    "check_push_target",
    "check_repo_id",
    "plan_export",
    "push_folder",
}


def __getattr__(name: str) -> Any:
    """Load :mod:`.publish` (huggingface_hub) only when one of its names is used."""
    if name in _PUBLISH:
        return getattr(importlib.import_module(".publish", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_PUBLISH)
