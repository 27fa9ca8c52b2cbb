"""Set-up of an uptraining run: the accelerator, the run folder, then everything the loop trains with.

In the order accelerate's examples use: ``Accelerator(...)``, the seed, tokenizer and data, model
(and teacher), optimizer and schedule, data loaders, ``accelerator.prepare``, ``load_state`` on
resume, trackers. Every phase that can fail on one process alone runs inside
:func:`~gqa_uptrain.training.distributed.all_ranks`, so a failure stops every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DeepSpeedPlugin,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    set_seed,
)
from torch.utils.data import DataLoader

from ..data.text import PackedData, prepare_data
from ..errors import ConfigError, GQAError
from ..io.models import load_pretrained, load_tokenizer
from ..io.outputs import atomic_write_text
from .checkpointing import prepare_output, resume, run_lock
from .config import OptimConfig, UptrainConfig, dump_recipe
from .distributed import all_ranks, one_line
from .models import checkpoint_dtype, select_trainable
from .speed import apply_speed_settings
from .state import Run, TrainState

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The accelerator
# --------------------------------------------------------------------------------------------------


def _resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by `accelerate launch` configs
    if env:
        return env
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _trackers(cfg: UptrainConfig) -> list[str]:
    return [t for t in cfg.output.log_with if t and t != "none"]


def _refuse_sharding_on_cpu() -> None:
    """Refuse an ``accelerate launch`` FSDP config on a machine without a GPU.

    accelerate (1.x) turns FSDP on only for GPU-like devices: on CPU its state is ``MULTI_CPU`` and
    the plugin is dropped, so the run would silently be plain data parallel with the whole model on
    every process (FSDP v1's ``sync_module_states`` even fails to construct). DeepSpeed does run on
    CPU processes (:func:`make_accelerator`).
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError(
            "the accelerate config asks for FSDP, which accelerate runs only on GPUs: on CPU it would be "
            "plain data parallel with the whole model on every process; launch with "
            "recipes/accelerate/multi-cpu.yaml, or rehearse sharding with recipes/accelerate/deepspeed-zero3.yaml"
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
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        # ZeRO-3 holds no process's full weights: the final model/ is gathered (get_state_dict), which
        # DeepSpeed allows only with this set. It changes nothing else (checkpoints stay sharded).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        plugin.zero3_save_16bit_model = True
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


def make_accelerator(cfg: UptrainConfig, out: Path) -> Accelerator:
    """The run's ``Accelerator``: one CPU process, ``torchrun``, or ``accelerate launch`` (DDP, FSDP, DeepSpeed).

    Gradient accumulation is accelerate's (``accumulate``); the data order is seedable (exact
    resume); the schedule is stepped by the loop, once per optimizer step.
    """
    # accelerate only goes multi-process on CPU (gloo) when told `cpu=True`: do so under torchrun /
    # accelerate launch on a machine without a GPU, so `torchrun --nproc_per_node N` just works.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
    on_cpu = launched and not torch.cuda.is_available()
    if on_cpu:
        _refuse_sharding_on_cpu()
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = []
    if on_cpu and use_deepspeed:
        # DeepSpeed on CPU processes (DeepSpeed picks its CPU accelerator when no GPU is visible, or
        # DS_ACCELERATOR=cpu): `cpu=True` would make accelerate drop the DeepSpeed plugin silently
        # (plain DDP), and without a gloo process group every process believes it is rank 0 of 1.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if on_cpu and use_deepspeed:
        _quiet_deepspeed_on_cpu()
    deepspeed_plugin = None
    if use_deepspeed:
        # Built here (accelerate would build the same from the environment) so that its
        # accumulation and clipping are the recipe's before the engine exists.
        deepspeed_plugin = DeepSpeedPlugin()
        align_deepspeed_plugin(deepspeed_plugin, cfg.optim)
    try:
        acc = Accelerator(
            cpu=on_cpu and not use_deepspeed,
            kwargs_handlers=handlers,
            mixed_precision=_resolve_mixed_precision(cfg.optim.mixed_precision),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.optim.grad_accum, sync_with_dataloader=False
            ),
            # The schedule is defined in optimizer steps; we step it once per optimizer step ourselves.
            step_scheduler_with_optimizer=False,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            deepspeed_plugin=deepspeed_plugin,
            log_with=_trackers(cfg) or None,
            project_config=ProjectConfiguration(
                project_dir=str(out),
                logging_dir=str(out / "logs"),
                save_on_each_node=cfg.checkpoint.save_on_each_node,
            ),
        )
    except ImportError as e:  # e.g. a DeepSpeed config without deepspeed installed
        raise ConfigError(f"the accelerate config needs a package that is missing: {one_line(e)}") from None
    if acc.device.type == "cpu":
        _quiet_deepspeed_on_cpu()
    return acc


def _quiet_deepspeed_on_cpu() -> None:
    """Tell DeepSpeed the accelerator it would pick anyway on this machine: the CPU.

    Where deepspeed is installed, transformers' ``save_pretrained`` imports it (accelerate's unwrap
    looks for a ``DeepSpeedEngine``), and on a machine without a GPU DeepSpeed's accelerator
    detection then prints "Setting accelerator to CPU ..." as a warning to **stdout**, the stream
    our commands keep for machine-readable output. Named by ``DS_ACCELERATOR``, it says nothing. A
    value the user set is kept.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def mp_is_bf16(accelerator: Accelerator) -> bool:
    """Whether the run computes in bfloat16 (then the teacher is loaded in bf16 to save memory)."""
    return str(accelerator.mixed_precision) == "bf16"


# --------------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def claim_run_folder(cfg: UptrainConfig, accelerator: Accelerator, out: Path) -> Iterator[Path | None]:
    """Hold ``out`` for the run (its lock) and yield the checkpoint to resume from, or ``None``.

    On the main process: the Hub push target is checked first (a bad repo id or no token fails in
    seconds, not after hours of training, and before ``output.overwrite`` clears a previous run),
    then the lock is taken, a previous run refused, cleared or resumed (:func:`prepare_output`) and
    the resolved recipe written. Every process gets the outcome; the lock is released on exit.
    """
    with contextlib.ExitStack() as lock:
        with all_ranks(accelerator, f"preparing the output folder {out}") as phase:
            if accelerator.is_main_process:
                if cfg.output.push_to_hub:
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
                        f"({e.strerror or one_line(e)}); choose another output.dir"
                    ) from None
                ckpt = prepare_output(cfg, out)
                atomic_write_text(out / "recipe.yaml", dump_recipe(cfg))
                # Relative to the run folder: with checkpoint.save_on_each_node every node resumes
                # from its own copy, wherever its disk holds the run folder.
                phase.share = str(ckpt.relative_to(out)) if ckpt else None
        yield out / phase.shared[0] if phase.shared[0] else None


# --------------------------------------------------------------------------------------------------
# Data, models, optimizer
# --------------------------------------------------------------------------------------------------


def _load_data(cfg: UptrainConfig, out: Path) -> tuple[Any, PackedData]:
    """Tokenizer and tokenized blocks. The blocks are cached in the run folder unless
    ``data.cache_dir`` says otherwise, so --resume (and --overwrite) reuse them."""
    data_cfg = cfg.data if cfg.data.cache_dir else dataclasses.replace(cfg.data, cache_dir=str(out / "cache"))
    # The shared loader checks model.path first (the one path-or-Hub-id check), so a bad path is
    # reported here, before any data is read.
    tokenizer = load_tokenizer(
        cfg.model.path,
        what="model.path",
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    return tokenizer, prepare_data(data_cfg, tokenizer, max_eval_blocks=cfg.eval.max_blocks)


def _load_student(cfg: UptrainConfig) -> tuple[torch.nn.Module, int]:
    """The model to train, in float32 (the master weights), with freeze.mode applied; and how many weights train."""
    model = load_pretrained(
        cfg.model.path,
        what="model.path",
        task="causal-lm",
        dtype=torch.float32,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        with_tokenizer=False,  # _load_data has loaded it already (and there a missing one is an error)
    ).model
    # load_pretrained returns models in eval mode (what gqa-eval measures); this one trains.
    model.train()
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    select_trainable(model, cfg.freeze.mode)
    # ZeRO-3 has cut each parameter to a shard while loading: count the whole (ds_numel).
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    n_total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    logger.info(
        "training %s of %s parameters (freeze.mode=%s)", f"{n_trainable:,}", f"{n_total:,}", cfg.freeze.mode
    )
    return model, n_trainable


def _apply_lora(
    cfg: UptrainConfig, accelerator: Accelerator, model: torch.nn.Module
) -> tuple[torch.nn.Module, int]:
    """LoRA / QLoRA adapters on the frozen student (:mod:`.lora`); checkpoints then hold the adapters."""
    from .lora import apply_lora, register_adapter_checkpointing

    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise ConfigError(
            f"recipe key lora.mode: {cfg.lora.mode} runs in one process or with DDP, not under "
            f"{accelerator.distributed_type.value} (the adapters are small: every process holds them whole); "
            "launch with recipes/accelerate/ddp.yaml or torchrun"
        )
    mp = str(accelerator.mixed_precision)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    model, n_trainable = apply_lora(model, cfg.lora, accelerator.device, compute_dtype, cfg.model.path)
    register_adapter_checkpointing(accelerator)
    return model, n_trainable


def _load_teacher(cfg: UptrainConfig, accelerator: Accelerator, student: torch.nn.Module) -> torch.nn.Module:
    """The frozen teacher on this process's device (bf16 when the run computes in bf16)."""
    dtype = torch.bfloat16 if mp_is_bf16(accelerator) else torch.float32
    # The teacher's trust_remote_code follows the one rule (its own folder's auto_map), not the
    # student's setting: they are different checkpoints. Its revision is the default branch.
    teacher = load_pretrained(
        cfg.distill.teacher,
        what="distill.teacher",
        task="causal-lm",
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        with_tokenizer=False,
    ).model
    teacher.eval().requires_grad_(False)  # no dropout in the targets, no gradients kept
    t_vocab, s_vocab = (_full_shape(m.get_output_embeddings().weight)[0] for m in (teacher, student))
    if t_vocab != s_vocab:
        raise ConfigError(
            f"recipe key distill.teacher: teacher vocabulary ({t_vocab}) differs from the student's ({s_vocab}); "
            "give the original checkpoint this model was converted from"
        )
    # The teacher takes no optimizer and no gradient sync: it is replicated on each device, except
    # under ZeRO-3 (sharded like the student: _teacher_engine, once the run's DeepSpeed config is final).
    return teacher.to(accelerator.device)


def _full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape in the model, also when ZeRO-3 has cut it into a 1-D shard (``ds_shape``)."""
    return getattr(p, "ds_shape", None) or p.shape


def _zero_stage(accelerator: Accelerator) -> int | None:
    """The run's DeepSpeed ZeRO stage, or ``None`` when DeepSpeed is not in use."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.deepspeed_config["zero_optimization"]["stage"])


def _teacher_engine(teacher: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """Under ZeRO-3, the teacher behind a DeepSpeed engine of its own, sharded as the student is.

    While the run's ZeRO-3 config is active, ``from_pretrained`` partitions every model it builds
    (``zero.Init``), the teacher too: each process holds a 1-D shard of every weight, and only an
    engine's hooks gather them for a forward (a bare teacher fails, or would compute from empty
    weights). It gets the student's config as ``accelerator.prepare`` completed it, without an
    optimizer or scheduler (it trains nothing): a 70B teacher then costs each GPU 1/N of its weights.
    """
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    return engine


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not biases and norm scales, as GPT-style recipes do.

    A matrix is a parameter whose *model* shape has two or more dimensions: ZeRO-3 has already cut
    every parameter into a 1-D shard when the model was loaded (``zero.Init`` in ``from_pretrained``)
    and keeps the real shape in ``ds_shape``, so ``p.ndim`` would put everything in the no-decay
    group (an empty decay group also breaks the schedule's step). Empty groups are left out.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(_full_shape(p)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_multiplier(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warmup, then cosine or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer_and_schedule(
    cfg: UptrainConfig, accelerator: Accelerator, model: torch.nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters and the warmup + cosine / constant schedule (per optimizer step)."""
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
    s = cfg.schedule
    warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, s.kind, s.min_lr_ratio)
    )
    return optimizer, scheduler


def _loaders(cfg: UptrainConfig, data: PackedData) -> tuple[DataLoader, DataLoader | None]:
    """Training loader (shuffled when the blocks are a map-style dataset) and held-out loader."""
    train_ds = data.train.with_format("torch", columns=["input_ids"])
    train = DataLoader(
        train_ds, batch_size=cfg.optim.batch_size, shuffle=data.num_train_blocks is not None, drop_last=True
    )
    if data.eval is None:
        return train, None
    held_out = DataLoader(
        data.eval.with_format("torch", columns=["input_ids"]),
        batch_size=cfg.eval.batch_size or cfg.optim.batch_size,
    )
    return train, held_out


def _portable_recipe(cfg: UptrainConfig) -> dict[str, Any]:
    """The recipe as the trackers' logs record it: models, data and folders by Hub id or name, no
    paths of this machine (:func:`~gqa_uptrain.training.finish.display_name`)."""
    from .finish import display_name

    d = cfg.to_dict()
    for section, key in (("model", "path"), ("distill", "teacher"), ("data", "cache_dir"), ("output", "dir")):
        if d[section].get(key):
            d[section][key] = display_name(d[section][key])
    source = d["data"]["source"]
    d["data"]["source"] = (
        display_name(source) if isinstance(source, str) else [display_name(s) for s in source]
    )
    return d


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
# setup()
# --------------------------------------------------------------------------------------------------


def setup(
    cfg: UptrainConfig, accelerator: Accelerator, out: Path, resume_from: Path | None
) -> tuple[Run, TrainState]:
    """Everything one session trains with, and where it starts (step 0, or ``resume_from``'s state)."""
    main = accelerator.is_main_process
    set_seed(cfg.seed)

    # Tokenized once, on the main process first, then read from the cache by the others:
    # accelerate's main_process_first, with each half's outcome shared (no process left at a barrier).
    with all_ranks(accelerator, "tokenizing the data"):
        if main:
            tokenizer, data = _load_data(cfg, out)
    with all_ranks(accelerator, "reading the tokenized data"):
        if not main:
            tokenizer, data = _load_data(cfg, out)

    # Float32 master weights (autocast gives bf16 compute on GPU). Everything up to prepare() is local
    # to each process: one failing stops all.
    with all_ranks(accelerator, "loading the model"):
        # Read before loading: the float32 load rewrites model.config.dtype. The final model is saved
        # in this dtype (bf16 in, bf16 out), whatever the training precision.
        save_dtype = checkpoint_dtype(cfg.model.path, cfg.model.revision)
        model, n_trainable = _load_student(cfg)
        if cfg.lora.mode != "none":
            model, n_trainable = _apply_lora(cfg, accelerator, model)
        teacher = _load_teacher(cfg, accelerator, model) if cfg.distill.teacher else None
        total_steps = cfg.total_steps(accelerator.num_processes)
        optimizer, scheduler = _optimizer_and_schedule(cfg, accelerator, model, total_steps)
        train_loader, eval_loader = _loaders(cfg, data)

    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if teacher is not None and _zero_stage(accelerator) == 3:
        teacher = _teacher_engine(teacher, accelerator)  # collective, as prepare() is
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    with all_ranks(accelerator, "applying the speed settings"):
        head = apply_speed_settings(cfg, accelerator, model)
    if data.num_train_blocks is not None and len(train_loader) == 0:
        raise GQAError(
            f"training data has {data.num_train_blocks} blocks, fewer than one batch of "
            f"{cfg.optim.batch_size * accelerator.num_processes}; add data or lower optim.batch_size / data.block_size"
        )
    run = Run(cfg=cfg, accelerator=accelerator, out=out, tokenizer=tokenizer, data=data, model=model, teacher=teacher,
              optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, eval_loader=eval_loader,
              total_steps=total_steps, save_dtype=save_dtype, trainable_parameters=n_trainable,
              trackers=_trackers(cfg), head=head)  # fmt: skip

    state = TrainState()
    if resume_from is not None:
        resume(run, state, resume_from)
    if run.trackers:
        with all_ranks(accelerator, "starting the trackers"):
            accelerator.init_trackers("uptrain", config=_flat_hparams(_portable_recipe(cfg)))
    if main and data.num_train_blocks is not None:
        # Micro-batches per epoch over micro-batches per step (not whole steps per epoch: with
        # accumulation a step can straddle two epochs).
        epochs = total_steps * cfg.optim.grad_accum / max(1, len(train_loader))
        logger.info(
            "%d train blocks, %d held-out; %d steps of %d tokens (%.2f epochs), %d process(es), mixed precision %s",
            data.num_train_blocks, len(data.eval) if data.eval is not None else 0, total_steps,
            run.tokens_per_step, epochs, run.world, accelerator.mixed_precision,
        )  # fmt: skip
    return run, state
