"""The uptraining loop: continue training a converted checkpoint so it recovers from conversion.

This is accelerate's minimal loop, kept minimal on purpose so the same code runs in one CPU
process, under ``torchrun``, and under ``accelerate launch`` with DDP, FSDP or DeepSpeed:

    Accelerator(...) -> prepare(model, optimizer, loaders, scheduler)
    for step: for micro in grad_accum: with accumulate(model): loss -> backward
              clip_grad_norm_ -> optimizer.step -> scheduler.step -> zero_grad
    save_state / load_state (+ skip_first_batches) for exact resume
    get_state_dict + unwrap_model -> save_pretrained for the final model

Exact resume: the data order is a function of (seed, epoch) only (accelerate's seedable sampler),
a checkpoint is taken only at an optimizer-step boundary and records (epoch, batch within epoch),
and ``load_state`` restores model, optimizer, scheduler and RNG states. A run killed at any
point and resumed therefore replays exactly the batches the uninterrupted run would have seen.

Several processes: every set-up phase (output folder, data, model, resume) and every checkpoint
save ends with the processes agreeing on its outcome (:func:`_all_ranks`), so an error on any one of
them stops all of them with that error instead of leaving the others in a collective. Checkpoint
folders are created and rotated once per filesystem (``checkpoint.save_on_each_node``). The final
model is saved in the checkpoint's own dtype (:func:`checkpoint_dtype`), whatever the training
precision.

With ``output.push_to_hub`` the repo id and the token are checked before anything else, and
``model/`` is uploaded by the main process once it is saved (:func:`push_model`).

Run folder (``output.dir``)::

    recipe.yaml       the resolved recipe          model/        final Hugging Face checkpoint
    checkpoints/      step_00000100/ ... (last K)   logs/         TensorBoard (or other trackers)
    cache/            datasets + tokenized blocks  results.json  evaluation before / after
    .lock             present while a run uses the folder
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import (
    DataLoaderConfiguration,
    DeepSpeedPlugin,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.text import PackedData, prepare_data
from ..errors import CheckpointError, ConfigError, GQAError, OutputExistsError
from ..io.outputs import atomic_output_dir, atomic_write_text
from ..io.portability import make_folder_portable
from .config import OptimConfig, UptrainConfig, dump_recipe

logger = logging.getLogger(__name__)

_STATE_FILE = "trainer_state.json"
# Parameter-name parts that identify attention modules, and K/V projections inside them, across
# the families gqa-convert produces (Llama-style, GPT-2, NeoX, Falcon, OPT, BERT, T5).
_ATTN_PARTS = {
    "self_attn",
    "attn",
    "attention",
    "self_attention",
    "SelfAttention",
    "EncDecAttention",
    "crossattention",
    "cross_attn",
    "encoder_attn",
}
_KV_PARTS = {"k_proj", "v_proj", "key", "value", "k", "v", "k_norm", "kv_proj"}
_FUSED_QKV_PARTS = {"qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack"}


@dataclass
class UptrainResult:
    """What a finished (or interrupted) run reports."""

    output_dir: Path
    model_dir: Path | None
    steps: int
    total_steps: int
    tokens: int
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    interrupted: bool = False
    last_checkpoint: Path | None = None
    tokens_per_second: float = 0.0
    seconds: float = 0.0
    trainable_parameters: int = 0
    hub_url: str | None = None  # where output.push_to_hub uploaded the model (main process only)
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Processes: one outcome for all
# --------------------------------------------------------------------------------------------------


class ProcessError(GQAError):
    """An error (not a :class:`GQAError`) on one process of a multi-process run, raised on every
    process so that none is left waiting in a collective for the one that failed.

    ``rank`` is the process that failed first, ``phase`` what the run was doing, ``error_type`` the
    qualified name of the original exception (chained as ``__cause__`` on the failing process).
    """

    def __init__(self, message: str, *, rank: int, phase: str, error_type: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.phase = phase
        self.error_type = error_type

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields: rebuild from them, not from ``args`` (Exception's default).
        return (_rebuild_process_error, (str(self), self.rank, self.phase, self.error_type))


def _rebuild_process_error(message: str, rank: int, phase: str, error_type: str) -> ProcessError:
    return ProcessError(message, rank=rank, phase=phase, error_type=error_type)


@dataclass
class _Outcome:
    """What one process reports at the end of a phase: ok (with a small shared value) or its error."""

    rank: int
    share: Any = None
    error: BaseException | None = None  # the exception itself, when it survives pickling
    error_type: str = ""  # qualified type name; set exactly when the phase failed here
    message: str = ""


@dataclass
class _Phase:
    """Handle of :func:`_all_ranks`: set ``share`` inside the block; read ``shared`` after it."""

    name: str
    share: Any = None
    shared: list[Any] = field(default_factory=list)


def _one_line(e: BaseException, limit: int = 500) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _all_ranks(accelerator: Accelerator, name: str) -> Iterator[_Phase]:
    """Run a set-up phase on every process, then agree on its outcome before anyone goes on.

    Each process reports ok or its exception to all the others (``all_gather_object``). If any
    failed, every process raises: a failing process its own error, the others the first failure
    (the same :class:`GQAError` subclass and message, or a :class:`ProcessError` naming the rank and
    the original type). Without this, a process that fails alone leaves the others blocked in the
    next collective (a barrier, a broadcast, DDP's first all-reduce) until the process group times
    out, or forever. In a single process this is a plain block.

    The block itself must not contain collectives: a process that fails before one would leave the
    others waiting in it. Ctrl-C (``KeyboardInterrupt``) is not exchanged: the launcher delivers it
    to every process.
    """
    phase = _Phase(name)
    world = accelerator.num_processes
    if world == 1:
        yield phase
        phase.shared = [phase.share]
        return
    rank = accelerator.process_index
    failure: Exception | None = None
    try:
        yield phase
    except Exception as e:
        failure = e
    mine = _Outcome(rank=rank, share=None if failure else phase.share)
    if failure is not None:
        mine.error_type = f"{type(failure).__module__}.{type(failure).__qualname__}"
        mine.message = _one_line(failure)
        with contextlib.suppress(Exception):
            # Sent as the object itself so that it arrives typed; one that does not survive
            # pickling (local classes, unpicklable attributes) arrives as its type name and text.
            pickle.loads(pickle.dumps(failure))
            mine.error = failure
    import torch.distributed as dist

    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, mine)
    failed = [o for o in outcomes if o.error_type]
    if not failed:
        phase.shared = [o.share for o in outcomes]
        return
    if failure is not None:
        if isinstance(failure, GQAError):
            raise failure
        # One line on every process; the traceback is for --verbose.
        logger.debug("process %d failed while %s", rank, name, exc_info=failure)
        raise ProcessError(
            f"process {rank} of {world} failed while {name}: {type(failure).__name__}: {mine.message} "
            "(every process stopped; -v shows the traceback)",
            rank=rank, phase=name, error_type=mine.error_type,
        ) from failure  # fmt: skip
    first = failed[0]
    if isinstance(first.error, GQAError):
        raise first.error from None
    short_type = first.error_type.rsplit(".", 1)[-1]
    raise ProcessError(
        f"process {first.rank} of {world} failed while {name}: {short_type}: {first.message} "
        f"(every process stopped; the log of process {first.rank} has the details)",
        rank=first.rank, phase=name, error_type=first.error_type,
    ) from None  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, per_sequence: bool = False) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1.

    logits [B, T, V], input_ids [B, T] -> scalar mean over B*(T-1) tokens, or [B] per sequence.
    Computed in float32 whatever the autocast dtype, as HF models do.
    """
    B, T, V = logits.shape
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy the largest tensor of the
    # step ([B, T, V]); the last position gets the ignore label and contributes 0.
    labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # [B, T]
    nll = F.cross_entropy(logits.float().view(B * T, V), labels.reshape(-1), reduction="none").view(B, T)
    per_seq = nll.sum(dim=1) / (T - 1)  # [B]
    return per_seq if per_sequence else per_seq.mean()


def kl_to_teacher(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over [B, T]; scaled by T² (Hinton et al.) so its
    gradient magnitude does not shrink with the temperature."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, T, V]
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [B, T, V]
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


# --------------------------------------------------------------------------------------------------
# Run folder: lock, checkpoints
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the duration of a run; refuse a folder another live run holds.

    A lock left by a dead process on this host (a crash, ``kill -9``) is taken over with a
    warning; one from another host cannot be checked and must be removed by hand.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                logger.warning("removing stale lock of dead run (pid %s) in %s", pid, out)
                lock.unlink(missing_ok=True)
                continue
            raise OutputExistsError(
                f"output folder {out} is in use by another run (pid {pid} on {host}); wait for it, "
                f"choose another output.dir, or delete {lock} if that run is dead"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (with a trainer state), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / _STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run in ``output_dir``, or ``None``."""
    found = _checkpoints(Path(output_dir) / "checkpoints")
    return found[-1] if found else None


def _writes_checkpoints(accelerator: Accelerator, save_on_each_node: bool) -> bool:
    """Whether this process creates, renames and rotates checkpoint folders.

    One process per filesystem: the run's main process when all nodes share one (the default: two
    nodes renaming and deleting the same folders race), each node's first process when every node
    has its own disk (``checkpoint.save_on_each_node``, accelerate's ``save_on_each_node``).
    """
    return accelerator.is_local_main_process if save_on_each_node else accelerator.is_main_process


def _save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    state: dict[str, Any],
    keep_last: int,
    save_on_each_node: bool = False,
) -> Path:
    """``save_state`` into a temporary folder renamed into place once every process is done, so a
    kill during the save never leaves a checkpoint that looks complete; then drop the oldest.

    Folder operations happen once per filesystem (:func:`_writes_checkpoints`); an error in them or
    in the save stops every process with that error (:func:`_all_ranks`).
    """
    from accelerate.utils import DistributedType

    step = state["step"]
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    writer = _writes_checkpoints(accelerator, save_on_each_node)
    with _all_ranks(accelerator, f"creating checkpoint folder {tmp}"):
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # Sharded saves are collectives: they cannot run inside _all_ranks (see its docstring).
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
    else:
        with _all_ranks(accelerator, f"saving checkpoint {tmp}"):
            accelerator.save_state(str(tmp))
    with _all_ranks(accelerator, f"publishing checkpoint {final}"):
        if writer:
            (tmp / _STATE_FILE).write_text(json.dumps(state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in _checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


# --------------------------------------------------------------------------------------------------
# Model, parameters, optimizer, schedule
# --------------------------------------------------------------------------------------------------


def _check_model_path(path: str, what: str) -> None:
    from ..io.checkpoint import looks_like_repo_id

    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(
                f"{what} {path} is not a checkpoint folder (no config.json); give the folder gqa-convert wrote or a Hub id"
            )
    elif p.exists() or not looks_like_repo_id(path):
        raise CheckpointError(f"{what} {path} not found; give a checkpoint folder or a Hub id (owner/name)")


def _trust_remote_code(path: str, setting: bool | None) -> bool:
    """Explicit setting, else yes exactly when the local folder's config.json has an ``auto_map``
    (the non-native families gqa-convert ships modelling code for)."""
    if setting is not None:
        return setting
    cfg = Path(path).expanduser() / "config.json"
    if cfg.is_file():
        with contextlib.suppress(OSError, ValueError):
            return "auto_map" in json.loads(cfg.read_text())
    return False


def _load_model(
    path: str, revision: str | None, trust: bool | None, dtype: torch.dtype, attn: str | None, what: str
):
    from transformers import AutoModelForCausalLM

    _check_model_path(path, what)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "revision": revision,
        "trust_remote_code": _trust_remote_code(path, trust),
    }
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"could not load {what} {path}: {reason}") from e


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _as_dtype(value: Any) -> torch.dtype | None:
    """A config's dtype entry (``"bfloat16"``, ``"torch.float16"``) as a floating torch dtype."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def _header_dtype(weights: Path) -> torch.dtype | None:
    """The dtype of the first floating tensor in a safetensors file's header (no tensor is read)."""
    with open(weights, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # header length, then the JSON header
        header = json.loads(f.read(n))
    for name, info in header.items():
        if name != "__metadata__" and info.get("dtype") in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[info["dtype"]]
    return None


def checkpoint_dtype(path: str, revision: str | None = None) -> torch.dtype:
    """The dtype a checkpoint is stored in, read from its files before the model is loaded.

    ``config.json``'s ``dtype`` (or the legacy ``torch_dtype``), else the first floating tensor in
    the safetensors header, else float32. It has to be read first: loading in float32 (the master
    weights) rewrites ``model.config.dtype`` to float32.
    """
    from transformers.utils import cached_file

    def fetch(name: str) -> Path | None:
        with contextlib.suppress(OSError, ValueError):
            found = cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False)
            return Path(found) if found else None
        return None

    with contextlib.suppress(OSError, ValueError, TypeError):
        cfg_file = fetch("config.json")
        if cfg_file is not None:
            raw = json.loads(cfg_file.read_text())
            found = _as_dtype(raw.get("dtype")) or _as_dtype(raw.get("torch_dtype"))
            if found is not None:
                return found
        weights = fetch("model.safetensors")
        if weights is None and (index := fetch("model.safetensors.index.json")) is not None:
            first_shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
            weights = fetch(first_shard)
        if weights is not None and (found := _header_dtype(weights)) is not None:
            return found
    logger.warning("could not read the dtype of %s; the uptrained model is saved in float32", path)
    return torch.float32


def select_trainable(model: torch.nn.Module, mode: str) -> list[str]:
    """Set ``requires_grad`` for freeze ``mode`` and return the names of trainable parameters.

    ``attention``: parameters inside attention modules; ``kv``: only K/V projections (and K norms).
    A fused QKV parameter cannot be split for autograd, so under ``kv`` it trains whole.
    """
    if mode == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    chosen: list[str] = []
    fused: list[str] = []
    for name, p in model.named_parameters():
        parts = set(name.split("."))
        in_attn = bool(parts & _ATTN_PARTS)
        keep = in_attn if mode == "attention" else in_attn and bool(parts & (_KV_PARTS | _FUSED_QKV_PARTS))
        p.requires_grad_(keep)
        if keep:
            chosen.append(name)
            if mode == "kv" and parts & _FUSED_QKV_PARTS:
                fused.append(name)
    if not chosen:
        sample = ", ".join(n for n, _ in list(model.named_parameters())[:6])
        raise ConfigError(
            f"recipe key freeze.mode: {mode!r} matches no parameter of this model (names like {sample}); use freeze.mode=none"
        )
    if fused:
        logger.warning(
            "freeze.mode=kv: %d fused QKV tensor(s) (e.g. %s) train whole, query rows included",
            len(fused),
            fused[0],
        )
    return chosen


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (ndim >= 2), not biases and norm scales, as GPT-style recipes do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warmup, then cosine or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by `accelerate launch` configs
    if env:
        return env
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _flat_hparams(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe -> flat scalars (what trackers such as TensorBoard's hparams accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        elif isinstance(v, bool | int | float | str):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Mean next-token loss and perplexity over the held-out blocks (all blocks have equal length,
    so the mean of per-block means is the token mean)."""
    was_training = model.training
    model.eval()
    losses = []
    for batch in loader:
        ids = batch["input_ids"]  # [B, T]
        with accelerator.autocast():
            logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
        losses.append(accelerator.gather_for_metrics(causal_lm_loss(logits, ids, per_sequence=True)))
    model.train(was_training)
    loss = torch.cat(losses).mean().item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0))}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


class _StopFlag:
    """First Ctrl-C / SIGTERM asks the loop to stop at the next step boundary and checkpoint;
    a second Ctrl-C aborts at once. Installed only in the main thread (signal's rule)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _refuse_sharding_on_cpu() -> None:
    """Refuse an ``accelerate launch`` FSDP or DeepSpeed config on a machine without a GPU.

    accelerate (1.x) turns FSDP and DeepSpeed on only for GPU-like devices: on CPU its state is
    ``MULTI_CPU`` and the plugin is dropped, so the run would silently be plain data parallel with
    the whole model on every process (FSDP v1's ``sync_module_states`` even fails to construct).
    """
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "false").lower() == "true":
            raise ConfigError(
                f"the accelerate config asks for {name}, which accelerate runs only on GPUs: on CPU it would be "
                "plain data parallel with the whole model on every process; launch with "
                "recipes/accelerate/multi-cpu.yaml (or torchrun) instead"
            )


def align_deepspeed_plugin(plugin: DeepSpeedPlugin, optim: OptimConfig) -> None:
    """Make the DeepSpeed config's accumulation and clipping the recipe's, or refuse a mismatch.

    Under DeepSpeed the engine accumulates and clips by its own config, and accelerate lets the
    DeepSpeed values win over the training script's with only a warning: a config that says 32
    micro-batches per step under a recipe that says 1 would make every "step" of the loop (the
    budget, the schedule, the checkpoints) a 32nd of an optimizer step. So ``auto`` or a missing
    value takes the recipe's ``optim.grad_accum`` / ``optim.grad_clip``, and a different number is
    a :class:`ConfigError` before anything is loaded. Works on the parsed plugin (``DeepSpeedPlugin()``
    reads what ``accelerate launch`` put in the environment); DeepSpeed itself is not needed.
    """
    ds = plugin.deepspeed_config  # the dict the engine is built from
    for key, attr, recipe_key, want in (
        ("gradient_accumulation_steps", "gradient_accumulation_steps", "optim.grad_accum", optim.grad_accum),
        ("gradient_clipping", "gradient_clipping", "optim.grad_clip", optim.grad_clip),
    ):
        have = ds.get(key)
        if have is None or have == "auto":
            ds[key] = want
            setattr(plugin, attr, want)
            continue
        try:
            same = float(have) == float(want)
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ConfigError(
                f"the DeepSpeed config sets {key}: {have} but the recipe has {recipe_key}: {want}; "
                f"set {key}: auto in the accelerate config (recipes/accelerate/deepspeed-zero3.yaml does) "
                f"so the recipe decides, or set {recipe_key}={have}"
            )


def _prepare_output(cfg: UptrainConfig, out: Path) -> Path | None:
    """On the main process: refuse, clear, or pick the checkpoint to resume from."""
    ckpt = latest_checkpoint(out)
    has_run = ckpt is not None or (out / "model").exists() or (out / "recipe.yaml").exists()
    if cfg.output.resume:
        if ckpt is None:
            logger.warning("output.resume: no checkpoint in %s yet; starting from the beginning", out)
        return ckpt
    if has_run:
        if not cfg.output.overwrite:
            raise OutputExistsError(
                f"output folder {out} holds a previous run; pass --resume to continue it or --overwrite to start over"
            )
        for sub in ("checkpoints", "model", "logs"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in ("recipe.yaml", "results.json"):
            (out / f).unlink(missing_ok=True)
    return None


def uptrain(config: UptrainConfig) -> UptrainResult:
    """Uptrain ``config.model.path`` as the recipe says; see the module docstring for the layout.

    Returns an :class:`UptrainResult`; raises :class:`GQAError` for user errors (bad model folder,
    missing text column, folder in use, non-finite loss with the step named). In a multi-process
    run an error on any process during set-up or a checkpoint save stops every process with that
    error (a :class:`ProcessError` for errors that are not a :class:`GQAError`).
    """
    cfg = config
    out = Path(cfg.output.dir).expanduser().absolute()
    mp = _resolve_mixed_precision(cfg.optim.mixed_precision)
    trackers = [t for t in cfg.output.log_with if t and t != "none"]
    # accelerate only goes multi-process on CPU (gloo) when told `cpu=True`: do so under torchrun /
    # accelerate launch on a machine without a GPU, so `torchrun --nproc_per_node N` just works.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
    on_cpu = launched and not torch.cuda.is_available()
    if on_cpu:
        _refuse_sharding_on_cpu()
    deepspeed_plugin = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # Built here (accelerate would build the same from the environment) so that its
        # accumulation and clipping are the recipe's before the engine exists.
        deepspeed_plugin = DeepSpeedPlugin()
        align_deepspeed_plugin(deepspeed_plugin, cfg.optim)
    try:
        accelerator = Accelerator(
            cpu=on_cpu,
            mixed_precision=mp,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.optim.grad_accum, sync_with_dataloader=False
            ),
            # The schedule is defined in optimizer steps; we step it once per optimizer step ourselves.
            step_scheduler_with_optimizer=False,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            deepspeed_plugin=deepspeed_plugin,
            log_with=trackers or None,
            project_config=ProjectConfiguration(
                project_dir=str(out),
                logging_dir=str(out / "logs"),
                save_on_each_node=cfg.checkpoint.save_on_each_node,
            ),
        )
    except ImportError as e:  # e.g. a DeepSpeed config without deepspeed installed
        raise ConfigError(f"the accelerate config needs a package that is missing: {_one_line(e)}") from None
    main = accelerator.is_main_process

    # Output checks happen on the main process; every process gets its outcome (no hang).
    lock = contextlib.ExitStack()
    try:
        with _all_ranks(accelerator, f"preparing the output folder {out}") as phase:
            if main:
                if cfg.output.push_to_hub:
                    # A bad repo id or no token fails now, in seconds, not after hours of training,
                    # and before a previous run in the folder is cleared by output.overwrite.
                    from ..hub.publish import check_push_target

                    check_push_target(cfg.output.push_to_hub, cfg.output.hub_revision)
                try:
                    out.mkdir(parents=True, exist_ok=True)
                    lock.enter_context(run_lock(out))
                except OSError as e:
                    if isinstance(e, GQAError):  # already a one-line error (e.g. a full disk)
                        raise
                    raise ConfigError(
                        f"recipe key output.dir: cannot use {out} as the run folder "
                        f"({e.strerror or _one_line(e)}); choose another output.dir"
                    ) from None
                ckpt = _prepare_output(cfg, out)
                atomic_write_text(out / "recipe.yaml", dump_recipe(cfg))
                phase.share = str(ckpt) if ckpt else None
        resume_from = Path(phase.shared[0]) if phase.shared[0] else None
        return _run(cfg, accelerator, out, resume_from, trackers)
    finally:
        lock.close()


def _run(
    cfg: UptrainConfig, accelerator: Accelerator, out: Path, resume_from: Path | None, trackers: list[str]
) -> UptrainResult:
    from transformers import AutoTokenizer

    world = accelerator.num_processes
    main = accelerator.is_main_process
    set_seed(cfg.seed)

    # ---- tokenizer and data (tokenized once, on the main process first; others read the cache)
    # Tokenized blocks live in the run folder by default, so --resume (and --overwrite) reuse them.
    data_cfg = cfg.data if cfg.data.cache_dir else dataclasses.replace(cfg.data, cache_dir=str(out / "cache"))

    def load_data() -> tuple[Any, PackedData]:
        _check_model_path(cfg.model.path, "model.path")
        trust = _trust_remote_code(cfg.model.path, cfg.model.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.path, revision=cfg.model.revision, trust_remote_code=trust
        )
        return tokenizer, prepare_data(data_cfg, tokenizer, max_eval_blocks=cfg.eval.max_blocks)

    # accelerate's main_process_first, with each half's outcome shared (no process left at a barrier).
    with _all_ranks(accelerator, "tokenizing the data"):
        if main:
            tokenizer, data = load_data()
    with _all_ranks(accelerator, "reading the tokenized data"):
        if not main:
            tokenizer, data = load_data()

    # ---- model (float32 master weights; autocast gives bf16 compute on GPU)
    # Everything up to prepare() is local to each process: one failing stops all (see _all_ranks).
    with _all_ranks(accelerator, "loading the model"):
        # Read before loading: the float32 load rewrites model.config.dtype. The final model is saved
        # in this dtype (bf16 in, bf16 out), whatever the training precision.
        save_dtype = checkpoint_dtype(cfg.model.path, cfg.model.revision)
        model = _load_model(cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code, torch.float32,
                            cfg.model.attn_implementation, "model.path")  # fmt: skip
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        trainable = select_trainable(model, cfg.freeze.mode)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())
        logger.info(
            "training %s of %s parameters (freeze.mode=%s)",
            f"{n_trainable:,}",
            f"{n_total:,}",
            cfg.freeze.mode,
        )

        teacher = None
        if cfg.distill.teacher:
            teacher_dtype = torch.bfloat16 if mp_is_bf16(accelerator) else torch.float32
            teacher = _load_model(cfg.distill.teacher, None, None, teacher_dtype, cfg.model.attn_implementation,
                                  "distill.teacher")  # fmt: skip
            teacher.eval().requires_grad_(False)
            t_vocab = teacher.get_output_embeddings().weight.shape[0]
            s_vocab = model.get_output_embeddings().weight.shape[0]
            if t_vocab != s_vocab:
                raise ConfigError(
                    f"recipe key distill.teacher: teacher vocabulary ({t_vocab}) differs from the student's ({s_vocab}); "
                    "give the original checkpoint this model was converted from"
                )
            # The teacher takes no optimizer and no gradient sync: it is replicated on each device.
            teacher.to(accelerator.device)

        fused = cfg.optim.fused
        if fused is None:
            fused = accelerator.device.type in ("cuda", "cpu") and accelerator.distributed_type.value not in (
                "DEEPSPEED",
            )
        optimizer = torch.optim.AdamW(
            _param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
            fused=fused,
        )
        total_steps = cfg.total_steps(world)
        warmup = cfg.schedule.warmup_steps
        if warmup is None:
            warmup = int(cfg.schedule.warmup_fraction * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_multiplier(s, total_steps, warmup, cfg.schedule.kind, cfg.schedule.min_lr_ratio),
        )

        train_ds = data.train.with_format("torch", columns=["input_ids"])
        is_map = data.num_train_blocks is not None
        train_loader = DataLoader(train_ds, batch_size=cfg.optim.batch_size, shuffle=is_map, drop_last=True)
        eval_loader = None
        if data.eval is not None:
            eval_loader = DataLoader(
                data.eval.with_format("torch", columns=["input_ids"]),
                batch_size=cfg.eval.batch_size or cfg.optim.batch_size,
            )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if is_map and len(train_loader) == 0:
        raise GQAError(
            f"training data has {data.num_train_blocks} blocks, fewer than one batch of "
            f"{cfg.optim.batch_size * world}; add data or lower optim.batch_size / data.block_size"
        )

    # ---- resume
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "eval_before": None}
    if resume_from is not None:
        sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
        # A sharded load_state is a collective, which _all_ranks cannot wrap (see its docstring).
        with _all_ranks(accelerator, f"resuming from {resume_from}"):
            try:
                saved = json.loads((resume_from / _STATE_FILE).read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(
                    f"checkpoint {resume_from} cannot be read ({_one_line(e)}); delete it to resume from the one "
                    "before, or start over with --overwrite"
                ) from None
            if saved.get("data_fingerprint") != data.fingerprint:
                raise ConfigError(
                    f"recipe key data: differs from the run in {resume_from.parent.parent} (other data, tokenizer or "
                    "block size); resume with the same data settings or start over with --overwrite"
                )
            if (
                saved.get("global_batch") != cfg.optim.batch_size * world
                or saved.get("grad_accum") != cfg.optim.grad_accum
            ):
                logger.warning(
                    "batch layout differs from the checkpoint's: the data order will not match the original run"
                )
            if not sharded:
                accelerator.load_state(str(resume_from))
        if sharded:
            accelerator.load_state(str(resume_from))
        state.update(
            {k: saved[k] for k in ("step", "epoch", "batch_in_epoch", "tokens", "eval_before") if k in saved}
        )
        logger.info("resumed from %s at step %d", resume_from, state["step"])

    tokens_per_micro = cfg.optim.batch_size * cfg.data.block_size * world  # all processes together
    if trackers:
        with _all_ranks(accelerator, "starting the trackers"):
            accelerator.init_trackers("uptrain", config=_flat_hparams(cfg.to_dict()))
    if main and is_map:
        # Micro-batches per epoch over micro-batches per step (not whole steps per epoch: with
        # accumulation a step can straddle two epochs).
        epochs = total_steps * cfg.optim.grad_accum / max(1, len(train_loader))
        logger.info(
            "%d train blocks, %d held-out; %d steps of %d tokens (%.2f epochs), %d process(es), mixed precision %s",
            data.num_train_blocks, len(data.eval) if data.eval is not None else 0, total_steps,
            tokens_per_micro * cfg.optim.grad_accum, epochs, world, accelerator.mixed_precision,
        )  # fmt: skip

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches from (epoch, batch_in_epoch), updating both as it goes."""
        while True:
            train_loader.set_epoch(state["epoch"])
            skip = state["batch_in_epoch"]
            loader = skip_first_batches(train_loader, skip) if skip else train_loader
            for b in loader:
                state["batch_in_epoch"] += 1
                yield b
            if state["batch_in_epoch"] == 0:
                raise GQAError("the training data yielded no batch; add data or lower optim.batch_size")
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    ckpt_root = out / "checkpoints"
    last_ckpt: Path | None = resume_from

    def checkpoint() -> Path:
        s = dict(state, data_fingerprint=data.fingerprint, global_batch=cfg.optim.batch_size * world,
                 grad_accum=cfg.optim.grad_accum, total_steps=total_steps)  # fmt: skip
        return _save_checkpoint(
            accelerator, ckpt_root, s, cfg.checkpoint.keep_last, cfg.checkpoint.save_on_each_node
        )

    # ---- evaluation before training
    eval_before = state["eval_before"]
    if eval_loader is not None and cfg.eval.at_start and state["step"] == 0:
        eval_before = evaluate(model, eval_loader, accelerator)
        state["eval_before"] = eval_before
        accelerator.log(
            {"eval/loss": eval_before["loss"], "eval/perplexity": eval_before["perplexity"]}, step=0
        )
        logger.info(
            "held-out before: loss %.4f, perplexity %.2f", eval_before["loss"], eval_before["perplexity"]
        )

    model.train()
    it = batches()
    bar = tqdm(
        total=total_steps, initial=state["step"], desc="uptraining", disable=not main, dynamic_ncols=True
    )
    t0 = time.perf_counter()
    tokens_this_session = 0
    interrupted = False
    last_eval: dict[str, float] | None = None
    with _StopFlag() as stop:
        while state["step"] < total_steps:
            step_loss = torch.zeros((), device=accelerator.device)
            step_kl = torch.zeros((), device=accelerator.device)
            for _ in range(cfg.optim.grad_accum):
                batch = next(it)
                ids = batch["input_ids"]  # [B, T]
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
                    loss = causal_lm_loss(logits, ids)
                    if teacher is not None:
                        with torch.no_grad(), accelerator.autocast():
                            t_logits = teacher(input_ids=ids, use_cache=False).logits  # [B, T, V]
                        kl = kl_to_teacher(logits, t_logits, cfg.distill.temperature)
                        step_kl += kl.detach() / cfg.optim.grad_accum
                        loss = loss + cfg.distill.weight * kl
                    step_loss += loss.detach() / cfg.optim.grad_accum
                    accelerator.backward(loss)
            # One collective per step: the mean loss, whether any rank saw a non-finite loss, and
            # whether any rank was asked to stop (all ranks must agree to stop at the same step).
            flags = torch.stack(
                [
                    step_loss.float(),
                    (~torch.isfinite(step_loss)).float(),
                    torch.tensor(float(stop.requested), device=accelerator.device),
                    step_kl.float(),
                ]
            )
            flags = accelerator.reduce(flags, "sum") if world > 1 else flags
            if flags[1] > 0:
                optimizer.zero_grad(set_to_none=True)
                where = (
                    f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
                )
                raise GQAError(
                    f"loss became {step_loss.item()} at step {state['step'] + 1}; stopped before updating the weights, "
                    f"{where}; lower optim.lr or check the data, then --resume"
                )
            grad_norm = None
            if cfg.optim.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += tokens_per_micro * cfg.optim.grad_accum
            tokens_this_session += tokens_per_micro * cfg.optim.grad_accum
            step = state["step"]
            mean_loss = flags[0].item() / world
            tps = tokens_this_session / max(1e-9, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tps:,.0f}")
            if step % cfg.output.log_every == 0 or step == total_steps:
                logs = {"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": tps,
                        "train/tokens": state["tokens"]}  # fmt: skip
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
                if teacher is not None:
                    logs["train/kl"] = flags[3].item() / world
                accelerator.log(logs, step=step)
            if (
                eval_loader is not None
                and cfg.eval.every
                and step % cfg.eval.every == 0
                and step < total_steps
            ):
                last_eval = evaluate(model, eval_loader, accelerator)
                accelerator.log({f"eval/{k}": v for k, v in last_eval.items()}, step=step)
                logger.info(
                    "step %d: held-out loss %.4f, perplexity %.2f",
                    step,
                    last_eval["loss"],
                    last_eval["perplexity"],
                )
            if flags[2] > 0 and step < total_steps:  # at the last step, just finish normally
                last_ckpt = checkpoint()
                interrupted = True
                break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total_steps:
                last_ckpt = checkpoint()
    bar.close()
    seconds = time.perf_counter() - t0
    result = UptrainResult(
        output_dir=out, model_dir=None, steps=state["step"], total_steps=total_steps, tokens=state["tokens"],
        eval_before=eval_before, interrupted=interrupted, last_checkpoint=last_ckpt,
        tokens_per_second=tokens_this_session / max(seconds, 1e-9), seconds=seconds, trainable_parameters=n_trainable,
    )  # fmt: skip
    if interrupted:
        if trackers:
            accelerator.end_training()
        logger.warning(
            "stopped at step %d/%d; checkpoint %s; continue with --resume",
            state["step"],
            total_steps,
            last_ckpt,
        )
        return result

    # ---- final evaluation, checkpoint (so --resume with a larger budget continues), model
    if eval_loader is not None:
        result.eval_after = evaluate(model, eval_loader, accelerator)
        accelerator.log({f"eval/{k}": v for k, v in result.eval_after.items()}, step=state["step"])
        logger.info(
            "held-out after: loss %.4f, perplexity %.2f",
            result.eval_after["loss"],
            result.eval_after["perplexity"],
        )
    result.last_checkpoint = checkpoint()
    result.model_dir = _save_final_model(
        cfg, accelerator, model, tokenizer, out, save_dtype, result, trainable
    )
    if trackers:
        accelerator.end_training()
    if cfg.output.push_to_hub and main:
        # No barrier after this: the other processes are done, and an upload error on the main
        # process must not leave them waiting.
        result.hub_url = push_model(cfg, result.model_dir)
    return result


def push_model(cfg: UptrainConfig, model_dir: Path) -> str:
    """Upload the final model folder to ``output.push_to_hub``; return the repo (or branch) URL.

    The folder's card gets the Hub usage section; the token is never logged. On failure the error
    says that the model is saved and how to publish it later with ``gqa-export``.
    """
    from ..hub.publish import push_folder

    repo_id = cfg.output.push_to_hub
    assert repo_id is not None
    logger.info("uploading %s to the Hub as %s", model_dir, repo_id)
    try:
        pushed = push_folder(
            model_dir,
            repo_id,
            private=cfg.output.hub_private,
            revision=cfg.output.hub_revision,
            commit_message=f"Upload {repo_id.split('/')[-1]} uptrained with gqa-uptrain",
        )
    except GQAError as e:
        options = (" --private" if cfg.output.hub_private else "") + (
            f" --revision {cfg.output.hub_revision}" if cfg.output.hub_revision else ""
        )
        raise type(e)(
            f"{e}; the uptrained model is saved in {model_dir}: publish it with "
            f"`gqa-export {model_dir} {repo_id}{options}`"
        ) from None
    assert pushed.url is not None
    logger.info("uploaded the uptrained model to %s", pushed.url)
    return pushed.url


def mp_is_bf16(accelerator: Accelerator) -> bool:
    """Whether the run computes in bfloat16 (then the teacher is loaded in bf16 to save memory)."""
    return str(accelerator.mixed_precision) == "bf16"


def _save_final_model(
    cfg: UptrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: Any,
    out: Path,
    save_dtype: torch.dtype,
    result: UptrainResult,
    trainable: list[str],
) -> Path:
    """Save ``out/model`` in Hugging Face format (sharded safetensors in the checkpoint's original
    dtype, tokenizer, config, modelling code, model card with an uptraining section)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # every rank: FSDP / ZeRO-3 gather here
    dest = out / "model"
    with _all_ranks(accelerator, f"saving the model to {dest}"):
        if accelerator.is_main_process:
            _write_final_model(
                cfg, accelerator, model, state_dict, tokenizer, out, save_dtype, result, trainable
            )
    return dest


def _write_final_model(
    cfg: UptrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    out: Path,
    save_dtype: torch.dtype,
    result: UptrainResult,
    trainable: list[str],
) -> None:
    """The main process's half of :func:`_save_final_model`: write ``out/model`` and results.json."""
    dest = out / "model"
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.config.use_cache = True
    state_dict = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    with atomic_output_dir(dest, overwrite=True) as tmp:
        unwrapped.save_pretrained(tmp, state_dict=state_dict, max_shard_size=cfg.output.max_shard_size)
        # save_pretrained records the dtype of the (float32) model it was called on, not of the
        # state dict it wrote: make config.json say what the shards hold.
        config_file = tmp / "config.json"
        written = json.loads(config_file.read_text())
        written["dtype"] = str(save_dtype).removeprefix("torch.")
        written.pop("torch_dtype", None)
        atomic_write_text(config_file, json.dumps(written, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        # Loadable by transformers 4.x too, and no loading flags of this machine in tokenizer_config.json.
        make_folder_portable(tmp)
        src = Path(cfg.model.path).expanduser()
        if src.is_dir():
            # Carry what save_pretrained does not write: the card and any shipped modelling code.
            for f in src.iterdir():
                if (
                    f.is_file()
                    and (f.suffix == ".py" or f.name == "README.md")
                    and not (tmp / f.name).exists()
                ):
                    shutil.copy2(f, tmp / f.name)
        _write_card(cfg, tmp, result, accelerator, trainable)
    atomic_write_text(out / "results.json", json.dumps(_results(cfg, result, accelerator), indent=2))
    logger.info("saved uptrained model to %s (%s)", dest, str(save_dtype).removeprefix("torch."))


def _results(cfg: UptrainConfig, r: UptrainResult, accelerator: Accelerator) -> dict[str, Any]:
    return {
        "model": cfg.model.path,
        "steps": r.steps,
        "tokens": r.tokens,
        "alpha": cfg.budget.alpha,
        "eval_before": r.eval_before,
        "eval_after": r.eval_after,
        "tokens_per_second": r.tokens_per_second,
        "seconds": r.seconds,
        "processes": accelerator.num_processes,
        "mixed_precision": str(accelerator.mixed_precision),
    }


def _card_markdown(cfg: UptrainConfig, r: UptrainResult, accelerator: Accelerator, n_trainable: int) -> str:
    sources = [cfg.data.source] if isinstance(cfg.data.source, str) else cfg.data.source
    lines = [
        "## Uptraining",
        "",
        "Continued training after conversion to recover quality, as in Ainslie et al. (2023), "
        "run with `gqa-uptrain`.",
        "",
        "| | |",
        "|---|---|",
        f"| data | {', '.join(f'`{s}`' for s in sources)}"
        + (f" (config `{cfg.data.name}`)" if cfg.data.name else "")
        + f", split `{cfg.data.split}`, {cfg.data.block_size}-token blocks |",
        f"| steps | {r.steps} |",
        f"| tokens | {r.tokens:,} |",
    ]
    if cfg.budget.alpha is not None:
        lines.append(
            f"| alpha | {cfg.budget.alpha:g} of {cfg.budget.pretraining_tokens:,} pretraining tokens |"
        )
    lines += [
        f"| optimizer | AdamW, lr {cfg.optim.lr:g}, weight decay {cfg.optim.weight_decay:g}, "
        f"betas {tuple(cfg.optim.betas)}, grad clip {cfg.optim.grad_clip:g} |",
        f"| schedule | {cfg.schedule.kind} with warmup |",
        f"| batch | {cfg.optim.batch_size} × {cfg.optim.grad_accum} accumulation × {accelerator.num_processes} "
        f"process(es) = {cfg.optim.batch_size * cfg.optim.grad_accum * accelerator.num_processes} blocks |",
        f"| precision | {accelerator.mixed_precision} |",
        f"| trained parameters | {cfg.freeze.mode if cfg.freeze.mode != 'none' else 'all'} ({n_trainable:,}) |",
    ]
    if cfg.distill.teacher:
        lines.append(
            f"| distillation | KL to `{cfg.distill.teacher}`, weight {cfg.distill.weight:g}, T {cfg.distill.temperature:g} |"
        )
    if r.eval_before and r.eval_after:
        lines.append(
            f"| held-out perplexity | {r.eval_before['perplexity']:.2f} → {r.eval_after['perplexity']:.2f} "
            f"(loss {r.eval_before['loss']:.4f} → {r.eval_after['loss']:.4f}) |"
        )
    elif r.eval_after:
        lines.append(f"| held-out perplexity | {r.eval_after['perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


def _write_card(
    cfg: UptrainConfig, folder: Path, r: UptrainResult, accelerator: Accelerator, trainable: list[str]
) -> None:
    from ..hub.card import update_card
    from ..io.checkpoint import looks_like_repo_id

    n_trainable = r.trainable_parameters
    if not (folder / "README.md").exists():
        # No card from the converter (a checkpoint from elsewhere): start a short one, not the
        # huggingface_hub template full of placeholders.
        title = Path(cfg.output.dir).name or "model"
        atomic_write_text(
            folder / "README.md", f"---\nlibrary_name: transformers\ntags:\n- gqa\n---\n\n# {title}\n"
        )
    sources = [cfg.data.source] if isinstance(cfg.data.source, str) else cfg.data.source
    hub_datasets = [s for s in sources if looks_like_repo_id(s) and not Path(s).exists()]
    update_card(
        folder,
        "uptraining",
        _card_markdown(cfg, r, accelerator, n_trainable),
        datasets=hub_datasets or None,
        tags=["uptrained"],
    )
