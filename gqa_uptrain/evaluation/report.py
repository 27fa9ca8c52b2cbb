"""Presenting an :class:`EvalReport`: a rich table, a JSON file and PNG charts."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from ..io.outputs import atomic_output_dir, atomic_write_text
from .run import EvalReport, ModelEval

logger = logging.getLogger(__name__)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _rows(m: ModelEval) -> dict[str, str]:
    """Metric name -> formatted value for one model (the table's column)."""
    lay = m.layout
    rows = {
        "attention": f"{lay.attention} ({lay.num_attention_heads} query / {lay.num_kv_heads} K/V heads)",
        "parameters": f"{m.parameters / 1e6:.2f}M",
        "KV cache per token": human_bytes(lay.bytes_per_token),
    }
    for c in m.kv_checks:
        mark = (
            "[green](= allocated)[/]"
            if c.match
            else f"[red](MISMATCH: generate's cache holds {human_bytes(c.allocated_bytes)}, "
            f"config predicts {human_bytes(c.expected_bytes)})[/]"
        )
        rows[f"KV cache @ ctx {c.context} x batch {c.batch}"] = f"{human_bytes(c.computed_bytes)} {mark}"
    if m.perplexity is not None:
        p = m.perplexity
        rows["perplexity"] = (
            f"{p.perplexity:.3f} ({p.tokens_scored} tokens, window {p.max_length}/{p.stride})"
        )
    for r in m.round_trips:
        left = f"; {len(r.left_as_they_are)} weights left as they are" if r.left_as_they_are else ""
        rows[f"perplexity after {r.fmt} round trip"] = (
            f"{r.perplexity.perplexity:.3f} ({100 * (r.relative_to_unrounded - 1):+.2f}% vs {m.dtype} weights; "
            f"{r.tensors_rounded} weights rounded{left})"
        )
    if m.weights is not None:
        attn, lin = m.weights.get("attention_max_abs"), m.weights.get("linear_max_abs")
        rows["max |weight|: attention / all linear"] = " / ".join(
            "n/a" if v is None else f"{v:.4g}" for v in (attn, lin)
        )
    for s in m.speed:
        key = f"ctx {s.context} x batch {s.batch}, {s.path}"
        rows[f"first token @ {key}"] = f"{1000 * s.time_to_first_token_s:.1f} ms"
        rows[f"decode @ {key}"] = f"{s.decode_tokens_per_s:.1f} tokens/s"
        rows[f"peak memory @ {key}"] = human_bytes(s.peak_memory_bytes)
    for lb in m.largest_batches:
        peak = f", peak {human_bytes(lb.peak_bytes)}" if lb.peak_bytes else ""
        rows[f"largest batch @ ctx {lb.context} in {human_bytes(lb.budget_bytes)}"] = (
            f"{lb.largest_batch} (computed cache allows {lb.kv_bound}{peak})"
        )
    return rows


def _ratio(key: str, m: ModelEval, b: ModelEval) -> str:
    """model / baseline for the rows where a ratio means something."""
    if key == "KV cache per token":
        return f"{m.layout.bytes_per_token / b.layout.bytes_per_token:.3f}x"
    if key == "perplexity" and m.perplexity and b.perplexity:
        return f"{m.perplexity.perplexity / b.perplexity.perplexity:.3f}x"
    for rm in m.round_trips:
        rb = next((r for r in b.round_trips if r.fmt == rm.fmt), None)
        if rb is not None and key == f"perplexity after {rm.fmt} round trip":
            return f"{rm.perplexity.perplexity / rb.perplexity.perplexity:.3f}x"
    if key.startswith("max |weight|") and m.weights and b.weights:
        a, ab = m.weights.get("attention_max_abs"), b.weights.get("attention_max_abs")
        return f"{a / ab:.2f}x (attention)" if a is not None and ab else ""
    for lm, lb in zip(m.largest_batches, b.largest_batches, strict=False):
        if key == f"largest batch @ ctx {lm.context} in {human_bytes(lm.budget_bytes)}" and lb.largest_batch:
            return f"{lm.largest_batch / lb.largest_batch:.2f}x"
    for sm, sb in zip(m.speed, b.speed, strict=False):
        k = f"ctx {sm.context} x batch {sm.batch}, {sm.path}"
        if key == f"decode @ {k}":
            return f"{sm.decode_tokens_per_s / sb.decode_tokens_per_s:.2f}x"
        if key == f"first token @ {k}":
            return f"{sm.time_to_first_token_s / sb.time_to_first_token_s:.2f}x"
        if key == f"peak memory @ {k}" and sb.peak_memory_bytes > 0:
            return f"{sm.peak_memory_bytes / sb.peak_memory_bytes:.2f}x"
    for cm, cb in zip(m.kv_checks, b.kv_checks, strict=False):
        if key == f"KV cache @ ctx {cm.context} x batch {cm.batch}":
            return f"{cm.computed_bytes / cb.computed_bytes:.3f}x"
    return ""


def report_table(report: EvalReport) -> Table:
    """A rich table: one row per metric, one column per model, plus model/baseline ratios."""
    table = Table(title="gqa-eval", show_lines=False)
    table.add_column("metric", style="bold")
    for m in report.models:
        table.add_column(f"{m.role}\n{m.name}", overflow="fold")
    base = report.baseline
    if base is not None:
        table.add_column("model / baseline", justify="right")
    columns = [_rows(m) for m in report.models]
    for key in columns[0]:
        cells = [c.get(key, "") for c in columns]
        if base is not None:
            cells.append(_ratio(key, report.model, base))
        table.add_row(key, *cells)
    return table


def write_json(report: EvalReport, path: str | os.PathLike) -> Path:
    """Write the report as JSON (atomically)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
    return path


@dataclass
class SpeedSeries:
    """One model's decode figures for :func:`speed_figure`: (context, batch, path, tokens/s) points."""

    role: str  # "model" or "baseline": solid or dashed line
    label: str
    points: list[tuple[int, int, str, float]]


def speed_figure(series: list[SpeedSeries], title: str) -> tuple[Any, str]:
    """Decode tokens/s as a line chart people can read; returns (figure, file name).

    One context measured: tokens/s against batch (``tokens_per_s_vs_batch.png``); otherwise against
    context, one line per batch (``tokens_per_s_vs_context.png``). A colour per batch (or per decode
    path), shared by model and baseline: the model solid, the baseline dashed, so each pair reads
    side by side.
    """
    import matplotlib.pyplot as plt

    contexts = sorted({p[0] for s in series for p in s.points})
    by_batch = len(contexts) == 1
    keys = sorted({(p[2], p[1]) if not by_batch else (p[2], 0) for s in series for p in s.points})
    colours = {k: f"C{i % 10}" for i, k in enumerate(keys)}
    paths = {p[2] for s in series for p in s.points}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for s in series:
        for key in keys:
            path, batch = key
            pts = sorted(
                (p[1], p[3]) if by_batch else (p[0], p[3])
                for p in s.points
                if p[2] == path and (by_batch or p[1] == batch)
            )
            if not pts:
                continue
            label = (
                s.label + (f", {path}" if len(paths) > 1 else "") + ("" if by_batch else f", batch {batch}")
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                color=colours[key],
                linestyle="-" if s.role == "model" else "--",
                label=label,
            )
    if by_batch:
        ax.set_xlabel("batch (sequences decoded together)")
        ax.set_title(f"{title} at context {contexts[0]}")
        batches = sorted({p[1] for s in series for p in s.points})
        if len(batches) > 2 and batches[-1] / batches[0] >= 8:
            ax.set_xscale("log", base=2)
        name = "tokens_per_s_vs_batch.png"
    else:
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"{title} vs context")
        name = "tokens_per_s_vs_context.png"
    ax.set_ylabel("decode tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, name


def write_plots(report: EvalReport, folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Write PNG charts into ``folder`` (created atomically): perplexity vs KV cache, tokens/s vs context.

    The perplexity chart needs perplexity (``--data``); the speed chart needs speed runs. Returns the
    paths written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    names: list[str] = []
    with atomic_output_dir(folder, overwrite=overwrite) as tmp:
        with_ppl = [m for m in report.models if m.perplexity is not None]
        if with_ppl:
            fig, ax = plt.subplots(figsize=(6, 4))
            for m in with_ppl:
                x = m.layout.bytes_per_token / 1024
                ax.scatter([x], [m.perplexity.perplexity], s=60, label=f"{m.role}: {m.layout.attention}")
                ax.annotate(
                    f"{m.layout.num_kv_heads} K/V heads",
                    (x, m.perplexity.perplexity),
                    textcoords="offset points",
                    xytext=(6, 6),
                )
            ax.set_xlabel("KV cache per token (KiB)")
            ax.set_ylabel("perplexity")
            ax.set_title("Perplexity vs KV-cache size")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(tmp / "perplexity_vs_kv_cache.png", dpi=120)
            plt.close(fig)
            names.append("perplexity_vs_kv_cache.png")
        if any(m.speed for m in report.models):
            series = [
                SpeedSeries(
                    role=m.role,
                    label=f"{m.role} ({m.layout.attention}, {m.layout.num_kv_heads} K/V)",
                    points=[(s.context, s.batch, s.path, s.decode_tokens_per_s) for s in m.speed],
                )
                for m in report.models
            ]
            fig, name = speed_figure(series, "Greedy decode speed (transformers)")
            fig.savefig(tmp / name, dpi=120)
            plt.close(fig)
            names.append(name)
    paths = [Path(folder) / n for n in names]
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths


def engine_table(report: Any) -> Table:
    """A rich table of an :class:`~gqa_uptrain.evaluation.llama_cpp.EngineReport` (llama.cpp's figures)."""
    o = report.options
    table = Table(
        title=f"gqa-eval --engine llama.cpp ({o.get('threads')} threads, flash attention {o.get('flash_attn', 'auto')})",
        show_lines=False,
    )
    table.add_column("metric", style="bold")
    for m in report.models:
        table.add_column(f"{m.role}\n{m.name}", overflow="fold")
    base = report.baseline
    if base is not None:
        table.add_column("model / baseline", justify="right")

    def rows(m: Any) -> dict[str, tuple[str, float | None]]:
        lay = m.layout
        out: dict[str, tuple[str, float | None]] = {
            "attention": (
                f"{lay.attention} ({lay.num_attention_heads} query / {lay.num_kv_heads} K/V heads)",
                None,
            ),
            "GGUF": (f"{lay.description}, {human_bytes(lay.file_bytes)}", lay.file_bytes),
        }
        if m.perplexity is not None:
            p = m.perplexity
            out["perplexity"] = (
                f"{p.perplexity:.3f} ({p.tokens_scored} tokens, window {p.max_length}/{p.stride})",
                p.perplexity,
            )
        for s in m.speed:
            key = f"ctx {s.context} x {s.sequences} seq"
            mark = "= computed" if s.kv.match else f"computed {human_bytes(s.kv.computed_bytes)}"
            out[f"KV cache @ {key}"] = (
                f"{human_bytes(s.kv.allocated_bytes)} allocated, {s.kv.k_type} ({mark})",
                s.kv.allocated_bytes,
            )
            out[f"prompt @ {key}"] = (f"{s.prompt_tokens_per_s:.1f} tokens/s", s.prompt_tokens_per_s)
            runs = ", ".join(f"{r:.1f}" for r in s.decode_runs_tokens_per_s)
            out[f"decode @ {key}"] = (
                f"{s.decode_tokens_per_s:.1f} tokens/s (runs {runs})",
                s.decode_tokens_per_s,
            )
        return out

    columns = [rows(m) for m in report.models]
    for key in columns[0]:
        cells = [c.get(key, ("", None))[0] for c in columns]
        if base is not None:
            a, b = columns[0].get(key, ("", None))[1], columns[1].get(key, ("", None))[1]
            cells.append(f"{a / b:.3f}x" if a is not None and b else "")
        table.add_row(key, *cells)
    return table


def write_engine_plots(report: Any, folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """The decode-speed chart of an engine report (see :func:`speed_figure`), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    with atomic_output_dir(folder, overwrite=overwrite) as tmp:
        series = [
            SpeedSeries(
                role=m.role,
                label=f"{m.role} ({m.layout.attention}, {m.layout.num_kv_heads} K/V)",
                points=[(s.context, s.sequences, "llama.cpp", s.decode_tokens_per_s) for s in m.speed],
            )
            for m in report.models
            if m.speed
        ]
        if series:
            fig, name = speed_figure(series, "Decode speed in llama.cpp")
            fig.savefig(tmp / name, dpi=120)
            plt.close(fig)
            names.append(name)
    return [Path(folder) / n for n in names]
