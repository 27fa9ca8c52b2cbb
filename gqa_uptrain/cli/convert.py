"""``gqa-convert``: merge the K/V heads of a checkpoint into fewer groups (MHA → GQA/MQA)."""

from __future__ import annotations

import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ..io.outputs import format_bytes
from ..merging.calibration import DEFAULT_SEQ_LEN, DEFAULT_TOKENS
from ..merging.grouping import GROUPINGS
from ..merging.methods import METHODS
from ._common import console, main_for, make_app, run_command, setup_logging

if TYPE_CHECKING:
    from ..conversion import ConversionPlan

app = make_app(
    "Convert a multi-head-attention checkpoint to grouped-query attention by merging the key/value "
    "heads of each attention layer into [bold]--num-kv-heads[/] groups (Ainslie et al. 2023).\n\n"
    "Tensors stream one at a time from SOURCE into sharded safetensors, so memory stays at a few "
    "tensors whatever the model size. OUTPUT is written to a temporary folder beside it and renamed "
    "into place only when complete; a disk without room for it is refused before anything is written. "
    "[bold]--dry-run[/] shows what would be written, from the tensor headers alone."
)

Method = Enum("Method", {name: name for name in METHODS}, type=str)  # type: ignore[misc]
DType = Enum("DType", {n: n for n in ("float32", "float16", "bfloat16")}, type=str)  # type: ignore[misc]

IO = "Input / output"
CONV = "Conversion"
HUB = "Hugging Face Hub"
CAL = "Calibration"
Grouping = Enum("Grouping", {n: n for n in GROUPINGS}, type=str)  # type: ignore[misc]


@app.command()
def convert(
    source: Annotated[
        str,
        typer.Argument(
            help="Checkpoint to convert: a local folder (safetensors, sharded with an index, or GGUF), "
            "a .gguf file, or a Hub repo id such as [cyan]meta-llama/Llama-2-7b-hf[/].",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path, typer.Argument(help="Folder to write the converted checkpoint to.", show_default=False)
    ],
    num_kv_heads: Annotated[
        int,
        typer.Option(
            "--num-kv-heads",
            "-g",
            help="Key/value heads per layer after conversion (G). Must divide the current number: "
            "1 gives multi-query attention (MQA); the current number copies the model unchanged.",
            rich_help_panel=CONV,
            show_default=False,
        ),
    ],
    method: Annotated[
        Method | None,
        typer.Option(
            help="How a group of K/V heads becomes one: [bold]aligned[/] fits the shared head to the "
            "group's keys and values on --calibration text and folds each head's map into its query "
            "rows and output columns (no extra inference cost; far closer to the original); "
            "[bold]mean[/] averages them (the paper's method); [bold]first[/] keeps each group's first "
            "head; [bold]random[/] draws new heads at random (the paper's ablations). "
            "Default: aligned when --calibration is given, else mean. "
            "What each family gets from aligned: every decoder family is calibrated layer by layer and "
            "refined (--refine); families with K norms (Qwen3, OLMo2, StableLM with qk_layernorm) start "
            "their keys from mean pooling, since a norm after the key projection makes no fold into Q "
            "exact, and refinement then trains keys, norms and all; T5 (encoder-decoder) cannot run layer "
            "by layer here and is fitted from its weights alone, not refined. The model card records "
            "which applied.",
            rich_help_panel=CONV,
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for --method random.", rich_help_panel=CONV)] = 0,
    calibration: Annotated[
        str | None,
        typer.Option(
            help="Text to calibrate on: a local text file or folder (.txt/.md/.rst), or a dataset spec as "
            "in gqa-uptrain. Needed by --method aligned and --grouping similarity. Cost: about two "
            "forward passes of the model over the calibration tokens, a closed-form fit per layer, and "
            "the refinement (--refine-steps); memory: one decoder layer plus the activations of the "
            "calibration tokens (tokens × hidden size × 4 bytes), whatever the model size. Example: "
            "SmolLM2-135M 3 → 1 with --calibration-tokens 8192 --calibration-seq-len 256 takes 210 s "
            "on 2 CPU cores (90.6% of mean pooling's loss removed); at the defaults about 22 minutes (95.0%).",
            rich_help_panel=CAL,
            show_default=False,
        ),
    ] = None,
    calibration_tokens: Annotated[
        int,
        typer.Option(
            help="Tokens of --calibration text to use (cut into blocks of up to 512). Time grows linearly.",
            rich_help_panel=CAL,
            min=1,
        ),
    ] = DEFAULT_TOKENS,
    calibration_seq_len: Annotated[
        int,
        typer.Option(
            help="Length of the calibration blocks the text is cut into (at most the model's context). "
            "Longer blocks show the fit longer-range attention; refinement trains on batches of 4 blocks, "
            "so its steps cost more (SmolLM2: 256 → 512 more than doubles a step).",
            rich_help_panel=CAL,
            min=2,
        ),
    ] = DEFAULT_SEQ_LEN,
    grouping: Annotated[
        Grouping,
        typer.Option(
            help="Which K/V heads share a group: [bold]contiguous[/] runs of heads (the paper); "
            "[bold]similarity[/] picks equal-size groups that merge best on the --calibration text, "
            "then permutes whole heads (Q, K, V, O, biases, norms together; function unchanged) "
            "so each group is contiguous.",
            rich_help_panel=CAL,
        ),
    ] = "contiguous",  # type: ignore[assignment]
    refine: Annotated[
        bool | None,
        typer.Option(
            "--refine/--no-refine",
            help="Layer-wise refinement after the closed-form fit: each merged attention layer in turn is "
            "trained (Adam, --refine-steps at most, stopping early when it stops improving) to reproduce the "
            "original layer's output on the --calibration text, its inputs taken from the layers already "
            "converted. It recovers most of what merging loses before any uptraining "
            "(results/merging.md) and never makes a layer worse than the fit it starts from; the output is "
            "the same plain GQA checkpoint. Default: on whenever the method is calibrated "
            "(--calibration with aligned, or --grouping similarity). Memory: one decoder layer plus about "
            "3 × calibration tokens × hidden size × 4 bytes. Families that cannot run layer by layer (T5) "
            "are fitted from the weights alone and not refined.",
            rich_help_panel=CAL,
            show_default=False,
        ),
    ] = None,
    refine_steps: Annotated[
        int | None,
        typer.Option(
            help="Refinement budget: most Adam steps per attention layer (each on a batch of 4 calibration "
            "blocks; a sixteenth of the blocks (at least one batch) is held out, and a layer stops early "
            "once its error there stops falling), and never more than 20 passes over the training batches. "
            "Default 260: SmolLM2 3 → 1 at the calibration defaults removes 95.1% of what mean pooling "
            "loses in about 10 minutes on 2 CPU cores. Time grows with it: "
            "SmolLM2 3 → 1 with --calibration-tokens 8192 --calibration-seq-len 256 takes 210 s on 2 CPU "
            "cores (140 steps per layer: the 20-pass cap; 90.6% removed). Implies --refine.",
            rich_help_panel=CAL,
            min=0,
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Where calibration, the closed-form fits and refinement compute: [bold]auto[/] (the first "
            "CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N. One decoder layer at a time "
            "moves onto it; refinement trains in bf16 autocast on GPUs (weights, error checks and "
            "least-squares solves stay float32/float64). Writing the checkpoint stays on the host.",
            rich_help_panel=CAL,
        ),
    ] = "auto",
    max_device_memory: Annotated[
        str | None,
        typer.Option(
            help="Most memory the calibrated path may keep on --device, e.g. 20GB. Default: 90% of the "
            "GPU's free memory (no limit on the CPU). Calibration activations that do not fit next to the "
            "layer at work live in (pinned) host memory instead, one batch moved over at a time; the log "
            "says which.",
            rich_help_panel=CAL,
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        DType | None,
        typer.Option(
            help="Cast floating-point weights to this dtype. Default: keep the source's dtype; a quantized "
            "GGUF source is written in bfloat16 (float16/bfloat16/float32 GGUFs as they are).",
            rich_help_panel=IO,
            show_default=False,
        ),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option(help="Largest output shard, e.g. 5GB or 500MB.", rich_help_panel=IO)
    ] = "5GB",
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace OUTPUT if it exists and is not empty (it is replaced only once the new "
            "checkpoint is complete).",
            rich_help_panel=IO,
        ),
    ] = False,
    gguf_file: Annotated[
        str | None,
        typer.Option(help="Which GGUF file in SOURCE to read, when it holds several.", rich_help_panel=IO),
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            help="Accept pickled pytorch_model*.bin weights (loaded with torch weights_only=True). "
            "Off by default: pickles can run code.",
            rich_help_panel=IO,
        ),
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(
            help="Hub branch, tag or commit of SOURCE. The token comes from HF_TOKEN or `hf auth login`.",
            rich_help_panel=HUB,
        ),
    ] = None,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            metavar="REPO_ID",
            help="After converting, check OUTPUT and upload it to this Hub model repo (OWNER/NAME), created "
            "if needed; checked before converting. For --private, --revision, --create-pr or eval results "
            "use gqa-export.",
            rich_help_panel=HUB,
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Plan the conversion from SOURCE's tensor headers without reading tensor data or writing "
            "anything: check SOURCE, --num-kv-heads, OUTPUT and its free disk space as a real run would, "
            "and show the head counts, KV-cache saving and the files and bytes it would write. Takes "
            "seconds whatever the model size: a Hub SOURCE is planned from its config.json and the headers "
            "of its safetensors files (HTTP range reads), never its weights. With --calibration it also "
            "shows the calibrated path's peak host and device memory and an estimated time, from a few "
            "refinement steps of one synthetic layer at the real width timed on --device.",
            rich_help_panel=IO,
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary table.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Convert SOURCE to grouped-query attention with --num-kv-heads K/V heads and write OUTPUT."""
    setup_logging(verbose)
    from ..conversion import convert as run

    if dry_run:
        from ..conversion import plan_conversion

        # With calibration text the plan also estimates the calibrated path (memory and time).
        calibrated = calibration is not None and (
            method is None or method.value == "aligned" or grouping.value == "similarity"
        )
        plan_steps = 0
        if calibrated and refine is not False:
            plan_steps = refine_steps if refine_steps is not None else _default_refine_steps()
        plan = run_command(
            lambda: plan_conversion(
                source,
                num_kv_heads,
                output=output,
                overwrite=overwrite,
                dtype=dtype.value if dtype else None,
                max_shard_size=max_shard_size,
                revision=revision,
                gguf_file=gguf_file,
                allow_pickle=allow_pickle,
                calibration_tokens=calibration_tokens if calibrated else None,
                calibration_seq_len=calibration_seq_len,
                refine_steps=plan_steps,
                device=device,
                max_device_memory=max_device_memory,
            )
        )
        if not quiet:
            _print_plan(plan, output)
        return
    command = "gqa-convert " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    # With calibration data, aligned is the better method (results/merging.md): make it the default.
    method_name = method.value if method else ("aligned" if calibration else "mean")
    if refine is False and refine_steps:
        raise typer.BadParameter(
            "--refine-steps needs refinement; drop --no-refine", param_hint="--refine-steps"
        )
    refine_arg: bool | int | None = (
        refine_steps if refine_steps is not None and refine is not False else refine
    )
    if push_to_hub:  # no token or a bad repo id: fail before the conversion, not after it
        from ..hub.publish import check_push_target, push_folder

        run_command(lambda: check_push_target(push_to_hub))
    result = run_command(
        lambda: run(
            source,
            output,
            num_kv_heads,
            method_name,
            calibration=calibration,
            calibration_tokens=calibration_tokens if calibration else None,
            calibration_seq_len=calibration_seq_len if calibration else None,
            grouping=grouping.value,
            refine=refine_arg,
            device=device,
            max_device_memory=max_device_memory,
            revision=revision,
            gguf_file=gguf_file,
            allow_pickle=allow_pickle,
            dtype=dtype.value if dtype else None,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            seed=seed,
            command=command,
            progress=not quiet,
        )
    )
    if push_to_hub:
        pushed = run_command(lambda: push_folder(result.output, push_to_hub, command=command))
        console.print(f"uploaded to [bold]{pushed.url}[/]", highlight=False)
    if quiet:
        return
    table = Table(
        title=f"{result.architecture}: {result.num_kv_heads_before} → {result.num_kv_heads_after} K/V heads ({result.method})"
    )
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("query heads", str(result.num_heads), str(result.num_heads))
    table.add_row("K/V heads", str(result.num_kv_heads_before), str(result.num_kv_heads_after))
    table.add_row("parameters", f"{result.params_before:,}", f"{result.params_after:,}")
    table.add_row(
        f"KV cache / token ({result.dtype})",
        format_bytes(result.kv_bytes_per_token_before),
        format_bytes(result.kv_bytes_per_token_after),
    )
    console.print(table)
    console.print(
        f"KV cache {100 * result.kv_reduction:.1f}% smaller · {result.seconds:.1f}s · written to [bold]{result.output}[/]"
    )
    if result.needs_trust_remote_code:
        console.print(
            f"[yellow]{result.architecture} has no GQA in transformers:[/] load with trust_remote_code=True "
            "(or call gqa_uptrain.register_auto_classes() first)."
        )


def _default_refine_steps() -> int:
    """The refinement budget a run uses when --refine-steps is not given."""
    from ..merging.refine import RefineSpec

    return RefineSpec().steps


def _print_calibrated(plan: ConversionPlan) -> None:
    """The calibrated path's line of the plan: peak memory and the estimated time."""
    est = plan.calibrated
    if est is None:
        return
    what = (
        f"aligned + refinement (at most {est.refine_steps} steps per module)"
        if est.refine_steps
        else "aligned, closed form"
    )
    memory = f"peak host memory ~{format_bytes(est.host_peak_bytes)}"
    if est.device_peak_bytes is not None:
        where = "on the device" if est.activations_on_device else "in host memory"
        memory += f", device memory ~{format_bytes(est.device_peak_bytes)} (activations {where})"
    console.print(
        f"calibrated path on {est.device} ({what}, {est.tokens:,} tokens in blocks of {est.seq_len}): {memory}",
        highlight=False,
    )
    if est.seconds is not None and est.timing is not None:
        console.print(
            f"estimated time ~{_duration(est.seconds)} ({_duration(est.seconds_per_layer or 0)} per layer x "
            f"{est.layers}), from {est.timing.what}: {est.timing.step_seconds:.3g} s per step",
            highlight=False,
        )


def _duration(seconds: float) -> str:
    """``42 s``, ``7.5 min`` or ``3.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _print_plan(plan: ConversionPlan, output: Path) -> None:
    """``--dry-run``'s report: head counts, KV cache, and the files and bytes a run would write."""
    from ..io.outputs import free_bytes

    table = Table(
        title=f"dry run: {plan.architecture}: {plan.num_kv_heads_before} → {plan.num_kv_heads_after} K/V heads"
    )
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("query heads", str(plan.num_heads), str(plan.num_heads))
    table.add_row("K/V heads", str(plan.num_kv_heads_before), str(plan.num_kv_heads_after))
    table.add_row("parameters", f"{plan.params_before:,}", f"{plan.params_after:,}")
    table.add_row("tensor data", format_bytes(plan.input_bytes), format_bytes(plan.tensor_bytes))
    table.add_row(
        f"KV cache / token ({plan.dtype})",
        format_bytes(plan.kv_bytes_per_token_before),
        format_bytes(plan.kv_bytes_per_token_after),
    )
    console.print(table)
    if len(plan.shards) <= 4:
        files = ", ".join(f"{name} ({format_bytes(size)})" for name, size in plan.shards)
    else:  # a 70B model has dozens of shards: summarise them
        largest = max(size for _, size in plan.shards)
        files = f"{len(plan.shards) - 1} shards of up to {format_bytes(largest)} and {plan.shards[-1][0]}"
    console.print(f"would write {len(plan.tensors)} tensors to {files}", highlight=False)
    free = free_bytes(output.absolute().parent)
    console.print(
        f"KV cache {100 * plan.kv_reduction:.1f}% smaller · OUTPUT needs {format_bytes(plan.output_bytes)}"
        + (f" of {format_bytes(free)} free" if free is not None else "")
        + f" · nothing written to [bold]{output}[/]",
        highlight=False,
    )
    _print_calibrated(plan)


main = main_for(app)

if __name__ == "__main__":
    main()
