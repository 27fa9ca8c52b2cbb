"""What every command shares: logging set-up and turning user errors into one-line messages."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from ..errors import GQAError

console = Console(stderr=True)
"""Where commands write human-facing output (summaries, tables); stdout stays clean for JSON."""


def setup_logging(verbose: bool = False) -> None:
    """Send the library's log records to a rich handler on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> None:
    """Print ``message`` as one red line on stderr and exit with ``code``."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_command(fn: Callable[[], Any]) -> Any:
    """Run a command body, turning :class:`GQAError` into a one-line error and a non-zero exit.

    Ctrl-C exits with 130 after whatever cleanup the body's context managers do.
    """
    try:
        return fn()
    except GQAError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


def make_app(help_text: str) -> typer.Typer:
    """A single-command Typer app with rich help panels and no shell-completion noise."""
    return typer.Typer(
        help=help_text,
        add_completion=False,
        rich_markup_mode="rich",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def main_for(app: typer.Typer) -> Callable[[], None]:
    """The console-script entry point for ``app``."""

    def main() -> None:
        app(prog_name=sys.argv[0].rsplit("/", 1)[-1])

    return main
