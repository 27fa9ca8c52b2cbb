"""Refined head blocks waiting for the converter, spilled to disk so memory does not grow with depth."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from .methods import HeadBlocks


class BlockStore:
    """Refined head blocks waiting for the converter, spilled to a temporary folder (one file per
    module) so memory does not grow with the number of layers; each is deleted once taken."""

    PREFIX = "gqa-refine-"

    def __init__(self) -> None:
        # In the system's temporary folder (``TMPDIR`` moves it): the blocks of every layer sit here
        # until the converter streams them, in the checkpoint's dtype (2.7 GB at Llama-2-7B in bf16).
        _remove_stale_stores()
        self.folder = Path(tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def put(
        self, module_name: str, blocks: HeadBlocks, dtypes: dict[str, dict[str, torch.dtype]] | None = None
    ) -> None:
        """Keep ``blocks`` (detached; cast to ``dtypes[suffix][role]`` where given) for :meth:`take`."""
        from safetensors.torch import save_file

        dtypes = dtypes or {}
        flat = {
            f"{s}|{r}": t.detach().to("cpu", dtypes.get(s, {}).get(r, t.dtype)).contiguous()
            for s, parts in blocks.items()
            for r, t in parts.items()
        }
        save_file(flat, self.folder / f"{module_name}.safetensors")

    def take(self, module_name: str) -> HeadBlocks | None:
        """The blocks stored for ``module_name`` (removed from the store), or None."""
        from safetensors.torch import load_file

        path = self.folder / f"{module_name}.safetensors"
        if not path.exists():
            return None
        out: HeadBlocks = {}
        for key, t in load_file(path).items():
            suffix, role = key.split("|")
            out.setdefault(suffix, {})[role] = t  # type: ignore[index]
        path.unlink()
        return out

    def close(self) -> None:
        """Remove the folder and whatever is left in it."""
        self._finalizer()


def _remove_stale_stores() -> None:
    """Remove the block stores of processes that died without cleaning up (killed mid-conversion)."""
    from ..io.outputs import pid_alive

    for path in Path(tempfile.gettempdir()).glob(f"{BlockStore.PREFIX}*-*"):
        pid = path.name[len(BlockStore.PREFIX) :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
