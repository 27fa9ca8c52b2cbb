"""The end of a run: final checkpoint, ``model/`` in the checkpoint's own dtype, results.json, card, push.

The final model is saved in the dtype the checkpoint came in (:func:`~gqa_uptrain.training.models.checkpoint_dtype`),
whatever the training precision: bf16 in, bf16 out. With ``output.push_to_hub`` the main process
uploads ``model/`` once it is saved (:func:`push_model`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..errors import GQAError
from ..io.outputs import atomic_output_dir, atomic_write_text
from ..io.portability import make_folder_portable
from .checkpointing import save_run_checkpoint
from .config import UptrainConfig
from .distributed import all_ranks
from .state import Run, TrainState, UptrainResult

logger = logging.getLogger(__name__)


def finish(run: Run, state: TrainState, result: UptrainResult) -> UptrainResult:
    """Close the session that :func:`~gqa_uptrain.training.loop.fit` ran and complete ``result``.

    Interrupted: the checkpoint is already saved; say how to continue. Finished: a last checkpoint
    (so ``--resume`` with a larger budget continues), ``model/``, results.json, then the upload.
    """
    cfg, accelerator = run.cfg, run.accelerator
    if state.interrupted:
        if run.trackers:
            accelerator.end_training()
        logger.warning(
            "stopped at step %d/%d; checkpoint %s; continue with --resume",
            state.step,
            run.total_steps,
            state.last_checkpoint,
        )
        return result
    result.last_checkpoint = save_run_checkpoint(run, state)
    result.model_dir = save_final_model(
        cfg, accelerator, run.model, run.tokenizer, run.out, run.save_dtype, result
    )
    if run.trackers:
        accelerator.end_training()
    if cfg.output.push_to_hub and accelerator.is_main_process:
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


def save_final_model(
    cfg: UptrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: Any,
    out: Path,
    save_dtype: torch.dtype,
    result: UptrainResult,
) -> Path:
    """Save ``out/model`` in Hugging Face format (sharded safetensors in the checkpoint's original
    dtype, tokenizer, config, modelling code, model card with an uptraining section)."""
    accelerator.wait_for_everyone()
    lora = cfg.lora.mode != "none"
    # every rank: FSDP / ZeRO-3 gather here (LoRA runs neither: its merge happens on the main process)
    state_dict = None if lora else accelerator.get_state_dict(model)
    dest = out / "model"
    with all_ranks(accelerator, f"saving the model to {dest}"):
        if accelerator.is_main_process:
            if lora:
                model, state_dict = _merge_adapters(cfg, accelerator.unwrap_model(model), out)
            _write_final_model(cfg, accelerator, model, state_dict, tokenizer, out, save_dtype, result)
    return dest


def _merge_adapters(cfg: UptrainConfig, model: torch.nn.Module, out: Path) -> tuple[torch.nn.Module, dict]:
    """LoRA / QLoRA: save the adapters to ``out/adapters`` and give the base with them merged in."""
    from ..io.models import load_pretrained
    from .lora import merged_model

    def load_base() -> torch.nn.Module:  # the checkpoint's own weights, not their bf16 / 4-bit copies
        return load_pretrained(
            cfg.model.path, what="model.path", task="causal-lm", dtype=torch.float32, revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code, with_tokenizer=False,
        ).model  # fmt: skip

    merged, state_dict = merged_model(model, cfg, out / "adapters", load_base)
    logger.info(
        "merged the %s adapters into the base (adapters saved in %s)", cfg.lora.mode, out / "adapters"
    )
    return merged, state_dict


def _write_final_model(
    cfg: UptrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    out: Path,
    save_dtype: torch.dtype,
    result: UptrainResult,
) -> None:
    """The main process's half of :func:`save_final_model`: write ``out/model`` and results.json."""
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
        _write_card(cfg, tmp, result, accelerator)
    atomic_write_text(out / "results.json", json.dumps(_results(cfg, result, accelerator), indent=2))
    logger.info("saved uptrained model to %s (%s)", dest, str(save_dtype).removeprefix("torch."))


def display_name(source: str) -> str:
    """A model or data source as a run's outputs name it: its Hub id, else its file or folder name.

    results.json, the card and the trackers' logs travel (uploaded, shared, attached to a paper):
    a path such as ``/home/alice/runs/mqa`` says nothing to a reader and something about the machine.
    """
    from ..io.locate import is_hub_id

    if is_hub_id(source):
        return source
    return Path(str(source)).expanduser().name or str(source)


def _results(cfg: UptrainConfig, r: UptrainResult, accelerator: Accelerator) -> dict[str, Any]:
    return {
        "model": display_name(cfg.model.path),
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


def _card_markdown(cfg: UptrainConfig, r: UptrainResult, accelerator: Accelerator) -> str:
    sources = [cfg.data.source] if isinstance(cfg.data.source, str) else cfg.data.source
    lines = [
        "## Uptraining",
        "",
        "Continued training after conversion to recover quality, as in Ainslie et al. (2023), "
        "run with `gqa-uptrain`.",
        "",
        "| | |",
        "|---|---|",
        f"| data | {', '.join(f'`{display_name(s)}`' for s in sources)}"
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
        f"| trained parameters | {cfg.freeze.mode if cfg.freeze.mode != 'none' else 'all'} ({r.trainable_parameters:,}) |"
        if cfg.lora.mode == "none"
        else f"| trained parameters | {'QLoRA (4-bit base)' if cfg.lora.mode == 'qlora' else 'LoRA'} r={cfg.lora.rank}, "
        f"alpha {cfg.lora.alpha:g} on {', '.join(cfg.lora.targets)} ({r.trainable_parameters:,}), merged into this "
        "checkpoint; the adapters are in the run's `adapters/` |",
    ]
    if cfg.distill.teacher:
        lines.append(
            f"| distillation | KL to `{display_name(cfg.distill.teacher)}`, weight {cfg.distill.weight:g}, T {cfg.distill.temperature:g} |"
        )
    # Uptraining's held-out perplexity: token-weighted over the held-out blocks (loop.held_out_perplexity).
    if r.eval_before and r.eval_after:
        lines.append(
            f"| held-out perplexity | {r.eval_before['perplexity']:.2f} → {r.eval_after['perplexity']:.2f} "
            f"(loss {r.eval_before['loss']:.4f} → {r.eval_after['loss']:.4f}) |"
        )
    elif r.eval_after:
        lines.append(f"| held-out perplexity | {r.eval_after['perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


def _write_card(cfg: UptrainConfig, folder: Path, r: UptrainResult, accelerator: Accelerator) -> None:
    from ..hub.card import update_card
    from ..io.locate import is_hub_id

    if not (folder / "README.md").exists():
        # No card from the converter (a checkpoint from elsewhere): start a short one, not the
        # huggingface_hub template full of placeholders.
        title = Path(cfg.output.dir).name or "model"
        atomic_write_text(
            folder / "README.md", f"---\nlibrary_name: transformers\ntags:\n- gqa\n---\n\n# {title}\n"
        )
    sources = [cfg.data.source] if isinstance(cfg.data.source, str) else cfg.data.source
    hub_datasets = [s for s in sources if is_hub_id(s)]
    update_card(
        folder,
        "uptraining",
        _card_markdown(cfg, r, accelerator),
        datasets=hub_datasets or None,
        tags=["uptrained"],
    )
