"""Reading checkpoints tensor by tensor, with memory bounded by one tensor.

Sources: a local folder or a Hub repo id holding ``model.safetensors`` or sharded safetensors with
``model.safetensors.index.json``; pickled ``pytorch_model*.bin`` only on request (loaded with
``weights_only=True``); a GGUF file (dequantized tensor by tensor, see ``gguf.py``).

The shared types (:class:`TensorInfo`, :class:`Source`, the reader protocol) are in ``tensors.py``
and re-exported here.

Safetensors are parsed here rather than through ``safe_open``: reading with ``readinto`` keeps the
resident memory at one tensor (mmap'd pages of a multi-GB file count toward RSS), lets a
pass-through tensor be copied byte for byte with no decode, and lets every file be checked for
truncation before anything is written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError

# Re-exported: these lived here until 0.2 and callers still import them from here.
from .locate import looks_like_repo_id as looks_like_repo_id
from .tensors import Source as Source
from .tensors import TensorInfo as TensorInfo
from .tensors import TensorReader as TensorReader
from .tensors import dtype_itemsize as dtype_itemsize

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Files copied verbatim from a source checkpoint into the converted one.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# README.md: the source's card, for the license and base model the converted card carries over.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.gguf", "README.md"]


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse and validate one safetensors file's header (not its data).

    Raises :class:`CheckpointError` for a file that is truncated, whose header is not valid JSON,
    or whose tensors do not fit in the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header); re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path} is truncated or not a safetensors file; re-download it")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} has a corrupt safetensors header; re-download it") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; re-download the checkpoint") from None
    data_start = 8 + n
    infos = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            begin, end = meta["data_offsets"]
            shape = tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: tensor {name!r} has a corrupt header entry; re-download it"
            ) from None
        info = TensorInfo(name, shape, dtype, path, data_start + begin, data_start + end)
        if end < begin or info.end - info.begin != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has inconsistent offsets; the file is corrupt")
        if info.end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {info.end} of {size}; re-download it"
            )
        infos.append(info)
    infos.sort(key=lambda i: i.begin)
    return infos


class SafetensorsReader:
    """Single-file or sharded safetensors checkpoint, read with plain file I/O."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index} is not a valid safetensors index; re-download it") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"shard {missing[0]} named in {index.name} is missing from {folder}; re-download the checkpoint"
                )
        elif (folder / "model.safetensors").is_file():
            weight_map, files = {}, ["model.safetensors"]
        else:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")
        self._infos: list[TensorInfo] = []
        for fname in files:
            self._infos.extend(read_safetensors_header(folder / fname))
        present = {i.name for i in self._infos}
        absent = [n for n in weight_map if n not in present]
        if absent:
            raise CheckpointError(
                f"tensor {absent[0]!r} is listed in the index but in no shard; the checkpoint is incomplete"
            )
        # Shards stay open until close(): the converter reads K/V in a worker thread while the main
        # thread copies other tensors, so a file must not be closed under another thread's read.
        # Reads are positional (pread), so threads never share a file position.
        self._files: dict[Path, BinaryIO] = {}
        self._lock = threading.Lock()

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def _file(self, path: Path) -> BinaryIO:
        with self._lock:
            if path not in self._files:
                self._files[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
            return self._files[path]

    def read(self, info: TensorInfo) -> torch.Tensor:
        """Read one tensor into fresh memory (never a mmap view). Safe to call from several threads."""
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        f = self._file(info.file)  # type: ignore[arg-type]
        # torch.empty, not bytearray(n): bytearray zero-fills first, touching every page twice.
        buf = torch.empty(info.nbytes, dtype=torch.uint8)  # [nbytes]
        if self._pread_into(f, memoryview(buf.numpy()), info.begin) != info.nbytes:
            raise CheckpointError(f"{info.file} is truncated at tensor {info.name!r}; re-download it")
        return buf.view(info.dtype).reshape(info.shape)

    def _pread_into(self, f: BinaryIO, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset`` of ``f``; returns the bytes read (fewer at end of file)."""
        preadv = getattr(os, "preadv", None)
        if preadv is None:  # no positional reads here: serialise seek + read instead
            with self._lock:
                f.seek(offset)
                return f.readinto(view) or 0
        done = 0
        while done < len(view):  # Linux returns at most ~2 GiB per call
            n = preadv(f.fileno(), [view[done:]], offset + done)
            if not n:
                break
            done += n
        return done

    def copy_raw(self, info: TensorInfo, out: BinaryIO, chunk: int = 64 << 20) -> None:
        """Copy the tensor's bytes to ``out`` without decoding (pass-through tensors).

        The kernel copies file to file where it can (``copy_file_range``), with no user-space
        buffer: a fresh 64 MB buffer per tensor had to be faulted in while a multi-GB conversion
        fills the page cache, and that cost more than the I/O (scripts/bench_convert.py).
        Elsewhere (another OS, a filesystem that refuses), a chunked copy.
        """
        f = self._file(info.file)  # type: ignore[arg-type]
        done = _kernel_copy(f, info.begin, out, info.nbytes)
        left = info.nbytes - done
        buf = bytearray(min(chunk, max(left, 1)))
        view = memoryview(buf)
        while left:
            n = self._pread_into(f, view[: min(left, len(buf))], info.begin + info.nbytes - left)
            if not n:
                raise CheckpointError(f"{info.file} is truncated at tensor {info.name!r}; re-download it")
            out.write(view[:n])
            left -= n

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _kernel_copy(src: BinaryIO, offset: int, out: BinaryIO, count: int) -> int:
    """Copy ``count`` bytes at ``offset`` of ``src`` to ``out``'s position with ``copy_file_range``.

    Returns the bytes copied: ``count``, or fewer (0 included) where the kernel or the file
    objects do not support it, for the caller to finish by hand.
    """
    copy = getattr(os, "copy_file_range", None)  # Linux only
    if copy is None or not count:
        return 0
    try:
        out_fd = out.fileno()
    except (AttributeError, OSError):  # e.g. an in-memory buffer (io.UnsupportedOperation)
        return 0
    out.flush()
    pos = out.tell()
    done = 0
    try:
        while done < count:
            # Explicit offsets: neither file's position moves behind its Python buffer's back.
            n = copy(src.fileno(), out_fd, count - done, offset + done, pos + done)
            if not n:
                break  # end of file: the caller's read finds the truncation and reports it
            done += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            raise
    out.seek(pos + done)
    return done


class PickleReader:
    """``pytorch_model*.bin`` checkpoints, loaded shard by shard with ``weights_only=True``.

    Pickled shards cannot be read one tensor at a time, so memory is bounded by one shard
    (``mmap=True`` keeps even that mostly on disk for zip-format files).
    """

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "pytorch_model.bin.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = list(dict.fromkeys(weight_map.values()))
        elif (folder / "pytorch_model.bin").is_file():
            self.files = ["pytorch_model.bin"]
        else:
            raise CheckpointError(f"no pytorch_model.bin in {folder}")
        for f in self.files:
            if not (folder / f).is_file():
                raise CheckpointError(f"shard {f} named in {index.name} is missing from {folder}")
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None
        self._infos: list[TensorInfo] = []
        self._where: dict[str, str] = {}
        for fname in self.files:
            sd = self._load(fname)
            for name, t in sd.items():
                self._infos.append(TensorInfo(name, tuple(t.shape), t.dtype))
                self._where[name] = fname

    def _load(self, fname: str) -> dict[str, torch.Tensor]:
        if self._cache and self._cache[0] == fname:
            return self._cache[1]
        self._cache = None
        try:
            sd = torch.load(self.folder / fname, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CheckpointError(
                f"{self.folder / fname} could not be loaded safely: {e}".splitlines()[0]
            ) from None
        self._cache = (fname, sd)
        return sd

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, info: TensorInfo) -> torch.Tensor:
        return self._load(self._where[info.name])[info.name].clone()

    def close(self) -> None:
        self._cache = None


def download_from_hub(repo_id: str, revision: str | None, token: str | bool | None) -> Path:
    """Fetch the files a conversion needs from the Hub (config, tokenizer, safetensors, GGUF).

    The token comes from ``HF_TOKEN`` or the login cache when ``token`` is None.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    logger.info("downloading %s%s from the Hugging Face Hub", repo_id, f"@{revision}" if revision else "")
    try:
        path = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=HUB_PATTERNS)
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"Hub repo {repo_id!r} not found or not accessible; check the id, or log in with `hf auth login`"
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot reach the Hugging Face Hub to download {repo_id!r} and it is not in the local cache; "
            "check the network or pass a local folder"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"downloading {repo_id!r} failed: {str(e).splitlines()[0]}") from None
    return Path(path)


def find_gguf(folder: Path, gguf_file: str | None) -> Path | None:
    """The GGUF file to read in ``folder``: the one named, or the only one there."""
    if gguf_file:
        p = folder / gguf_file
        if not p.is_file():
            raise CheckpointError(f"GGUF file {gguf_file} not found in {folder}")
        return p
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return None
    found = sorted(folder.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(
            f"{folder} holds {len(found)} GGUF files; name one with --gguf-file (e.g. {found[0].name})"
        )
    return found[0] if found else None


def open_source(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    gguf_file: str | None = None,
    allow_pickle: bool = False,
) -> Source:
    """Resolve ``source`` (folder, GGUF file or Hub id) and open a tensor reader on it."""
    name = str(source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    elif path.is_file():
        raise CheckpointError(f"{path} is a file; pass the checkpoint's folder (or a .gguf file)")
    if not path.is_dir():
        if looks_like_repo_id(name) and not path.exists():
            path = download_from_hub(name, revision, token)
        else:
            raise CheckpointError(f"{name} is neither a local folder nor a Hub repo id (owner/name)")
    gguf = find_gguf(path, gguf_file)
    if gguf is not None:
        from .gguf import open_gguf

        return open_gguf(gguf, name)

    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e.msg} at line {e.lineno})") from None

    has_st = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    has_bin = (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file()
    if has_st:
        reader: TensorReader = SafetensorsReader(path)
    elif has_bin:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickled pytorch_model*.bin weights; pass --allow-pickle to load them "
                "(with torch weights_only=True) or convert them to safetensors first"
            )
        reader = PickleReader(path)
    else:
        raise CheckpointError(f"{path} has no weights (model.safetensors, its index, or a .gguf file)")
    return Source(folder=path, config=config, reader=reader, name=name)


def iter_tensor_groups(infos: list[TensorInfo], key) -> Iterator[tuple[Any, list[TensorInfo]]]:
    """Group ``infos`` by ``key(info)`` keeping first-appearance order (None keys stay alone)."""
    groups: dict[Any, list[TensorInfo]] = {}
    order: list[Any] = []
    for i, info in enumerate(infos):
        k = key(info)
        k = ("__single__", i) if k is None else k
        if k not in groups:
            groups[k] = []
            order.append(k)
        groups[k].append(info)
    for k in order:
        yield k, groups[k]
