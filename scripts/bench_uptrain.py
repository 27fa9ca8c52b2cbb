#!/usr/bin/env python
"""Tokens/s of ``gqa-uptrain``'s loop against a plain Hugging Face ``Trainer``, side by side.

Both train the same model on the same packed blocks (python3.11-doc text, tokenized once by
``gqa_uptrain.data.text``) with the same batch, accumulation, optimizer (fused AdamW), schedule
(warmup + cosine), gradient clipping and precision (bf16 autocast on a GPU, float32 on CPU), with
evaluation, logging and checkpointing off in the timed part. Each side is timed from its first
training step to its last (model loading, tokenization and the final save excluded); runs are
interleaved and repeated, and the best of each is kept, so a busy machine penalises both alike.

    python scripts/bench_uptrain.py                       # random tiny-ish GQA Llama (CPU: ~2 min)
    python scripts/bench_uptrain.py --model smollm2-mqa --steps 10 --block-size 128 --batch-size 4

Target (issue 4): at least as fast as the Trainer on CPU. On a GPU it also prints the model FLOPs
utilisation (6·N·tokens + attention FLOPs over the device's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

DOCS = Path("/usr/share/doc/python3.11/html/_sources/library")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40": 181.0}


def build_world(root: Path, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int) -> Path:
    """A BPE tokenizer trained on the docs and a random GQA Llama saved together in ``root/model``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    files = sorted(str(f) for f in DOCS.glob("*.rst.txt"))[:120]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(
        files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False)
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, eos_token_id=fast.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    out = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def recipe(args: argparse.Namespace, model: Path, out: Path, cache: Path) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {
            "source": str(DOCS),
            "block_size": args.block_size,
            "eval_fraction": 0.0,
            "cache_dir": str(cache),
        },
        "optim": {"lr": 1e-4, "batch_size": args.batch_size, "grad_accum": args.grad_accum, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "budget": {"steps": args.steps},
        "eval": {"every": 0, "at_start": False},
        "checkpoint": {"every": 0, "keep_last": 1},
        "output": {"dir": str(out), "log_with": [], "log_every": 10**9, "overwrite": True},
    }


def run_ours(args: argparse.Namespace, model: Path, work: Path, i: int) -> float:
    from gqa_uptrain.training.config import config_from_dict
    from gqa_uptrain.training.loop import uptrain

    r = uptrain(config_from_dict(recipe(args, model, work / f"ours{i}", work / "cache")))
    return r.tokens / r.seconds


def run_trainer(args: argparse.Namespace, model_path: Path, work: Path, i: int, mixed_bf16: bool) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from gqa_uptrain.data.text import prepare_data
    from gqa_uptrain.training.config import config_from_dict

    cfg = config_from_dict(recipe(args, model_path, work / "unused", work / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = prepare_data(cfg.data, tokenizer).train  # the same cached blocks our loop trains on
    train = train.map(lambda b: {"labels": b["input_ids"]}, batched=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == 0 and not self.start:
                self.start = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            self.end = time.perf_counter()

    clock = Clock()
    targs = TrainingArguments(
        output_dir=str(work / f"trainer{i}"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=1e-4, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=2,
        optim="adamw_torch_fused", bf16=mixed_bf16, logging_steps=10**9, save_strategy="no", eval_strategy="no",
        report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=targs, train_dataset=train, callbacks=[clock]).train()
    return args.steps * args.batch_size * args.grad_accum * args.block_size / (clock.end - clock.start)


def model_flops_per_token(model_path: Path, seq: int) -> float:
    """6·N (forward + backward over the non-embedding and LM-head weights) + attention scores."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    n = sum(p.numel() for p in m.parameters()) - m.get_input_embeddings().weight.numel()
    if c.tie_word_embeddings:
        n += m.get_input_embeddings().weight.numel()  # the tied LM head is a matmul per token
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a converted checkpoint folder (default: a random GQA Llama)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; the best is kept")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    if not DOCS.is_dir():
        sys.exit("python3.11-doc is not installed (scripts/setup.sh installs it)")
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or build_world(
            work, vocab=4096, hidden=args.hidden, layers=args.layers, heads=8, kv_heads=2
        )
        ours, theirs = [], []
        for i in range(args.repeats):
            # Alternate which side goes first, so neither always gets the warmer process.
            first, second = (run_ours, run_trainer) if i % 2 == 0 else (run_trainer, run_ours)
            for fn in (first, second):
                if fn is run_ours:
                    ours.append(run_ours(args, model, work, i))
                else:
                    theirs.append(run_trainer(args, model, work, i, mixed_bf16=gpu))
            print(
                f"run {i + 1}: gqa-uptrain {ours[-1]:,.0f} tok/s, Trainer {theirs[-1]:,.0f} tok/s", flush=True
            )
        best_ours, best_theirs = max(ours), max(theirs)
        device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
        print(f"\ndevice: {device}; model: {model if args.model else 'random GQA Llama'}; "
              f"batch {args.batch_size} x {args.grad_accum} x {args.block_size} tokens; {args.steps} steps; "
              f"precision: {'bf16 autocast' if gpu else 'float32'}")  # fmt: skip
        print(f"gqa-uptrain : {best_ours:12,.0f} tokens/s")
        print(f"HF Trainer  : {best_theirs:12,.0f} tokens/s")
        print(f"ratio       : {best_ours / best_theirs:12.2f}x  (target >= 1.0 on CPU)")
        if gpu:
            fpt = model_flops_per_token(model, args.block_size)
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
            if peak:
                print(f"MFU         : gqa-uptrain {fpt * best_ours / peak / 1e12:.1%}, "
                      f"Trainer {fpt * best_theirs / peak / 1e12:.1%} of {peak:g} TFLOPS bf16")  # fmt: skip


if __name__ == "__main__":
    main()
