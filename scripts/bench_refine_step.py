"""Benchmark: one refinement step of a merged attention module on CPU, its parts side by side.

A converted attention module at SmolLM2-135M's shape (576 wide, 9 query heads on 1 K/V head, random
weights: the time does not depend on them), one calibration batch of 4 x 512 tokens, called the way
refinement calls it (``torch.func.functional_call`` with packed head blocks, rotary tables from the
family's own rotary class). Measured in one process, alternating the two sides of each comparison
with equal warm-up (best of ``--rounds`` rounds of ``--steps`` calls each):

- attention: transformers' SDPA against ``packed_attention.packed_causal_attention``, for the
  training step (forward + backward in bf16 autocast) and the held-out check (float32 forward);
- allocator: the same training step with glibc's mmap threshold fixed at 1 MiB (what the converter
  sets for flat memory with depth) against the 64 MiB it uses while a module trains.

Prints milliseconds per call and the ratios, and the machine's load (it may be shared).

    .venv/bin/python scripts/bench_refine_step.py
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable


def _best(fn: Callable[[], object], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="Calls per timed round.")
    ap.add_argument("--rounds", type=int, default=5, help="Rounds per side (best is reported).")
    ap.add_argument("--seq-len", type=int, default=512, help="Tokens per calibration sequence.")
    ap.add_argument("--batch", type=int, default=4, help="Sequences per step.")
    args = ap.parse_args()
    import torch
    from transformers import AttentionInterface, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from gqa_uptrain.merging import memory
    from gqa_uptrain.merging.packed_attention import PACKED_ATTENTION, packed_causal_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=1, head_dim=64, intermediate_size=1536
    )
    cfg._attn_implementation = "sdpa"
    att = LlamaAttention(cfg, 0).eval()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in att.named_parameters()}
    x = torch.randn(args.batch, args.seq_len, 576)
    target = torch.randn(args.batch, args.seq_len, 576)
    pos = torch.arange(args.seq_len)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)
    AttentionInterface.register(PACKED_ATTENTION, packed_causal_attention)
    opt = torch.optim.Adam(params.values(), lr=0.0)

    def step() -> None:  # a training step: forward and backward in bf16 autocast, an Adam step
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.func.functional_call(
                att,
                params,
                (x,),
                {"position_embeddings": (cos.bfloat16(), sin.bfloat16()), "attention_mask": None},
            )[0]
            loss = (y - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def check() -> None:  # a held-out check: a float32 forward
        with torch.no_grad():
            torch.func.functional_call(
                att, params, (x,), {"position_embeddings": (cos, sin), "attention_mask": None}
            )

    def on(impl: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            cfg._attn_implementation = impl
            fn()

        return run

    def compare(label: str, sides: dict[str, Callable[[], None]]) -> None:
        best = dict.fromkeys(sides, float("inf"))
        for fn in sides.values():  # equal warm-up
            fn()
            fn()
        for _ in range(args.rounds):
            for name, fn in sides.items():
                best[name] = min(best[name], _best(fn, args.steps))
        a, b = best.values()
        names = list(best)
        print(f"{label}: {names[0]} {a:.1f} ms, {names[1]} {b:.1f} ms -> {a / b:.2f}x")

    print(
        f"{args.batch} x {args.seq_len} tokens, 576 wide, 9 query heads on 1 K/V head; load {os.getloadavg()[0]:.2f}"
    )
    memory.return_large_blocks_at_once()
    with memory.reuse_large_blocks():
        compare("training step (bf16)", {"sdpa": on("sdpa", step), "packed": on(PACKED_ATTENTION, step)})
        compare("held-out check (fp32)", {"sdpa": on("sdpa", check), "packed": on(PACKED_ATTENTION, check)})
    lib = memory._mallopt()
    if lib is None:
        print("allocator: not glibc, nothing to compare")
        return

    def threshold(size: int) -> Callable[[], None]:
        def run() -> None:
            lib(memory._M_MMAP_THRESHOLD, size)
            cfg._attn_implementation = PACKED_ATTENTION
            step()

        return run

    compare(
        "training step, mmap threshold",
        {"1 MiB": threshold(memory.MMAP_THRESHOLD), "64 MiB": threshold(memory.TRAINING_MMAP_THRESHOLD)},
    )
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
