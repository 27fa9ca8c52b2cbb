"""``gqa-eval``: what a converted model saves (KV cache, decode time, memory) and what it costs (perplexity)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError, OutputExistsError
from ..io.outputs import check_output_dir
from ._common import console, main_for, make_app, run_command, setup_logging

app = make_app(
    "Measure a model, and optionally its original side by side: KV-cache bytes (computed from the config "
    "and checked against the cache generation allocates), greedy decode speed and time to first token, "
    "peak memory of generation, and perplexity on a dataset with strided windows."
)

DType = Enum("DType", {n: n for n in ("auto", "float32", "bfloat16", "float16")}, type=str)  # type: ignore[misc]
SampleBy = Enum("SampleBy", {n: n for n in ("document", "paragraph", "line")}, type=str)  # type: ignore[misc]
Engine = Enum("Engine", {n: n for n in ("transformers", "llama.cpp")}, type=str)  # type: ignore[misc]
FlashAttn = Enum("FlashAttn", {n: n for n in ("auto", "on", "off")}, type=str)  # type: ignore[misc]
RoundTrip = Enum("RoundTrip", {n: n for n in ("bf16", "q8_0")}, type=str)  # type: ignore[misc]

_MODELS = "Models"
_DATA = "Data (perplexity; the same options as uptraining)"
_PPL = "Perplexity"
_SPEED = "KV cache and decode speed"
_RUN = "Device"
_OUT = "Output"


def _int_list(value: str, option: str) -> list[int]:
    """'128,512' -> [128, 512], with a one-line error naming the option."""
    try:
        items = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers like 128,512; got {value!r}") from None
    if not items:
        raise ConfigError(f"{option} needs at least one integer; got {value!r}")
    return items


@app.command()
def evaluate(
    model: Annotated[
        str,
        typer.Argument(
            help="Model to measure: a checkpoint folder or a Hub id. A folder whose config.json has an auto_map "
            "loads with its own modelling code; a Hub repo's code runs only with --trust-remote-code. With "
            "--engine llama.cpp: a GGUF file.",
            show_default=False,
        ),
    ],
    engine: Annotated[
        Engine,
        typer.Option(
            help="Who runs the model: transformers (checkpoint folders), or llama.cpp (GGUF files, e.g. from "
            "llama.cpp's convert_hf_to_gguf.py; CPU): perplexity, prompt and decode tokens/s with --batch-size "
            "parallel sequences of --context tokens each, and the KV cache llama.cpp allocates.",
            rich_help_panel=_MODELS,
        ),
    ] = "transformers",  # type: ignore[assignment]
    threads: Annotated[
        int | None,
        typer.Option(help="--engine llama.cpp: CPU threads (default: all cores).", rich_help_panel=_MODELS),
    ] = None,
    flash_attn: Annotated[
        FlashAttn,
        typer.Option(
            help="--engine llama.cpp: flash attention (llama.cpp's -fa): auto is llama.cpp's own choice, on/off "
            "force it. It changes how decode reads the KV cache, so the GQA gain: the report names it.",
            rich_help_panel=_MODELS,
        ),
    ] = "auto",  # type: ignore[assignment]
    baseline: Annotated[
        str | None,
        typer.Option(
            help="The original model, measured with the same settings and shown side by side.",
            rich_help_panel=_MODELS,
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool | None,
        typer.Option(
            "--trust-remote-code/--no-trust-remote-code",
            help="Run the modelling code the checkpoints ship (auto_map). Default: yes for a local folder that "
            "ships it, no for a Hub repo; gqa-convert's GQA families load without it either way.",
            rich_help_panel=_MODELS,
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            help="Text for perplexity: a Hub dataset id, or local text/JSON lines/Parquet/CSV files, folders or globs "
            "(repeat for several). Leave out to skip perplexity.",
            rich_help_panel=_DATA,
        ),
    ] = None,
    data_name: Annotated[
        str | None, typer.Option(help="Hub dataset configuration name.", rich_help_panel=_DATA)
    ] = None,
    split: Annotated[
        str,
        typer.Option(help="Dataset split (Hub datasets; local files are one split).", rich_help_panel=_DATA),
    ] = "train",
    text_column: Annotated[
        str, typer.Option(help="Column that holds the text.", rich_help_panel=_DATA)
    ] = "text",
    streaming: Annotated[
        bool, typer.Option(help="Stream the dataset instead of downloading it whole.", rich_help_panel=_DATA)
    ] = False,
    sample_by: Annotated[
        SampleBy,
        typer.Option(
            help="Plain-text files: one document per file, per blank-line paragraph, or per line.",
            rich_help_panel=_DATA,
        ),
    ] = "document",  # type: ignore[assignment]
    max_documents: Annotated[
        int | None, typer.Option(help="Read at most this many documents.", rich_help_panel=_DATA)
    ] = None,
    held_out: Annotated[
        bool,
        typer.Option(
            help="Measure on the documents uptraining holds out of the data (same --eval-fraction/--eval-documents/"
            "--eval-split and --seed as the uptraining recipe), not on all of it.",
            rich_help_panel=_DATA,
        ),
    ] = False,
    eval_split: Annotated[
        str | None, typer.Option(help="With --held-out: a named held-out split.", rich_help_panel=_DATA)
    ] = None,
    eval_fraction: Annotated[
        float, typer.Option(help="With --held-out: fraction of documents held out.", rich_help_panel=_DATA)
    ] = 0.05,
    eval_documents: Annotated[
        int | None,
        typer.Option(
            help="With --held-out: number of documents held out (instead of a fraction).",
            rich_help_panel=_DATA,
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the held-out split and of the random prompts.", rich_help_panel=_DATA)
    ] = 0,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer to use when the checkpoint ships none.", rich_help_panel=_DATA),
    ] = None,
    max_eval_tokens: Annotated[
        int | None, typer.Option(help="Measure perplexity on at most this many tokens.", rich_help_panel=_PPL)
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            help="Perplexity window in tokens (default: the model's maximum, at most 1024).",
            rich_help_panel=_PPL,
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            help="Tokens between window starts, below --max-length (default: half the window).",
            rich_help_panel=_PPL,
        ),
    ] = None,
    ppl_batch_size: Annotated[
        int, typer.Option(help="Perplexity windows per forward pass.", rich_help_panel=_PPL)
    ] = 1,
    round_trip: Annotated[
        list[RoundTrip] | None,
        typer.Option(
            help="Also measure perplexity after rounding the weights as a deployment file stores them: bf16, or "
            "q8_0 (llama.cpp's block-wise int8). Linear and embedding weights are rounded, then restored; repeat "
            "for both. Shown next to the perplexity of the weights as loaded, with the largest attention weight.",
            rich_help_panel=_PPL,
            show_default=False,
        ),
    ] = None,
    context: Annotated[
        str,
        typer.Option(
            help="Context lengths, comma-separated, for KV-cache sizes and decode speed.",
            rich_help_panel=_SPEED,
        ),
    ] = "128,512",
    batch_size: Annotated[
        str, typer.Option(help="Batch sizes, comma-separated.", rich_help_panel=_SPEED)
    ] = "1",
    new_tokens: Annotated[
        int, typer.Option(help="Tokens generated (greedy) per timed run.", rich_help_panel=_SPEED)
    ] = 32,
    warmup: Annotated[
        int, typer.Option(help="Untimed runs before timing, per setting.", rich_help_panel=_SPEED)
    ] = 1,
    repeats: Annotated[
        int, typer.Option(help="Timed runs per setting; the median is reported.", rich_help_panel=_SPEED)
    ] = 3,
    skip_speed: Annotated[bool, typer.Option(help="Do not time generation.", rich_help_panel=_SPEED)] = False,
    decode_path: Annotated[
        str,
        typer.Option(
            help="How transformers decodes in the speed runs, comma-separated: eager (model.generate) and/or static "
            "(a static KV cache and a torch.compile'd decode step, CUDA graphs on a GPU: what a server runs; the "
            "first run of each setting compiles, untimed). Each figure is labelled with its path.",
            rich_help_panel=_SPEED,
        ),
    ] = "eager",
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Also find the largest batch that decodes at each --context within this much memory (weights, KV "
            "cache and activations; e.g. 20GiB): bounded by the computed KV cache, then measured.",
            rich_help_panel=_SPEED,
        ),
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Cap on the --memory-budget search.", rich_help_panel=_SPEED)
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto (GPU if there is one), cpu, cuda or cuda:N.", rich_help_panel=_RUN)
    ] = "auto",
    dtype: Annotated[
        DType,
        typer.Option(
            help="Weights and activations: auto is float32 on CPU, the checkpoint's dtype on a GPU.",
            rich_help_panel=_RUN,
        ),
    ] = "auto",  # type: ignore[assignment]
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Write all measurements to this JSON file.", rich_help_panel=_OUT),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write PNG charts (perplexity vs KV cache; tokens/s vs batch for one --context, else vs context) "
            "into this folder.",
            rich_help_panel=_OUT,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing --json file or --plot folder.", rich_help_panel=_OUT)
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging.", rich_help_panel=_OUT)
    ] = False,
) -> None:
    """Measure MODEL (and --baseline): KV cache, decode speed, peak memory, perplexity."""
    setup_logging(verbose)

    def body() -> None:
        from ..data.config import DataConfig
        from ..evaluation import EvalOptions
        from ..evaluation import evaluate as run_evaluation
        from ..evaluation.report import report_table, write_json, write_plots

        # Refuse to clobber outputs before spending minutes measuring.
        if json_path is not None:
            if json_path.is_dir():
                raise OutputExistsError(f"--json {json_path} is a folder; give a file path")
            if json_path.exists() and not overwrite:
                raise OutputExistsError(f"--json {json_path} exists; choose another path or pass --overwrite")
        if plot is not None:
            check_output_dir(plot, overwrite)
        data_cfg = None
        if data:
            data_cfg = DataConfig(
                source=data if len(data) > 1 else data[0],
                name=data_name,
                split=split,
                text_column=text_column,
                streaming=streaming,
                eval_split=eval_split,
                eval_fraction=eval_fraction,
                eval_documents=eval_documents,
                max_documents=max_documents,
                sample_by=SampleBy(sample_by).value,
                seed=seed,
            )
        if Engine(engine).value == "llama.cpp":
            _run_llama_cpp(data_cfg)
            return
        if FlashAttn(flash_attn).value != "auto":
            raise ConfigError("--flash-attn applies to --engine llama.cpp; leave it out")
        from ..evaluation.capacity import parse_bytes

        opts = EvalOptions(
            contexts=_int_list(context, "--context"),
            batch_sizes=_int_list(batch_size, "--batch-size"),
            new_tokens=new_tokens,
            warmup=warmup,
            repeats=repeats,
            max_length=max_length,
            stride=stride,
            ppl_batch_size=ppl_batch_size,
            round_trips=tuple(dict.fromkeys(RoundTrip(f).value for f in round_trip or ())),
            max_eval_tokens=max_eval_tokens,
            held_out=held_out,
            device=device,
            dtype=DType(dtype).value,
            skip_speed=skip_speed,
            seed=seed,
            trust_remote_code=trust_remote_code,
            decode_paths=tuple(dict.fromkeys(p for p in decode_path.replace(" ", "").split(",") if p)),
            memory_budget=parse_bytes(memory_budget) if memory_budget is not None else None,
            max_batch=max_batch,
        )
        report = run_evaluation(model, baseline=baseline, data=data_cfg, options=opts, tokenizer=tokenizer)
        console.print(report_table(report))
        if json_path is not None:
            write_json(report, json_path)
            console.print(f"wrote {json_path}")
        if plot is not None:
            for p in write_plots(report, plot, overwrite=overwrite):
                console.print(f"wrote {p}")

    def _run_llama_cpp(data_cfg: Any) -> None:
        """--engine llama.cpp: GGUF files measured in llama.cpp's engine."""
        from ..evaluation.llama_cpp import evaluate_engine
        from ..evaluation.report import engine_table, write_engine_plots, write_json
        from ..evaluation.run import eval_texts

        not_for_engine = {
            "--round-trip": bool(round_trip),
            "--decode-path static": "static" in decode_path,
            "--memory-budget": memory_budget is not None,
            "--dtype": DType(dtype).value != "auto",
            "--device": device not in ("auto", "cpu"),
            "--tokenizer": tokenizer is not None,
        }
        given = [k for k, v in not_for_engine.items() if v]
        if given:
            raise ConfigError(
                f"{', '.join(given)} apply to --engine transformers; llama.cpp runs the GGUF as stored, on the CPU "
                "with its own tokenizer: leave them out"
            )
        report = evaluate_engine(
            model,
            baseline=baseline,
            texts=eval_texts(data_cfg, held_out) if data_cfg is not None else None,
            contexts=_int_list(context, "--context"),
            sequences=_int_list(batch_size, "--batch-size"),
            new_tokens=new_tokens,
            warmup=warmup,
            repeats=repeats,
            threads=threads,
            flash_attn=FlashAttn(flash_attn).value,
            max_length=max_length or 512,
            stride=stride,
            max_eval_tokens=max_eval_tokens,
            skip_speed=skip_speed,
            seed=seed,
        )
        console.print(engine_table(report))
        if json_path is not None:
            write_json(report, json_path)
            console.print(f"wrote {json_path}")
        if plot is not None:
            for p in write_engine_plots(report, plot, overwrite=overwrite):
                console.print(f"wrote {p}")

    run_command(body)


main = main_for(app)
