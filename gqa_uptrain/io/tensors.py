"""The types every checkpoint reader shares: where a tensor lives (:class:`TensorInfo`), what a
reader does (:class:`TensorReader`) and a resolved checkpoint (:class:`Source`).

They live apart from the readers so that each reader (safetensors and pickles in
:mod:`.checkpoint`, GGUF in :mod:`.gguf`) imports only these, never another reader: ``checkpoint``
opens a GGUF through ``gguf``, and ``gguf`` needs nothing from ``checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


def dtype_itemsize(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path | None = None  # safetensors file holding the raw bytes
    begin: int = 0  # absolute byte offsets in ``file``
    end: int = 0

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        n = 1
        for s in self.shape:
            n *= s
        return n * dtype_itemsize(self.dtype)


class TensorReader(Protocol):
    """What the converter needs from a checkpoint: tensors in storage order, one at a time."""

    def infos(self) -> list[TensorInfo]: ...

    def read(self, info: TensorInfo) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass
class Source:
    """A resolved checkpoint: a local folder, its config, and a reader for its tensors."""

    folder: Path
    config: dict[str, Any]
    reader: TensorReader
    name: str  # what the user called it (Hub id or path), for the model card
    gguf_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Close the reader (its open shard files)."""
        self.reader.close()
