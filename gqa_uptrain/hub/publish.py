"""Publishing a converted or uptrained checkpoint on the Hugging Face Hub.

The flow of :func:`push_folder` (``gqa-export``, ``gqa-convert --push-to-hub``):

1. check the repo id and the options, and find the token (``HF_TOKEN`` or the ``hf auth login``
   cache; never a command-line argument, which would land in shell history);
2. check the folder is a checkpoint that loads: ``config.json`` through ``AutoConfig`` (with
   ``trust_remote_code`` only when it has an ``auto_map``, whose code files must be there), a
   tokenizer through ``AutoTokenizer``, a complete safetensors index (every shard present, every
   header valid: :class:`~gqa_uptrain.io.checkpoint.SafetensorsReader`), and no pickled files unless
   ``allow_pickle``;
3. build the model card (the folder's ``README.md`` with ``gqa``/family tags, ``library_name``,
   ``base_model``, ``datasets``, ``model-index`` from ``gqa-eval`` JSON, a usage section) and
   validate it as the Hub will parse it;
4. ``HfApi.create_repo(exist_ok=True)``, then ``HfApi.upload_folder``.

Why ``upload_folder`` for every size: in huggingface_hub 2.x it *is* the resumable uploader. With
``hf_xet`` (a dependency of huggingface_hub) it streams files to Xet storage, commits large
folders in several batches, and re-running the same call skips the files already committed and
deduplicates the chunks already sent. ``upload_large_folder`` is gone from huggingface_hub 2.x
(and never took ``revision``/``create_pr``/``commit_message``), so there is no separate
``--large`` path. Without ``hf_xet`` (or with a huggingface_hub older than the streamed pipeline)
the upload is one commit that a re-run starts over; we warn, and the error says so.

The token is passed to ``HfApi`` and nowhere else: it is never logged, never written to a file,
and scrubbed from any error message built from an exception.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard

from .._version import __version__
from ..errors import CheckpointError, ConfigError, GQAError
from ..io.checkpoint import PickleReader, SafetensorsReader
from ..io.locate import check_repo_id as check_repo_id  # re-exported: its home until 0.2
from ..io.outputs import atomic_write_text
from .card import (
    EvalEntry,
    apply_card_update,
    eval_results,
    evaluation_section,
    load_card,
    parse_eval_json,
    pick_eval_entry,
    usage_section,
    validate_card,
)

logger = logging.getLogger(__name__)

# Suffixes of files that hold pickles (torch.save, joblib, ...): loading them can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone is not a tokenizer).
TOKENIZER_CORE = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
RESUME_HINT = "re-run the same command to resume: files already on the Hub are skipped and uploaded data is deduplicated"
RETRY_HINT = (
    "re-run the same command to retry (this installation uploads in one commit, so it starts over: "
    "install hf_xet and huggingface_hub>=2 for resumable uploads)"
)


def resumable_uploads() -> bool:
    """Whether ``upload_folder`` here is the streamed pipeline whose re-run resumes (needs ``hf_xet``)."""
    return all(
        importlib.util.find_spec(m) is not None for m in ("hf_xet", "huggingface_hub._upload_pipeline")
    )


class HubError(GQAError):
    """Publishing failed: no token, the Hub refused the request, or the network failed."""


@dataclass(frozen=True)
class UploadFile:
    """One file that is (or would be) uploaded: its path in the repo and its size in bytes."""

    path: str
    size: int


@dataclass
class ExportPlan:
    """Everything an upload will do, computed without touching the network."""

    folder: Path
    repo_id: str
    files: list[UploadFile]
    card: ModelCard  # README.md as it will be written and uploaded
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class PushResult:
    """What :func:`push_folder` did (or, for a dry run, would do)."""

    plan: ExportPlan
    dry_run: bool
    url: str | None = None  # the repo (or branch, or pull request) page
    commit_url: str | None = None
    pr_url: str | None = None


# ----------------------------------------------------------------------------------------------
# Inputs: repo id, options, token
# ----------------------------------------------------------------------------------------------


def check_upload_options(revision: str | None, create_pr: bool) -> None:
    """Refuse combinations the Hub refuses, before any work is done."""
    if create_pr and revision not in (None, "main"):
        raise ConfigError(
            f"--create-pr opens a pull request against main and cannot be combined with --revision {revision}; "
            "drop one of them (to resume an interrupted PR upload, pass --revision refs/pr/N without --create-pr)"
        )


def hub_token() -> str:
    """The token from ``HF_TOKEN`` or the ``hf auth login`` cache; :class:`HubError` when there is none."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to publish")
    try:
        token = get_token()
    except Exception as e:  # OIDC exchange failures surface as assorted types; the message carries no token
        raise HubError(f"could not get a Hugging Face token: {str(e).splitlines()[0]}") from None
    if not token:
        raise HubError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` "
            "(a token is never taken on the command line, where it would land in shell history)"
        )
    return token


def check_push_target(repo_id: str, revision: str | None = None, create_pr: bool = False) -> None:
    """Fail fast before a long conversion or uptraining run whose result cannot be pushed.

    Checks the repo id, the options and that a token is available (not that it is valid: that
    needs the network). Call it before the work, and :func:`push_folder` after.
    """
    check_repo_id(repo_id)
    check_upload_options(revision, create_pr)
    hub_token()


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


# ----------------------------------------------------------------------------------------------
# The folder: what would be uploaded, and does it load
# ----------------------------------------------------------------------------------------------


def list_upload_files(folder: str | os.PathLike, exclude: list[str] | None = None) -> list[UploadFile]:
    """The files ``upload_folder`` would send, with sizes: the same walk and the same filter.

    huggingface_hub always skips ``.git`` and ``.cache/huggingface``; ``exclude`` adds glob
    patterns matched against paths relative to ``folder``.
    """
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    root = Path(folder).expanduser().resolve()
    paths = {p.relative_to(root).as_posix(): p for p in sorted(root.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(paths, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, *(exclude or [])])
    return [UploadFile(rel, paths[rel].stat().st_size) for rel in kept]


def _auto_map_modules(auto_map: dict[str, Any]) -> list[str]:
    """Local module names an ``auto_map`` points at (``"modeling_x.Cls"`` → ``modeling_x``)."""
    out = []
    for ref in auto_map.values():
        for r in ref if isinstance(ref, list) else [ref]:
            # "other/repo--module.Class" loads code from another repo: nothing to ship here.
            if isinstance(r, str) and "--" not in r and "." in r:
                out.append(r.rsplit(".", 1)[0])
    return list(dict.fromkeys(out))


def _first_line(e: BaseException) -> str:
    lines = [s for s in str(e).splitlines() if s.strip()]
    return lines[0].strip() if lines else type(e).__name__


def check_folder(
    folder: str | os.PathLike, files: list[UploadFile], allow_pickle: bool = False
) -> dict[str, Any]:
    """Refuse a folder that would not load from the Hub; return its ``config.json``.

    ``files`` are the files that will be uploaded (:func:`list_upload_files`): a shard that exists
    locally but is excluded from the upload counts as missing.
    """
    folder = Path(folder)
    names = {f.path for f in files}
    if "config.json" not in names:
        raise CheckpointError(
            f"{folder} has no config.json; export a folder written by gqa-convert or gqa-uptrain"
        )
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{folder}/config.json is not valid JSON ({_first_line(e)}); fix or regenerate it"
        ) from None

    if not isinstance(config, dict):
        raise CheckpointError(f"{folder}/config.json is not a JSON object; fix or regenerate it")

    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{folder}/{pickles[0]} is a pickle (loading it can run code); delete it, leave it out with "
            f"--exclude '{pickles[0]}', or pass --allow-pickle"
        )

    # Code shipped through auto_map must be uploaded with the checkpoint, or it will not load.
    auto_map = config.get("auto_map") or {}
    if not isinstance(auto_map, dict):
        raise CheckpointError(
            f"{folder}/config.json's auto_map is not an object; regenerate it with gqa-convert"
        )
    remote = bool(auto_map)
    for module in _auto_map_modules(auto_map):
        if f"{module.replace('.', '/')}.py" not in names:
            raise CheckpointError(
                f"config.json's auto_map needs {module}.py, which is not in {folder} (or is excluded); "
                "re-run gqa-convert, or copy the file from gqa_uptrain/modeling"
            )

    from transformers import AutoConfig, AutoTokenizer

    from ..modeling import register_auto_classes

    # As every entry point of ours that loads a checkpoint: our GQA classes are known to the Auto
    # classes. A folder with an auto_map is still checked with its own shipped code (remote code
    # wins over a registered class when trust_remote_code is set), which is what downloaders run.
    register_auto_classes()
    # transformers raises many exception types for a bad config or tokenizer; any of them means the
    # folder would not load for the people downloading it, which is what we report.
    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=remote)
    except Exception as e:
        raise CheckpointError(
            f"{folder}/config.json does not load with transformers: {_first_line(e)}"
        ) from None

    if not any(n in names for n in TOKENIZER_CORE):
        raise CheckpointError(
            f"{folder} has no tokenizer ({', '.join(TOKENIZER_CORE[:3])}, ...); copy the original model's "
            "tokenizer files into it (tokenizer.save_pretrained)"
        )
    try:
        AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    except Exception as e:
        raise CheckpointError(f"the tokenizer in {folder} does not load: {_first_line(e)}") from None

    _check_weights(folder, names, allow_pickle)
    return config


def _check_weights(folder: Path, names: set[str], allow_pickle: bool) -> None:
    """Every shard named by the index is uploaded and every header is valid (no tensor data read)."""
    index = "model.safetensors.index.json"
    if index in names or "model.safetensors" in names:
        if index in names:
            try:
                shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise CheckpointError(
                    f"{folder}/{index} is not a valid safetensors index; regenerate it"
                ) from None
            absent = sorted(shards - names)
            if absent:
                raise CheckpointError(
                    f"shard {absent[0]} named in {index} is not in the upload (missing from {folder} or "
                    "excluded); the checkpoint is incomplete"
                )
        reader = SafetensorsReader(folder)  # validates the index, the shards and every header
        n = len(reader.infos())
        reader.close()
    elif allow_pickle and ("pytorch_model.bin" in names or "pytorch_model.bin.index.json" in names):
        reader_p = PickleReader(folder)  # weights_only=True, one shard at a time
        n = len(reader_p.infos())
        reader_p.close()
    else:
        raise CheckpointError(
            f"{folder} has no weights to publish (model.safetensors or model.safetensors.index.json)"
            + ("" if allow_pickle else "; pickled pytorch_model*.bin need --allow-pickle")
        )
    if n == 0:
        raise CheckpointError(f"the weights in {folder} hold no tensors; the checkpoint is empty")


# ----------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------


def build_card(
    folder: str | os.PathLike,
    repo_id: str,
    config: dict[str, Any],
    *,
    eval_entries: list[EvalEntry] | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
    command: str | None = None,
) -> ModelCard:
    """The folder's card updated for publication (nothing is written).

    Adds the ``gqa`` and family tags, ``library_name: transformers``, ``base_model`` (when given),
    ``datasets``, the ``model-index`` of this model's ``gqa-eval`` results with an evaluation
    section, and a usage section naming ``repo_id`` (with ``trust_remote_code`` when needed).
    Sections the converter and uptraining wrote are kept.
    """
    folder = Path(folder)
    name = repo_id.split("/")[-1]
    # No card yet (a folder not written by gqa-convert): start from a title, not the blank template.
    card = load_card(folder) if (folder / "README.md").is_file() else ModelCard(f"# {name}\n")
    family = str(config.get("model_type") or "").removesuffix("_gqa")
    metadata: dict[str, Any] = {"library_name": "transformers"}
    if base_model:
        metadata["base_model"] = check_repo_id(base_model, "--base-model")
        metadata["base_model_relation"] = "finetune"
    if eval_entries:
        this = pick_eval_entry(eval_entries, folder, repo_id)
        metadata["model_name"] = name
        metadata["eval_results"] = eval_results(this)
        card = apply_card_update(card, "evaluation", evaluation_section(eval_entries, this))
    return apply_card_update(
        card,
        "usage",
        usage_section(repo_id, config, command),
        datasets=datasets,
        tags=["gqa", family] if family else ["gqa"],
        metadata=metadata,
    )


def read_eval_json(path: str | os.PathLike) -> list[EvalEntry]:
    """Parse a ``gqa-eval --json`` file (see :func:`gqa_uptrain.hub.card.parse_eval_json`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"--eval-json {path} does not exist; pass the file `gqa-eval --json` wrote"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--eval-json {path} is not valid JSON ({_first_line(e)})") from None
    return parse_eval_json(data, str(path))


# ----------------------------------------------------------------------------------------------
# Plan and upload
# ----------------------------------------------------------------------------------------------


def plan_export(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    eval_json: str | os.PathLike | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
    exclude: list[str] | None = None,
    allow_pickle: bool = False,
    command: str | None = None,
) -> ExportPlan:
    """Check ``folder`` and build its card: everything short of the network."""
    check_repo_id(repo_id)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder; pass the checkpoint folder gqa-convert or gqa-uptrain wrote"
        )
    entries = read_eval_json(eval_json) if eval_json is not None else None
    files = list_upload_files(root, exclude)
    if not files:
        raise CheckpointError(f"{folder} holds no files to upload" + (" (all excluded)" if exclude else ""))
    config = check_folder(root, files, allow_pickle)
    card = build_card(
        root, repo_id, config, eval_entries=entries, datasets=datasets, base_model=base_model, command=command
    )
    warnings = validate_card(card)
    # README.md is uploaded as the new card, whatever is on disk now.
    size = len(str(card).encode("utf-8"))
    files = sorted(
        [f for f in files if f.path != "README.md"] + [UploadFile("README.md", size)], key=lambda f: f.path
    )
    return ExportPlan(root, repo_id, files, card, config, warnings, list(exclude or []))


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    eval_json: str | os.PathLike | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
    exclude: list[str] | None = None,
    allow_pickle: bool = False,
    dry_run: bool = False,
    command: str | None = None,
) -> PushResult:
    """Check ``folder``, write its model card and upload it to the Hub model repo ``repo_id``.

    Args:
        folder: a checkpoint folder written by ``gqa-convert`` or ``gqa-uptrain``.
        repo_id: ``owner/name``; the repo is created if needed (``exist_ok``).
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to upload to (created from main if missing), or ``refs/pr/N``.
        create_pr: open a pull request instead of committing to the branch.
        commit_message: the commit's title.
        eval_json: ``gqa-eval --json`` output whose perplexity goes into ``model-index``.
        datasets: uptraining datasets to list in the card (added to those already there).
        base_model: the original checkpoint's Hub id, when the card does not name it.
        exclude: glob patterns of files not to upload (e.g. ``"checkpoints/*"``).
        allow_pickle: accept pickled files (``*.bin``, ``*.pt``, ...) in the upload.
        dry_run: check and plan only: no network, nothing written.
        command: the command line, recorded in the card's usage section.

    Returns:
        A :class:`PushResult`; its ``plan`` lists the files with sizes and holds the card.

    Raises:
        ConfigError: invalid repo id or options. CheckpointError: the folder would not load.
        HubError: no token, or the Hub or the network failed (re-running resumes).
    """
    check_repo_id(repo_id)
    check_upload_options(revision, create_pr)
    token = None if dry_run else hub_token()
    plan = plan_export(
        folder,
        repo_id,
        eval_json=eval_json,
        datasets=datasets,
        base_model=base_model,
        exclude=exclude,
        allow_pickle=allow_pickle,
        command=command,
    )
    if dry_run:
        from huggingface_hub import get_token

        if not get_token():
            plan.warnings.append(
                "no Hugging Face token found: set HF_TOKEN or run `hf auth login` before uploading"
            )
    for w in plan.warnings:
        logger.warning(w)
    if dry_run:
        return PushResult(plan, dry_run=True)
    assert token is not None
    atomic_write_text(plan.folder / "README.md", str(plan.card))
    return _upload(plan, token, private, revision, create_pr, commit_message)


def _upload(
    plan: ExportPlan,
    token: str,
    private: bool,
    revision: str | None,
    create_pr: bool,
    commit_message: str | None,
) -> PushResult:
    if not resumable_uploads():
        logger.warning("uploads are not resumable here: %s", RETRY_HINT)
    api = HfApi(token=token, library_name="gqa-uptrain", library_version=__version__)
    repo_id = plan.repo_id
    try:
        repo_url = api.create_repo(
            repo_id, repo_type="model", private=True if private else None, exist_ok=True
        )
        if revision and revision != "main" and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        logger.info("uploading %d files to %s", len(plan.files), repo_id)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=plan.folder,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload {repo_id.split('/')[-1]} with gqa-export",
            ignore_patterns=plan.exclude or None,
        )
    except KeyboardInterrupt:
        logger.warning("upload interrupted; %s", RESUME_HINT if resumable_uploads() else RETRY_HINT)
        raise
    except (OSError, _HTTP_ERROR) as e:  # HfHubHTTPError, connection and xet errors are OSErrors
        raise _upload_error(e, repo_id, token, create_pr) from None
    url = str(repo_url).rstrip("/")
    if revision and revision.startswith("refs/pr/"):
        url += f"/discussions/{revision.removeprefix('refs/pr/')}"
    elif revision and revision != "main":
        url += f"/tree/{revision}"
    pr_url = getattr(info, "pr_url", None)
    return PushResult(
        plan, False, url=pr_url or url, commit_url=getattr(info, "commit_url", None), pr_url=pr_url
    )


def _http_error_base() -> type[BaseException]:
    # huggingface_hub's HTTP errors derive from its HTTP client's HTTPError (httpx in 1.x, httpx2 in
    # 2.x); take the class from huggingface_hub itself rather than import either client.
    import huggingface_hub.errors as hub_errors

    base = getattr(hub_errors, "HTTPError", None)
    return base if isinstance(base, type) and issubclass(base, BaseException) else OSError


_HTTP_ERROR = _http_error_base()


def _upload_error(e: BaseException, repo_id: str, token: str, create_pr: bool) -> HubError:
    """A one-line :class:`HubError` for a failed Hub call, with the token scrubbed."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    msg = _scrub(_first_line(e), token)
    resume = RESUME_HINT if resumable_uploads() else RETRY_HINT
    if create_pr:
        resume += " (a re-run with --create-pr opens a new pull request: to resume the open one, pass --revision refs/pr/N)"
    if isinstance(e, HfHubHTTPError):
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if status == 401:
            return HubError(
                "the Hub rejected the token (401 Unauthorized); set a valid HF_TOKEN or run `hf auth login`"
            )
        if status == 403:
            return HubError(
                f"the token may not write to {repo_id} (403 Forbidden); use a write token for that namespace"
            )
        if isinstance(e, RevisionNotFoundError):
            return HubError(f"revision not found in {repo_id} ({msg}); check --revision")
        if isinstance(e, RepositoryNotFoundError) or status == 404:
            return HubError(
                f"{repo_id} was not found or is not writable with this token; check the owner name"
            )
        if status is not None and 400 <= status < 500 and status not in (408, 429):
            return HubError(f"the Hub refused the upload to {repo_id} ({status}: {msg})")
        return HubError(f"upload to {repo_id} failed ({status}: {msg}); {resume}")
    return HubError(f"network failure while uploading to {repo_id} ({type(e).__name__}: {msg}); {resume}")
