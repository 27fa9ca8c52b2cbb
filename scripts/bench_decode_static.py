"""Benchmark: the static-cache compiled decode path on CPU, GQA against its MHA baseline, side by side.

Builds two random Llama checkpoints of one shape (8 layers, hidden 512, 8 query heads of 64; random
weights: decode speed does not depend on them), MHA (8 K/V heads) and GQA (2 K/V heads), and measures
them with the project's own command:

    gqa-eval GQA --baseline MHA --context 4096 --batch-size 8 --decode-path static

The target: GQA decodes faster than MHA at context 4,096 and batch 8 on the static path. Prints the
table and the machine load (the machine may be shared).

    .venv/bin/python scripts/bench_decode_static.py --work /tmp/bench-static
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="Folder for the checkpoints and the report.")
    ap.add_argument("--context", default="4096", help="Context lengths (gqa-eval --context).")
    ap.add_argument("--batch-size", default="8", help="Batch sizes (gqa-eval --batch-size).")
    ap.add_argument("--decode-path", default="static", help="gqa-eval --decode-path.")
    ap.add_argument("--new-tokens", type=int, default=16, help="Tokens per timed run.")
    ap.add_argument("--repeats", type=int, default=3, help="Timed runs (median).")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folders = {}
    for name, kv in (("mha", 8), ("gqa", 2)):
        folders[name] = args.work / name
        if not (folders[name] / "config.json").is_file():
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=kv, max_position_embeddings=8192)  # fmt: skip
            LlamaForCausalLM(cfg).save_pretrained(folders[name])
    report = args.work / "report.json"
    cmd = [str(Path(sys.executable).with_name("gqa-eval")), str(folders["gqa"]), "--baseline", str(folders["mha"]),
           "--context", args.context, "--batch-size", args.batch_size, "--decode-path", args.decode_path,
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--json", str(report),
           "--overwrite"]  # fmt: skip
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"$ {' '.join(cmd)}\n  load before: {load}", flush=True)
    subprocess.run(cmd, check=True)
    print(f"  load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for r in json.loads(report.read_text())["relative_to_baseline"]["decode_tokens_per_s"]:
        verdict = "faster" if r["ratio"] > 1 else "NOT faster"
        print(
            f"  {r['path']} ctx {r['context']} batch {r['batch']}: GQA / MHA decode {r['ratio']:.2f}x ({verdict})"
        )


if __name__ == "__main__":
    main()
