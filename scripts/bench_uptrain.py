#!/usr/bin/env python
"""Tokens/s and MFU of ``gqa-uptrain``'s loop in each speed mode against a plain Hugging Face ``Trainer``.

Every mode trains the same model on the same packed blocks (tokenized once by
``gqa_uptrain.data.text``) with the same batch, accumulation, optimizer (fused AdamW), schedule
(warmup + cosine), clipping and precision (bf16 autocast on a GPU, float32 on CPU):

    trainer   transformers.Trainer, full-parameter                     (the baseline)
    eager     gqa-uptrain, plain loss from the [B, T, V] logits, no torch.compile
    chunked   gqa-uptrain, chunked loss (speed.loss_chunk_tokens), no torch.compile
    compiled  gqa-uptrain, chunked loss and torch.compile (the GPU default)
    lora      gqa-uptrain, LoRA r=16 on the attention projections, chunked loss
    qlora     gqa-uptrain, QLoRA (4-bit NF4 base, bitsandbytes), chunked loss

Fair timing: each run takes ``--warmup`` steps (compilation, allocator, caches) that are not
timed, then ``--steps`` timed steps, on both sides alike: ours between its sync points after step
``warmup`` and after the last step (the loop reads back only there), the Trainer's between the end
of step ``warmup`` and the end of training, with a device synchronisation at both ends. Modes are
run in turn, ``--repeats`` times in rotated order, and the best of each is kept, so a busy machine
penalises all alike.

MFU = model FLOPs per token × tokens/s ÷ peak. Model FLOPs per token: 6·N (N = the weights of
the matrix products, the LM head included) + 12·layers·hidden·block for attention scores; LoRA
and QLoRA do no weight-gradient product for the frozen base: 4·N + 6·N_adapters. The peak is the
GPU's dense bf16 figure, or on CPU the float32 matrix-product rate measured here (a 2048² matmul),
so the CPU MFU reads "of what this CPU's matmul reaches".

    python scripts/bench_uptrain.py                            # tiny-CPU recipe's shape (SmolLM2-135M MQA)
    python scripts/bench_uptrain.py --preset 1b --block-size 2048 --batch-size 8   # on a GPU
    python scripts/bench_uptrain.py --modes trainer,eager,lora --json out.json --explain

Targets: on CPU, compiled and chunked at least as fast as eager; on one H100/H200, a ~1B Llama at
>= 45% MFU and >= 1.3x the Trainer.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

DOCS = Path("/usr/share/doc/python3.11/html/_sources/library")
REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40": 181.0}
MODES = ("trainer", "eager", "chunked", "compiled", "lora", "qlora")
# Model shapes: hidden, layers, heads, kv heads, intermediate, vocab (random weights: speed depends on shape only).
PRESETS = {
    "tiny": (64, 2, 4, 2, 128, 512),
    "smollm2": (576, 30, 9, 1, 1536, 49152),  # SmolLM2-135M converted to MQA: recipes/tiny-cpu.yaml's model
    "1b": (2048, 16, 32, 8, 8192, 32000),  # a ~1B GQA Llama (Llama-3.2-1B's shape, Llama-2's vocabulary)
    "7b-width": (4096, 2, 32, 8, 11008, 32000),  # Llama-2-7B GQA-8 at reduced depth
}


def text_folder(root: Path) -> Path:
    """Real English text: python3.11-doc where installed, else this repository's own docs and code."""
    if DOCS.is_dir():
        return DOCS
    out = root / "text"
    out.mkdir(parents=True, exist_ok=True)
    files = (
        sorted(REPO.glob("*.md"))
        + sorted(REPO.glob("results/*.md"))
        + sorted(REPO.rglob("gqa_uptrain/**/*.py"))
    )
    for i, f in enumerate(files):
        shutil.copy(f, out / f"{i:04d}.txt")
    return out


def build_world(root: Path, preset: str) -> Path:
    """A BPE tokenizer trained on the text and a random GQA Llama of ``preset``'s shape in ``root/model``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, layers, heads, kv, inter, vocab = PRESETS[preset]
    text = text_folder(root)
    files = sorted(str(f) for f in text.iterdir())[:120]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(
        files,
        trainers.BpeTrainer(
            vocab_size=min(vocab, 4096), special_tokens=["<|endoftext|>"], show_progress=False
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        eos_token_id=fast.eos_token_id, tie_word_embeddings=preset == "smollm2",
    )  # fmt: skip
    out = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def recipe(args: argparse.Namespace, model: Path, text: Path, out: Path, cache: Path, mode: str) -> dict:
    lora = {"mode": mode} if mode in ("lora", "qlora") else {"mode": "none"}
    return {
        "model": {"path": str(model)},
        "data": {
            "source": str(text),
            "block_size": args.block_size,
            "eval_fraction": 0.0,
            "cache_dir": str(cache),
        },
        "optim": {"lr": 1e-4, "batch_size": args.batch_size, "grad_accum": args.grad_accum, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "budget": {"steps": args.warmup + args.steps},
        "eval": {"every": 0, "at_start": False, "max_blocks": 1},
        "checkpoint": {"every": 0, "keep_last": 1},
        "lora": lora,
        "speed": {
            "compile": mode == "compiled" or (mode in ("lora", "qlora") and torch.cuda.is_available()),
            "loss_chunk_tokens": 0 if mode == "eager" else args.chunk_tokens,
        },
        # Read back after the warm-up and at the end only: what the timing is taken between.
        "output": {"dir": str(out), "log_with": [], "log_every": args.warmup, "overwrite": True},
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_ours(args, model: Path, text: Path, work: Path, mode: str) -> dict:
    from gqa_uptrain.training import loop
    from gqa_uptrain.training.config import config_from_dict
    from gqa_uptrain.training.loop import fit

    cfg = config_from_dict(recipe(args, model, text, work / mode, work / "cache", mode))
    kept = {}
    real_fit = loop.fit

    def keep(run, state):  # the run's trainable-weight count and the timing points
        kept["trainable"] = run.trainable_parameters
        return real_fit(run, state)

    loop.fit = keep
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        r = loop.uptrain(cfg)
    finally:
        loop.fit = fit
    points = dict(r.extra["sync_points"])
    seconds = points[r.steps] - points[args.warmup]
    tokens = args.steps * args.batch_size * args.grad_accum * args.block_size
    return {"tokens_per_s": tokens / seconds, "trainable": kept["trainable"], "peak_gib": peak_gib()}


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_trainer(args, model_path: Path, text: Path, work: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from gqa_uptrain.data.text import prepare_data
    from gqa_uptrain.training.config import config_from_dict

    cfg = config_from_dict(recipe(args, model_path, text, work / "unused", work / "cache", "eager"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = prepare_data(cfg.data, tokenizer).train  # the same cached blocks our loop trains on
    train = train.map(lambda b: {"labels": b["input_ids"]}, batched=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    warmup = args.warmup

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == warmup:
                sync()
                self.start = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            sync()
            self.end = time.perf_counter()

    clock = Clock()
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    targs = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.warmup + args.steps, learning_rate=1e-4,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=2, optim="adamw_torch_fused", bf16=gpu, logging_steps=10**9, save_strategy="no",
        eval_strategy="no", report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=targs, train_dataset=train, callbacks=[clock]).train()
    tokens = args.steps * args.batch_size * args.grad_accum * args.block_size
    n = sum(p.numel() for p in model.parameters())
    return {"tokens_per_s": tokens / (clock.end - clock.start), "trainable": n, "peak_gib": peak_gib()}


def model_flops_per_token(model_path: Path, seq: int, trainable: int | None = None) -> float:
    """6·N + attention (full training); 4·N + 6·N_adapters + attention with a frozen base (LoRA)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    emb = m.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in m.parameters()) - emb  # the matrices (and norms) per token ...
    if c.tie_word_embeddings:
        n += emb  # ... and the tied LM head, which is a matmul per token
    attention = 12 * c.num_hidden_layers * c.hidden_size * seq
    if trainable is None:
        return 6 * n + attention
    return 4 * n + 6 * trainable + attention


def peak_tflops() -> tuple[float, str]:
    """The GPU's dense bf16 peak, or the float32 matmul rate this CPU reaches (measured)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            return peak, f"{peak:g} TFLOP/s dense bf16 ({name})"
    a = torch.randn(2048, 2048)
    for _ in range(2):
        a @ a
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    rate = 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e12
    return rate, f"{rate:.3f} TFLOP/s measured float32 matmul on {torch.get_num_threads()} CPU threads"


def graph_breaks(model_path: Path, block: int) -> dict:
    """torch._dynamo.explain on the model's training forward: graphs, breaks and their reasons."""
    from transformers import AutoModelForCausalLM

    from gqa_uptrain.training.losses import OutputHead

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
    OutputHead.attach(model, 4096)
    ids = torch.randint(0, 100, (1, min(block, 64)))
    ex = torch._dynamo.explain(model)(input_ids=ids, use_cache=False)
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
            "reasons": sorted({str(b.reason).splitlines()[0] for b in ex.break_reasons})}  # fmt: skip


def bench(args: argparse.Namespace, work: Path) -> dict:
    """Run every mode ``args.repeats`` times (rotated order), keep each mode's best; the figures as a dict."""
    text = text_folder(work)
    model = args.model or build_world(work, args.preset)
    modes = [m for m in args.modes.split(",") if m]
    best: dict[str, dict] = {}
    for i in range(args.repeats):
        order = modes[i % len(modes) :] + modes[: i % len(modes)]
        for mode in order:
            try:
                r = (
                    run_trainer(args, model, text, work)
                    if mode == "trainer"
                    else run_ours(args, model, text, work, mode)
                )
            except Exception as e:  # a mode that cannot run here says why, in the figures
                if mode != "qlora":
                    raise
                best[mode] = {"error": str(e).splitlines()[0]}
                continue
            print(f"  run {i + 1} {mode:8s} {r['tokens_per_s']:12,.0f} tokens/s", flush=True)
            if mode not in best or r["tokens_per_s"] > best[mode].get("tokens_per_s", 0):
                best[mode] = r
    peak, peak_what = peak_tflops()
    for mode, r in best.items():
        if "tokens_per_s" not in r:
            continue
        lora = mode in ("lora", "qlora")
        fpt = model_flops_per_token(model, args.block_size, r["trainable"] if lora else None)
        r["mfu"] = fpt * r["tokens_per_s"] / (peak * 1e12)
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)",
            "peak": peak_what, "model": str(args.model or f"random {args.preset}"), "block_size": args.block_size,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "warmup_steps": args.warmup,
            "timed_steps": args.steps, "modes": best,
            "graph_breaks": graph_breaks(model, args.block_size) if args.explain else None}  # fmt: skip


def print_table(res: dict) -> None:
    modes = res["modes"]
    base = modes.get("trainer", {}).get("tokens_per_s")
    eager = modes.get("eager", {}).get("tokens_per_s")
    print(f"\ndevice: {res['device']}; model: {res['model']}; batch {res['batch_size']} x {res['grad_accum']} x "
          f"{res['block_size']} tokens; {res['warmup_steps']} warm-up + {res['timed_steps']} timed steps each; "
          f"peak: {res['peak']}")  # fmt: skip
    print(f"{'mode':10s}{'tokens/s':>12s}{'x Trainer':>11s}{'x eager':>9s}{'MFU':>8s}{'peak GiB':>10s}")
    for mode, r in modes.items():
        if "tokens_per_s" not in r:
            print(f"{mode:10s}  not run: {r['error']}")
            continue
        t = r["tokens_per_s"]
        vs_base = f"{t / base:.2f}" if base else "-"
        vs_eager = f"{t / eager:.2f}" if eager else "-"
        gib = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        print(f"{mode:10s}{t:12,.0f}{vs_base:>11s}{vs_eager:>9s}{r['mfu']:8.1%}{gib:>10s}")
    if res.get("graph_breaks"):
        g = res["graph_breaks"]
        print(f"torch.compile: {g['graphs']} graph(s), {g['graph_breaks']} break(s) {g['reasons']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=Path, help="a converted checkpoint folder (default: a random Llama of --preset)"
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2", help="shape of the random model")
    p.add_argument(
        "--modes", default="trainer,eager,chunked,compiled", help=f"comma-separated, of {', '.join(MODES)}"
    )
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed optimizer steps before them, every mode alike"
    )
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument(
        "--chunk-tokens", type=int, default=4096, help="speed.loss_chunk_tokens of the chunked modes"
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per mode in rotated order; the best is kept")
    p.add_argument("--explain", action="store_true", help="list torch.compile's graph breaks of the model")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    bad = [m for m in args.modes.split(",") if m and m not in MODES]
    if bad or args.warmup < 1 or args.steps < 1:
        sys.exit(f"bench_uptrain: unknown mode(s) {bad} (known: {', '.join(MODES)}) or --warmup/--steps < 1")
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "datasets", "accelerate", "gqa_uptrain", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        res = bench(args, Path(tmp))
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
