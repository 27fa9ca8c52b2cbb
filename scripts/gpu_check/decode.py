#!/usr/bin/env python
"""gpu_check section ``decode``: decode as a server runs it, GQA against MHA (issue: decode as a server sees it).

On a GPU (about 60 s): a TinyLlama-shaped Llama (22 layers, hidden 2048, 32 query heads, random weights:
speed does not depend on them) in bf16, as MHA (32 K/V heads) and GQA-8 (H/4):
  decode         the static-cache path (transformers' StaticCache, torch.compile with the cudagraphs
                 backend: CUDA graphs over transformers' kernels) at context 4096 by batch: decode
                 tokens/s, time to first token, peak memory          (target: GQA >= 1.5x MHA at batch 16)
  largest_batch  the largest batch each decodes at context 4096 within a memory budget (bounded by the
                 computed KV cache, then measured with the allocator capped at the budget)
                                                                      (target: in proportion to the KV saving)
With ``--tiny`` (CI, CPU, well under 60 s): the same at a tiny size, the decode step traced by dynamo and
run eagerly (inductor's C++ compile takes minutes on a busy CPU).

    python scripts/gpu_check/decode.py --out figures.json [--tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gqa_uptrain.evaluation.capacity import largest_batch  # noqa: E402
from gqa_uptrain.evaluation.kv_cache import kv_layout  # noqa: E402
from gqa_uptrain.evaluation.speed import measure_speed  # noqa: E402


def build(kv_heads: int, tiny: bool, device: torch.device, dtype: torch.dtype):
    """A random TinyLlama-shaped (or tiny) Llama with ``kv_heads`` K/V heads, on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=256, max_position_embeddings=512)  # fmt: skip
    else:
        shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     vocab_size=32000, max_position_embeddings=8192)  # fmt: skip
    cfg = LlamaConfig(num_key_value_heads=kv_heads, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the figures.")
    ap.add_argument("--tiny", action="store_true", help="Tiny models on whatever device there is (CI).")
    ap.add_argument(
        "--budget-gib", type=float, default=None, help="Memory budget of the largest-batch search."
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    context = 128 if tiny else 4096
    batches = (1, 4) if tiny else (1, 16, 32)
    new_tokens = 8 if tiny else 32
    backend = "cudagraphs" if device.type == "cuda" else "eager"
    budget = int((args.budget_gib or (0.25 if tiny else 12.0)) * 2**30)
    heads = 4 if tiny else 32
    figures: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "dtype": str(dtype).removeprefix("torch."), "context_tokens": context,
                     "new_tokens": new_tokens, "path": f"static cache + torch.compile(backend={backend})",
                     "budget_bytes": budget}  # fmt: skip
    rows = []
    for name, kv in (("mha", heads), ("gqa", heads // 4)):
        model = build(kv, tiny, device, dtype)
        layout = kv_layout(model.config, dtype)
        figures[f"{name}_kv_heads"] = kv
        figures[f"{name}_kv_bytes_per_token"] = layout.bytes_per_token
        for b in batches:
            s = measure_speed(
                model,
                context,
                b,
                new_tokens,
                warmup=1,
                repeats=1 if tiny else 2,
                path="static",
                compile_backend=backend,
            )
            figures[f"{name}_decode_tokens_per_s_batch{b}"] = s.decode_tokens_per_s
            figures[f"{name}_first_token_ms_batch{b}"] = 1000 * s.time_to_first_token_s
            figures[f"{name}_peak_memory_bytes_batch{b}"] = s.peak_memory_bytes
        fit = largest_batch(model, context, budget, new_tokens=2, max_batch=4 if tiny else 512)
        figures[f"{name}_largest_batch"] = fit.largest_batch
        figures[f"{name}_largest_batch_kv_bound"] = fit.kv_bound
        figures[f"{name}_largest_batch_peak_bytes"] = fit.peak_bytes
        rows.append((name, kv, fit))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for b in batches:
        figures[f"gqa_over_mha_decode_batch{b}"] = (
            figures[f"gqa_decode_tokens_per_s_batch{b}"] / figures[f"mha_decode_tokens_per_s_batch{b}"]
        )
    if figures["mha_largest_batch"]:
        figures["gqa_over_mha_largest_batch"] = figures["gqa_largest_batch"] / figures["mha_largest_batch"]
    figures["kv_saving"] = figures["mha_kv_bytes_per_token"] / figures["gqa_kv_bytes_per_token"]
    figures["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")

    print(f"decode at context {context}, {figures['path']}, {figures['device']} {figures['dtype']}")
    print(f"{'batch':>6} {'MHA tok/s':>10} {'GQA tok/s':>10} {'GQA/MHA':>8}")
    for b in batches:
        print(
            f"{b:>6} {figures[f'mha_decode_tokens_per_s_batch{b}']:>10.1f} "
            f"{figures[f'gqa_decode_tokens_per_s_batch{b}']:>10.1f} {figures[f'gqa_over_mha_decode_batch{b}']:>7.2f}x"
        )
    for name, kv, fit in rows:
        print(
            f"largest batch in {budget / 2**30:.2f} GiB, {name} ({kv} K/V): {fit.largest_batch} (KV bound {fit.kv_bound})"
        )
    print(f"({figures['seconds']:.0f} s)")
    if not all(figures[f"{n}_largest_batch"] >= 1 for n in ("mha", "gqa")):
        sys.exit("decode: a model did not fit even one sequence in the budget")


if __name__ == "__main__":
    main()
