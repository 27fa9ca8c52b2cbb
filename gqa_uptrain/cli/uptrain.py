"""``gqa-uptrain``: continue training a converted checkpoint from a YAML recipe (one CPU to many GPUs)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, main_for, make_app, run_command, setup_logging

HELP = (
    "Uptrain a converted checkpoint so it recovers the quality lost in conversion (Ainslie et al. 2023): "
    "continue training for a small fraction of its pretraining compute.\n\n"
    "RECIPE is a YAML file (see [cyan]recipes/[/]); any key can be overridden after it as "
    "[cyan]section.key=value[/], e.g. [cyan]optim.lr=1e-4 budget.steps=50[/]. The same command runs in "
    "one CPU process, under [cyan]torchrun[/] and under [cyan]accelerate launch[/] (data parallel on GPUs "
    "or CPU cores, FSDP and DeepSpeed on GPUs; configs in [cyan]recipes/accelerate/[/]).\n\n"
    "The run folder gets [bold]model/[/] (final Hugging Face checkpoint), [bold]checkpoints/[/] "
    "(resumable state), [bold]logs/[/] (TensorBoard), [bold]results.json[/] (held-out perplexity "
    "before and after). Ctrl-C saves a checkpoint; [bold]--resume[/] continues exactly where it stopped.\n\n"
    "[bold]--push-to-hub OWNER/NAME[/] uploads [bold]model/[/] to the Hub when training finishes; the repo id "
    "and the token ([bold]HF_TOKEN[/] or [bold]hf auth login[/], never the command line) are checked before "
    "training starts."
)
app = make_app(HELP)

RUN = "Run"
SHORT = "Shortcuts for recipe keys"
HUB = "Hub"


@app.command(help=HELP)
def uptrain(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see recipes/).", show_default=False)],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Recipe overrides as section.key=value (values read as YAML: 1e-4, true, \\[a, b]).",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the newest checkpoint in the output folder (same data order, same final "
            "weights as an uninterrupted run); starts fresh when there is none.",
            rich_help_panel=RUN,
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start over in an output folder that holds a previous run (its checkpoints and model are deleted).",
            rich_help_panel=RUN,
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Validate the recipe and overrides, print the resolved recipe and exit without loading anything.",
            rich_help_panel=RUN,
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Checkpoint to uptrain (model.path).",
            rich_help_panel=SHORT,
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="Run folder (output.dir).", rich_help_panel=SHORT, show_default=False
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            help="Optimizer steps (budget.steps; replaces the recipe's budget).",
            rich_help_panel=SHORT,
            show_default=False,
        ),
    ] = None,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub",
            metavar="REPO_ID",
            help="After training, upload the final model to this Hub model repo (OWNER/NAME), created if "
            "needed (output.push_to_hub); the token comes from HF_TOKEN or `hf auth login`. Checked before "
            "training. Private repo or another branch: output.hub_private=true, output.hub_revision=BRANCH.",
            rich_help_panel=HUB,
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging.", rich_help_panel=RUN)
    ] = False,
) -> None:
    """Uptrain the model a recipe names; print held-out perplexity before and after."""
    setup_logging(verbose)
    if not verbose:
        # accelerate logs every file of every checkpoint at INFO.
        for name in ("accelerate", "accelerate.checkpointing", "accelerate.accelerator"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if int(os.environ.get("RANK", "0") or 0) > 0:
            # Under torchrun / accelerate launch every process runs this: rank 0 tells the story.
            logging.getLogger("gqa_uptrain").setLevel(logging.WARNING)
    from ..training.config import dump_recipe, load_recipe

    extra = list(overrides or [])
    for key, value in (("model.path", model), ("output.dir", output), ("output.push_to_hub", push_to_hub)):
        if value is not None:
            extra.append(f"{key}={value}")
    if steps is not None:
        extra += [f"budget.steps={steps}", "budget.tokens=null", "budget.alpha=null"]
    if resume:
        extra.append("output.resume=true")
    if overwrite:
        extra.append("output.overwrite=true")
    cfg = run_command(lambda: load_recipe(recipe, extra))
    if check:
        console.print(dump_recipe(cfg), highlight=False, markup=False)
        console.print(f"recipe ok: {cfg.total_steps()} optimizer steps in one process", highlight=False)
        if cfg.output.push_to_hub:
            from ..hub.publish import check_push_target

            run_command(lambda: check_push_target(cfg.output.push_to_hub, cfg.output.hub_revision))
            console.print(
                f"push target ok: {cfg.output.push_to_hub} (token found; its permissions are checked at upload)",
                highlight=False,
            )
        return

    from ..training.loop import end_process_group
    from ..training.loop import uptrain as run_uptrain

    try:
        result = run_command(lambda: run_uptrain(cfg))
    except typer.Exit:
        end_process_group()  # after the error line (see end_process_group)
        raise
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under torchrun / accelerate launch, rank 0 reports
        if result.interrupted:
            raise typer.Exit(130)
        return
    if result.interrupted:
        console.print(
            f"[yellow]stopped[/] at step {result.steps}/{result.total_steps}; checkpoint "
            f"[bold]{result.last_checkpoint}[/]; continue with [cyan]--resume[/]",
            highlight=False,
        )
        raise typer.Exit(130)
    table = Table(title=f"uptrained {cfg.model.path}")
    table.add_column("")
    table.add_column("held-out loss", justify="right")
    table.add_column("perplexity", justify="right")
    for label, ev in (("before", result.eval_before), ("after", result.eval_after)):
        if ev:
            table.add_row(label, f"{ev['loss']:.4f}", f"{ev['perplexity']:.2f}")
    if table.rows:
        console.print(table)
    console.print(
        f"{result.steps} steps · {result.tokens:,} tokens · {result.tokens_per_second:,.0f} tokens/s · "
        f"{result.seconds:.0f}s · model in [bold]{result.model_dir}[/]",
        highlight=False,
    )
    if result.hub_url:
        console.print(f"uploaded to [bold]{result.hub_url}[/]", highlight=False)


main = main_for(app)

if __name__ == "__main__":  # `accelerate launch -m gqa_uptrain.cli.uptrain RECIPE` and `torchrun -m ...`
    main()
