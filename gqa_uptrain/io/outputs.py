"""Write outputs so that nothing is half-written and nothing is overwritten by accident.

Every command that produces a folder writes it into a temporary sibling folder and renames it into
place only once it is complete. A failure (or Ctrl-C) removes the temporary folder and leaves
whatever was at the destination untouched; with ``overwrite`` the previous folder is moved aside
and restored if anything fails before the new one is in place.

A process killed outright (``kill -9``, the OOM killer, a power cut) cannot clean up, so the
temporary folders are named after their owner (``.OUTPUT.tmp-PID@HOST-XXXXXXXX``): the next run
into the same place removes those whose process is gone, and names in a warning those it cannot
check (another host, or an older release that did not record its owner).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import DiskFullError, OutputExistsError

logger = logging.getLogger(__name__)

# Errors that mean "the filesystem is full" to the user, whatever the cause (space or quota).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output folder that exists and is not empty, unless ``overwrite`` is set."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is a file; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {path} exists and is not empty; choose another path or pass --overwrite"
        )
    return path


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes in messages, in the binary units ``df -h`` uses."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _host_tag() -> str:
    # Only characters that are safe in a file name; the tag is compared, never resolved.
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _owner_prefix(path: Path, kind: str) -> str:
    """Prefix of a ``kind`` ("tmp" or "old") sibling of ``path`` owned by this process."""
    return f".{path.name}.{kind}-{os.getpid()}@{_host_tag()}-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (temporary folders and the uptraining's run lock)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent: where the filesystem it will live on can be asked."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the filesystem that holds (or will hold) ``path``.

    None when the filesystem does not say (some FUSE and network mounts report a size of 0).
    """
    usage = shutil.disk_usage(_existing_ancestor(Path(path)))
    return usage.free if usage.total else None


def tree_bytes(folder: Path) -> int:
    """Disk space the files under ``folder`` take (allocated blocks: sparse files count as stored)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while we walk
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def check_free_space(
    path: str | os.PathLike, needed: int, what: str = "the output", *, reclaimable: int = 0
) -> None:
    """Refuse to start writing ``needed`` bytes to ``path`` when its filesystem has less free.

    ``reclaimable`` counts as free: space the run will release before writing (stale temporary
    folders a dry run reports but does not remove). Raises :class:`DiskFullError` with both
    numbers and the fix, before anything is written.
    """
    path = Path(path)
    free = free_bytes(path.parent)
    if free is None:
        logger.debug("the filesystem of %s reports no size; free space not checked", path)
        return
    free += reclaimable
    if free < needed:
        raise DiskFullError(
            f"not enough disk space for {path}: {what} needs {format_bytes(needed)} but "
            f"{_existing_ancestor(path.parent)} has {format_bytes(free)} free; free up "
            f"{format_bytes(needed - free)} there or choose an output folder on a disk with room"
        )


_SIBLING = re.compile(r"(?P<kind>tmp|old)-(?:(?P<pid>\d+)@(?P<host>.+)-)?[^-]+")


def clean_stale_siblings(path: str | os.PathLike, *, remove: bool = True) -> list[Path]:
    """Remove temporary folders of ``path`` left by interrupted runs whose process is gone.

    A run killed outright leaves ``.NAME.tmp-PID@HOST-*`` behind (possibly gigabytes of partial
    shards). Those of a dead process on this host are removed; those of a live process are
    left alone (it is still writing). Folders whose owner cannot be checked (another host, or no
    owner recorded) and ``.NAME.old-*`` folders (a previous output moved aside by an
    interrupted ``--overwrite``: the user's data, never deleted here) are named in a warning.

    With ``remove=False`` (a dry run) stale folders are only reported. Returns the stale folders
    removed (or, with ``remove=False``, those that would be).
    """
    path = Path(path).absolute()
    parent = path.parent
    if not parent.is_dir():
        return []
    prefix = f".{path.name}."
    removed: list[Path] = []
    host = _host_tag()
    for p in sorted(parent.iterdir()):
        if not p.name.startswith(prefix) or not p.is_dir() or p.is_symlink():
            continue
        m = _SIBLING.fullmatch(p.name[len(prefix) :])
        if m is None:
            continue
        pid = int(m["pid"]) if m["pid"] else None
        if m["kind"] == "old":
            if pid is None or m["host"] != host or not pid_alive(pid):
                logger.warning(
                    "%s holds a previous %s moved aside by an interrupted --overwrite; "
                    "rename it back to %s or delete it",
                    p,
                    path.name,
                    path,
                )
            continue
        if pid is None:
            logger.warning(
                "%s is a temporary folder of an interrupted run that did not record its process; "
                "delete it if no other run is writing %s",
                p,
                path,
            )
        elif m["host"] != host:
            logger.warning(
                "%s belongs to process %d on host %s, which cannot be checked from here; "
                "delete it if that run is over",
                p,
                pid,
                m["host"],
            )
        elif pid_alive(pid):
            logger.info("%s is being written by running process %d; left alone", p, pid)
        elif not remove:
            logger.warning("%s was left by an interrupted run (pid %d); a real run removes it", p, pid)
            removed.append(p)
        else:
            shutil.rmtree(p, ignore_errors=True)
            if p.exists():
                logger.warning("could not remove %s, left by a dead run (pid %d); delete it by hand", p, pid)
            else:
                logger.warning("removed %s, left by an interrupted run (pid %d, no longer running)", p, pid)
                removed.append(p)
    return removed


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is moved aside first and put back on failure."""
    if not path.exists():
        tmp.rename(path)
        return
    old = Path(tempfile.mkdtemp(prefix=_owner_prefix(path, "old"), dir=path.parent))
    old.rmdir()  # only the unique name is wanted: rename needs the target not to exist
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        # The new output is not in place: put the user's folder back before reporting the failure.
        try:
            old.rename(path)
        except OSError as e:
            logger.error("could not restore %s from %s (%s); rename it back by hand", path, old, e)
        raise
    # Only now, with the new output in place, is the old one expendable.
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        logger.warning("could not remove the replaced output %s; delete it by hand", old)


@contextlib.contextmanager
def atomic_output_dir(
    path: str | os.PathLike, overwrite: bool = False, *, needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; move it to ``path`` when the block succeeds.

    The temporary folder is on the same filesystem as ``path`` so the final move is a rename.
    With ``overwrite`` an existing folder at ``path`` is replaced only after the new one is
    complete: it is renamed aside, the new one renamed in, and the old one deleted; if the second
    rename fails the old one is renamed back, so the user's folder is never lost.

    Stale temporary folders of ``path`` left by killed runs are removed first
    (:func:`clean_stale_siblings`). With ``needed_bytes`` the free space is checked before the
    block runs. A full disk during the block (``ENOSPC``/``EDQUOT``) becomes a one-line
    :class:`DiskFullError` once the temporary folder is removed.
    """
    path = check_output_dir(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(path)
    if needed_bytes is not None:
        check_free_space(path, needed_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=_owner_prefix(path, "tmp"), dir=path.parent))
    # mkdtemp makes the folder private (0700); the finished output gets the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        # Re-check: another process may have created the output while we were writing.
        check_output_dir(path, overwrite)
        _move_into_place(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.errno in _NO_SPACE:
            free = free_bytes(path.parent)
            raise DiskFullError(
                f"the disk filled up while writing {path} ({e.strerror}"
                + (f"; {format_bytes(free)} free now" if free is not None else "")
                + (f", {format_bytes(needed_bytes)} needed" if needed_bytes else "")
                + "); the partial output was removed and nothing else changed: free up space "
                "or choose an output folder on a disk with room"
            ) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
