"""Publishing stage: repo ids and tokens, model cards, checks of a folder before upload, upload.

``import gqa_uptrain.hub`` is light; ``push_folder`` and friends (huggingface_hub's upload, and the
folder check that loads the checkpoint) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..io.locate import check_repo_id as check_repo_id  # light: no need to load publish

_PUBLISH = {
    "HubError",
    "PushResult",
    "check_folder",
    "check_push_target",
    "plan_export",
    "push_folder",
}


def __getattr__(name: str) -> Any:
    """Load :mod:`.publish` (huggingface_hub) only when one of its names is used."""
    if name in _PUBLISH:
        return getattr(importlib.import_module(".publish", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted({*_PUBLISH, "check_repo_id"})
