"""A streaming, sharded safetensors writer whose memory does not grow with the model.

A safetensors file starts with a header that lists every tensor's byte offsets, so a writer that
learns tensors one by one must either hold a whole shard in memory (mergekit does) or know the
layout in advance. The converter knows every output tensor's name, shape and dtype before it
computes any of them, so this writer takes that *plan* up front, writes each shard's header when
the shard is opened, and then appends tensor bytes as they arrive. Peak memory is one tensor
(or one copy chunk for pass-through tensors).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import ConfigError
from .checkpoint import DTYPE_NAMES, dtype_itemsize

_ALIGN = 8  # safetensors pads the header so data starts 8-byte aligned
_METADATA = {"format": "pt"}  # what transformers' save_pretrained records; its loader checks it


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor's name, shape and dtype, known before its values."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = dtype_itemsize(self.dtype)
        for s in self.shape:
            n *= s
        return n


def parse_size(size: str | int) -> int:
    """Parse ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--max-shard-size {size!r} is not a size; use e.g. 5GB, 500MB or a byte count")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    mult.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    result = int(value * mult[unit])
    if result <= 0:
        raise ConfigError(f"--max-shard-size must be positive, got {size!r}")
    return result


def plan_shards(plan: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Split ``plan`` (in order) into shards of at most ``max_shard_size`` bytes of tensor data.

    A tensor larger than the limit gets a shard of its own, as in transformers.
    """
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def _shard_filenames(n: int, prefix: str = "model") -> list[str]:
    return (
        [f"{prefix}.safetensors"]
        if n == 1
        else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )


def _index_bytes(shards: list[list[PlannedTensor]], filenames: list[str]) -> bytes:
    index = {
        "metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
        "weight_map": {t.name: filenames[i] for i, s in enumerate(shards) for t in s},
    }
    return (json.dumps(index, indent=2) + "\n").encode()


def planned_files(
    plan: list[PlannedTensor], max_shard_size: int, prefix: str = "model"
) -> list[tuple[str, int]]:
    """The files :class:`ShardedWriter` will write for ``plan``, each with its exact size in bytes.

    Known before any tensor is computed (headers and index included), so a caller can check the
    disk has room, or show a user what a conversion will write, without writing anything.
    """
    shards = plan_shards(plan, max_shard_size)
    names = _shard_filenames(len(shards), prefix)
    files = [
        (name, len(_header_bytes(shard, _METADATA)) + sum(t.nbytes for t in shard))
        for name, shard in zip(names, shards, strict=True)
    ]
    if len(shards) > 1:
        files.append((f"{prefix}.safetensors.index.json", len(_index_bytes(shards, names))))
    return files


class ShardedWriter:
    """Write planned tensors, in plan order, into ``folder`` as (sharded) safetensors.

    Usage::

        with ShardedWriter(folder, plan, max_shard_size) as w:
            for t in plan:
                w.write(t.name, tensor)          # or w.write_with(t.name, copy_fn)

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json``. Writing out of order, or a tensor whose shape or
    dtype differs from the plan, is a bug and raises ``RuntimeError``.
    """

    def __init__(self, folder: Path, plan: list[PlannedTensor], max_shard_size: int, prefix: str = "model"):
        self.folder = folder
        self.shards = plan_shards(plan, max_shard_size)
        self.filenames = _shard_filenames(len(self.shards), prefix)
        self.prefix = prefix
        self._queue = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._pos = 0
        self._shard = -1
        self._file: BinaryIO | None = None
        self._remaining = 0

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if exc_type is None:
            self.finish()

    def _next(self, name: str) -> tuple[BinaryIO, PlannedTensor]:
        if self._pos >= len(self._queue):
            raise RuntimeError(f"tensor {name!r} was not planned")
        si, planned = self._queue[self._pos]
        if planned.name != name:
            raise RuntimeError(f"expected tensor {planned.name!r} next, got {name!r}")
        if si != self._shard:
            if self._file:
                self._file.close()
            self._shard = si
            self._file = open(self.folder / self.filenames[si], "wb")  # noqa: SIM115 - closed on next/exit
            self._file.write(_header_bytes(self.shards[si], _METADATA))
        self._pos += 1
        return self._file, planned  # type: ignore[return-value]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes (must match the plan's shape and dtype)."""
        f, planned = self._next(name)
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(
                f"{name}: planned {planned.shape} {planned.dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        if planned.nbytes:
            # Raw bytes of the CPU tensor, no copy for contiguous tensors (any dtype, bf16 included).
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def write_with(self, name: str, copy: Callable[[BinaryIO], None]) -> None:
        """Append a tensor by letting ``copy(file)`` write exactly its planned bytes."""
        f, planned = self._next(name)
        start = f.tell()
        copy(f)
        if f.tell() - start != planned.nbytes:
            raise RuntimeError(f"{name}: wrote {f.tell() - start} bytes, planned {planned.nbytes}")

    def finish(self) -> None:
        """Check everything was written and write the index for sharded output."""
        if self._pos != len(self._queue):
            missing = self._queue[self._pos][1].name
            raise RuntimeError(f"writer closed before tensor {missing!r} was written")
        if len(self.shards) > 1:
            (self.folder / f"{self.prefix}.safetensors.index.json").write_bytes(
                _index_bytes(self.shards, self.filenames)
            )
