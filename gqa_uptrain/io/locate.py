"""Is this a local checkpoint folder or a Hub repo id? The one check every entry point uses.

Light on purpose (the standard library, plus ``huggingface_hub`` inside :func:`check_repo_id`
only): recipes, model cards and the command line parse their arguments with it before anything
heavy is imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError, ConfigError


def looks_like_repo_id(s: str) -> bool:
    """``owner/name`` with no path-like parts: what the Hub accepts as a repo id."""
    parts = s.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not s.startswith((".", "/", "~"))
        and all(p not in (".", "..") for p in parts)
    )


# A legacy canonical Hub model (gpt2, bert-base-uncased, t5-small, distilgpt2): one name, no owner.
# The Hub's name characters; the first is alphanumeric, so ".", "..", "~x" and "-flag" are not names.
_ONE_WORD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def looks_like_model_id(s: str) -> bool:
    """What ``from_pretrained`` can fetch from the Hub: ``owner/name``, or a legacy one-word name.

    Wider than :func:`looks_like_repo_id` because loading (gqa-eval, the uptraining's ``model.path``
    and ``distill.teacher``) must still take ``gpt2`` or ``t5-small``, canonical repos that predate
    owners. Anything with a path part (``./x``, ``/abs``, ``~/x``, ``a/b/c``) is not an id.
    """
    return looks_like_repo_id(s) or _ONE_WORD_NAME.fullmatch(s) is not None


def is_hub_id(path: str | os.PathLike) -> bool:
    """True when ``path`` names a Hub repo rather than something on this machine.

    A local path wins: ``owner/name`` that exists here is the local folder. Strict ``owner/name``
    (as the conversion's sources and the cards' metadata are): :func:`check_model_path` is the
    check that also takes one-word model names.
    """
    return looks_like_repo_id(str(path)) and not Path(path).expanduser().exists()


def check_model_path(path: str | os.PathLike, what: str = "model") -> None:
    """Refuse, with a one-line :class:`CheckpointError`, what is neither a checkpoint folder nor a Hub id.

    A folder must hold a ``config.json``; anything else must look like a Hub model id
    (:func:`looks_like_model_id`: ``owner/name``, or a legacy one-word name such as ``gpt2``), whose
    existence is only known once it is fetched. A local path always wins over an id of the same name. ``what`` names the argument in the message
    (``"model"``, ``"recipe key model.path"``, ...).
    """
    text = str(path)
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(
                f"{what} {text} is not a checkpoint folder (no config.json); "
                "give the folder gqa-convert or gqa-uptrain wrote, or a Hub id (owner/name)"
            )
    elif p.exists():
        raise CheckpointError(
            f"{what} {text} is a file; give the checkpoint's folder or a Hub id (owner/name)"
        )
    elif not looks_like_model_id(text):
        raise CheckpointError(
            f"{what} {text} does not exist; give a checkpoint folder or a Hub id (owner/name)"
        )


def check_repo_id(repo_id: str, what: str = "repo id") -> str:
    """Raise :class:`ConfigError` unless ``repo_id`` is a valid ``owner/name`` Hub model id; return it.

    Stricter than :func:`looks_like_repo_id`: the Hub's own rules (characters, length), for a repo
    we are about to create or push to.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise ConfigError(
            f"{what} {repo_id!r} must be OWNER/NAME (your user or organisation, then the model name)"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).splitlines()[0].rstrip(".")
        raise ConfigError(f"{what} {repo_id!r} is not a valid Hub repo id: {reason}") from None
    return repo_id
