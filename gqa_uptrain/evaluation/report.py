"""Presenting an :class:`EvalReport`: a rich table, a JSON file and PNG charts."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

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
        key = f"ctx {s.context} x batch {s.batch}"
        rows[f"first token @ {key}"] = f"{1000 * s.time_to_first_token_s:.1f} ms"
        rows[f"decode @ {key}"] = f"{s.decode_tokens_per_s:.1f} tokens/s"
        rows[f"peak memory @ {key}"] = human_bytes(s.peak_memory_bytes)
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
    for sm, sb in zip(m.speed, b.speed, strict=False):
        k = f"ctx {sm.context} x batch {sm.batch}"
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
            fig, ax = plt.subplots(figsize=(6, 4))
            for m in report.models:
                for batch in sorted({s.batch for s in m.speed}):
                    pts = sorted((s.context, s.decode_tokens_per_s) for s in m.speed if s.batch == batch)
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        marker="o",
                        label=f"{m.role} ({m.layout.attention}, {m.layout.num_kv_heads} K/V), batch {batch}",
                    )
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("decode tokens/s")
            ax.set_title("Greedy decode speed vs context length")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(tmp / "tokens_per_s_vs_context.png", dpi=120)
            plt.close(fig)
            names.append("tokens_per_s_vs_context.png")
    paths = [Path(folder) / n for n in names]
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths
