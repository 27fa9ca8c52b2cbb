"""``gqa-export``: check a converted or uptrained checkpoint, complete its model card, publish it on the Hub."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..io.outputs import format_bytes
from ._common import console, main_for, make_app, run_command, setup_logging

app = make_app("Publish a converted or uptrained checkpoint on the Hugging Face Hub.")

HELP = (
    "Publish the checkpoint in FOLDER (from gqa-convert or gqa-uptrain) as the Hub model REPO_ID.\n\n"
    "FOLDER is checked first: config.json and the tokenizer load with transformers, every shard the "
    "safetensors index names is there with a valid header, and no pickled file is uploaded unless "
    "[bold]--allow-pickle[/]. Its model card (README.md) is completed and validated: [cyan]gqa[/] and "
    "family tags, library_name, base_model, datasets, model-index results from [bold]--eval-json[/], a "
    "usage section. Then the repo is created if needed, the folder uploaded and its URL printed. An "
    "interrupted upload resumes when the same command is run again.\n\n"
    "The token comes from [bold]HF_TOKEN[/] or [bold]hf auth login[/], never from the command line."
)
REPO = "Repository"
CARD = "Model card"
FILES = "Files"


@app.command(help=HELP)
def export(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint folder to publish (gqa-convert or gqa-uptrain output).", show_default=False
        ),
    ],
    repo_id: Annotated[
        str,
        typer.Argument(
            help="Hub model repo to publish to, [cyan]OWNER/NAME[/]; created if it does not exist.",
            show_default=False,
        ),
    ],
    private: Annotated[
        bool,
        typer.Option(
            help="Create the repo private. An existing repo keeps its visibility.", rich_help_panel=REPO
        ),
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(
            help="Branch to upload to (created from main if missing), or refs/pr/N to add to an open pull "
            "request. Default: main.",
            rich_help_panel=REPO,
            show_default=False,
        ),
    ] = None,
    create_pr: Annotated[
        bool,
        typer.Option(
            help="Open a pull request against main instead of committing to it.", rich_help_panel=REPO
        ),
    ] = False,
    commit_message: Annotated[
        str | None,
        typer.Option(
            help="Commit title. Default: 'Upload NAME with gqa-export'.",
            rich_help_panel=REPO,
            show_default=False,
        ),
    ] = None,
    eval_json: Annotated[
        Path | None,
        typer.Option(
            help="JSON written by [bold]gqa-eval --json[/]: this model's perplexity goes into the card's "
            "model-index and every measured model into an evaluation table.",
            rich_help_panel=CARD,
            show_default=False,
        ),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            help="Hub id of the original checkpoint, for the card's base_model when the conversion could not "
            "know it (local folder or GGUF source).",
            rich_help_panel=CARD,
            show_default=False,
        ),
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            "--dataset",
            help="Dataset used for uptraining, added to the card's datasets (repeatable).",
            rich_help_panel=CARD,
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            help="Glob pattern (relative to FOLDER) of files not to upload, e.g. 'checkpoints/*' (repeatable).",
            rich_help_panel=FILES,
            show_default=False,
        ),
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            help="Allow pickled files (*.bin, *.pt, *.pth, *.pkl, *.ckpt) in the upload. Off by default: "
            "loading a pickle can run code.",
            rich_help_panel=FILES,
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="Check the folder, list the files that would be uploaded with their sizes and print the card "
            "that would be written (to stdout). No network, nothing written.",
            rich_help_panel=FILES,
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the URL.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Check FOLDER, complete its model card and upload it to the Hub as REPO_ID."""
    setup_logging(verbose)
    from ..hub.publish import push_folder

    # The card records the command that publishes, so a dry run previews the card of the real run.
    command = "gqa-export " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--dry-run")
    result = run_command(
        lambda: push_folder(
            folder,
            repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
            eval_json=eval_json,
            datasets=dataset,
            base_model=base_model,
            exclude=exclude,
            allow_pickle=allow_pickle,
            dry_run=dry_run,
            command=command,
        )
    )
    plan = result.plan
    if dry_run:
        table = Table(title=f"dry run: would upload {len(plan.files)} files to {plan.repo_id}")
        table.add_column("file")
        table.add_column("size", justify="right")
        for f in plan.files:
            table.add_row(f.path, format_bytes(f.size))
        table.add_row("[bold]total[/]", f"[bold]{format_bytes(plan.total_bytes)}[/]")
        console.print(table)
        console.print("model card that would be written (README.md):", highlight=False)
        typer.echo(str(plan.card))
        return
    if not quiet:
        console.print(
            f"uploaded {len(plan.files)} files ({format_bytes(plan.total_bytes)}) to [bold]{plan.repo_id}[/]",
            highlight=False,
        )
    typer.echo(result.url)


main = main_for(app)

if __name__ == "__main__":
    main()
