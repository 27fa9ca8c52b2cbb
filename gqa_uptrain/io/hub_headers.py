"""Plan a Hub checkpoint without downloading it: config.json plus the safetensors headers, read with
HTTP range requests (the first 8 bytes of each weights file, then exactly its JSON header).

``gqa-convert --dry-run`` on a Hub id uses this, so planning a 70B conversion fetches a few hundred
kilobytes, never the weights. The reads go through ``huggingface_hub`` (its endpoint, ``HF_TOKEN`` or
the login, its HTTP session and error types), as its own ``get_safetensors_metadata`` does; that
function always asks for the first 100 kB of a file, so it would read weight bytes of a small shard:
the two exact ranges here do not.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .checkpoint import SAFETENSORS_DTYPES, TOKENIZER_FILES
from .tensors import Source, TensorInfo

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_MAX_HEADER = 100_000_000  # as read_safetensors_header: a larger "header" is not a safetensors file


class HeaderOnlyReader:
    """The tensors of a remote checkpoint, known from its headers; their data is never read."""

    def __init__(self, infos: list[TensorInfo], repo_id: str):
        self._infos = infos
        self.repo_id = repo_id

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, info: TensorInfo):  # noqa: ANN201 - the reader protocol
        raise CheckpointError(
            f"{self.repo_id} was opened for planning only (headers); convert without --dry-run to read weights"
        )

    def close(self) -> None:
        """Nothing is open."""


def open_hub_headers(
    repo_id: str, revision: str | None = None, token: str | bool | None = None
) -> Source | None:
    """A :class:`Source` for Hub repo ``repo_id`` whose reader knows every tensor from the headers.

    Fetches the repo's file list, ``config.json``, the safetensors index when sharded, and each
    weights file's header by HTTP range requests; no tensor data. Returns None for a repo without
    safetensors weights (GGUF or pickles only: the caller downloads those as before).

    Raises:
        CheckpointError: the repo does not exist or is not accessible, the Hub cannot be reached, or a
            header is corrupt (one line, naming the file).
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        info = HfApi().model_info(repo_id, revision=revision, token=token, files_metadata=True)
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        commit = info.sha or revision  # every later read at the same commit
        if INDEX in sizes:
            index = json.loads(
                Path(hf_hub_download(repo_id, INDEX, revision=commit, token=token)).read_text()
            )
            files = list(dict.fromkeys(index.get("weight_map", {}).values()))
            missing = [f for f in files if f not in sizes]
            if missing:
                raise CheckpointError(f"shard {missing[0]} named in {where}'s {INDEX} is not in the repo")
        elif SINGLE in sizes:
            files = [SINGLE]
        else:
            return None
        if "config.json" not in sizes:
            raise CheckpointError(f"Hub repo {where} has no config.json; it is not a Hugging Face checkpoint")
        config_path = Path(hf_hub_download(repo_id, "config.json", revision=commit, token=token))
        infos: list[TensorInfo] = []
        for fname in files:
            infos += _remote_header(repo_id, fname, commit, token, sizes.get(fname))
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"Hub repo {repo_id!r} not found or not accessible; check the id, or log in with `hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except EntryNotFoundError as e:
        raise CheckpointError(f"{where}: {str(e).splitlines()[0]}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot reach the Hugging Face Hub to plan {repo_id!r}; check the network or pass a local folder"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"reading {where}'s headers failed: {str(e).splitlines()[0]}") from None
    except OSError as e:  # connection refused, DNS, timeouts (httpx errors are OSError subclasses here)
        raise CheckpointError(f"cannot reach the Hugging Face Hub to plan {repo_id!r}: {e}") from None
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{where}'s config.json is not valid JSON ({e.msg} at line {e.lineno})"
        ) from None
    support = {name: sizes[name] or 0 for name in TOKENIZER_FILES if name in sizes}
    logger.info(
        "planned %s from its headers: %d tensors in %d files, no weights read", where, len(infos), len(files)
    )
    return Source(
        folder=config_path.parent,
        config=config,
        reader=HeaderOnlyReader(infos, repo_id),
        name=repo_id,
        extra={"remote_file_bytes": support, "remote_weights_bytes": sum(sizes.get(f) or 0 for f in files)},
    )


def _range(url: str, headers: dict[str, str], first: int, last: int) -> bytes:
    """Bytes ``first..last`` (inclusive) of the file at ``url``."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    response = get_session().get(url, headers={**headers, "range": f"bytes={first}-{last}"})
    hf_raise_for_status(response)
    data = response.content
    if response.status_code == 200 and len(data) > last - first + 1:  # a server that ignores ranges
        data = data[first : last + 1]
    return data


def _remote_header(
    repo_id: str, fname: str, revision: str | None, token: str | bool | None, size: int | None
) -> list[TensorInfo]:
    """The tensors of one remote safetensors file, from two range reads: its 8-byte header length,
    then exactly its header."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo_id, fname, revision=revision)
    headers = build_hf_headers(token=token)
    raw = _range(url, headers, 0, 7)
    if len(raw) < 8:
        raise CheckpointError(f"{repo_id}/{fname} is truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or (size is not None and n > size - 8):
        raise CheckpointError(f"{repo_id}/{fname} is not a safetensors file (header of {n} bytes)")
    try:
        header: dict[str, Any] = json.loads(_range(url, headers, 8, 8 + n - 1))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{repo_id}/{fname} has a corrupt safetensors header") from None
    infos = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            begin, end = meta["data_offsets"]
            shape = tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{repo_id}/{fname}: tensor {name!r} has a corrupt header entry") from None
        t = TensorInfo(name, shape, dtype, None, 8 + n + begin, 8 + n + end)
        if end < begin or t.end - t.begin != t.nbytes or (size is not None and t.end > size):
            raise CheckpointError(f"{repo_id}/{fname}: tensor {name!r} has inconsistent offsets")
        infos.append(t)
    infos.sort(key=lambda i: i.begin)
    return infos
