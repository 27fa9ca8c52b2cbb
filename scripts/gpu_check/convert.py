"""GPU check, section ``convert``: the calibrated conversion (aligned + layer-wise refinement) on a GPU.

Measures (issue 22):

1. Llama-2-7B width (hidden 4096, 32 heads -> 8 K/V heads, intermediate 11008, fp16 synthetic
   weights, ``--layers`` decoder layers) converted by ``gqa_uptrain.convert`` on the device at the CLI
   defaults (65,536 calibration tokens in blocks of 512, up to 300 refinement steps per module):
   seconds per layer, the 32-layer time extrapolated from it, and the peak device memory
   (``torch.cuda.max_memory_allocated``), against the targets (<= 15 s per layer, < 10 min for 32
   layers, <= 24 GB). The plan's estimate (``plan_conversion(..., calibration_tokens=...)``) is
   printed beside what was measured.
2. SmolLM2-135M's shape (hidden 576, 9 query heads, 3 -> 1 K/V heads, intermediate 1536) converted on
   the GPU and on the CPU with the same settings and seed: the share of mean pooling's added
   divergence from the original that each removes (``1 - KL(orig || aligned) / KL(orig || mean)`` on
   held-out text), which must agree within a point. The real SmolLM2 GGUF (90 MB) is not on the GPU
   machine, so the weights are synthetic (seeded; Q and K scaled up so attention is peaked and the
   merge matters) at a few of its layers, and the divergence from the original model's own next-token
   distribution stands in for held-out cross-entropy (random weights predict no text). The CPU and
   GPU runs use a reduced budget (8,192 tokens in blocks of 256) so both fit the time limit.

The calibration text is the repository's own (README, results, the package's Python), tokenized by a
byte-level BPE trained on it here; the held-out text is the scripts' Python. Nothing beyond the GPU
image is needed (torch, transformers, accelerate, tokenizers, safetensors).

``--tiny`` runs the same end to end on the CPU at a tiny scale (CI). Writes one JSON object to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "hidden_act": "silu",
}
SMOLLM2 = {  # HuggingFaceTB/SmolLM2-135M's attention and MLP shape
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "hidden_act": "silu",
}
TARGET_S_PER_LAYER = 15.0
TARGET_32_LAYERS_S = 600.0
TARGET_DEVICE_BYTES = 24e9


def text_folders(work: Path) -> tuple[Path, Path]:
    """(calibration text: README, results and the package's Python; held-out text: the scripts)."""
    calib, held = work / "calib", work / "held"
    calib.mkdir()
    held.mkdir()
    files = [
        REPO / "README.md",
        *sorted((REPO / "results").glob("*.md")),
        *sorted((REPO / "gqa_uptrain").rglob("*.py")),
    ]
    for i, f in enumerate(files):
        shutil.copyfile(f, calib / f"{i:04d}-{f.name}")
    for i, f in enumerate(sorted((REPO / "scripts").glob("*.py"))):
        shutil.copyfile(f, held / f"{i:04d}-{f.name}")
    return calib, held


def train_tokenizer(calib: Path, out: Path, vocab: int) -> int:
    """A byte-level BPE trained on the calibration text, saved into checkpoint folder ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in sorted(calib.iterdir())], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return len(fast)


def build_checkpoint(
    out: Path, config: dict, layers: int, vocab: int, seed: int, qk_scale: float = 1.0
) -> None:
    """A random model of ``config`` with ``layers`` layers saved as safetensors (Q and K scaled by
    ``qk_scale`` so attention is peaked). Built layer by layer in the config's dtype, never in float32
    whole: a 7B-wide layer is 0.4 GB in fp16."""
    import torch
    from safetensors.torch import save_file

    cfg = {**config, "num_hidden_layers": layers, "vocab_size": vocab}
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    dtype = getattr(torch, cfg["torch_dtype"])
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    tensors = {"model.embed_tokens.weight": rnd(vocab, h), "model.norm.weight": torch.ones(h, dtype=dtype)}
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rnd(vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rnd(h, h, std=0.02 * qk_scale),
            p + "self_attn.k_proj.weight": rnd(kv, h, std=0.02 * qk_scale),
            p + "self_attn.v_proj.weight": rnd(kv, h),
            p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(inter, h),
            p + "mlp.up_proj.weight": rnd(inter, h),
            p + "mlp.down_proj.weight": rnd(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
        }
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def peak_device(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def reset_device(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def wide_conversion(args: argparse.Namespace, work: Path, calib: Path) -> dict:
    """Part 1: the 7B-wide conversion at the CLI defaults on the device."""
    from gqa_uptrain import convert
    from gqa_uptrain.conversion import plan_conversion

    cfg = dict(LLAMA2_7B)
    if args.tiny:
        cfg |= {"hidden_size": 256, "intermediate_size": 688}
    src = work / "wide"
    src.mkdir()
    vocab = train_tokenizer(calib, src, 4000 if not args.tiny else 1000)
    build_checkpoint(src, cfg, args.layers, vocab, seed=0)
    tokens, seq, steps = (65_536, 512, None) if not args.tiny else (1024, 64, 5)
    plan = plan_conversion(
        src, 8, calibration_tokens=tokens, calibration_seq_len=seq, refine_steps=steps or 300,
        device=args.device, time_steps=False,
    )  # fmt: skip
    reset_device(args.device)
    t0 = time.perf_counter()
    convert(
        src, work / "wide-out", 8, "aligned", calibration=str(calib), calibration_tokens=tokens,
        calibration_seq_len=seq, refine=steps if steps else None, device=args.device, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    peak = peak_device(args.device)
    per_layer = seconds / args.layers
    est = plan.calibrated
    out = {
        "hidden": cfg["hidden_size"],
        "layers": args.layers,
        "calibration_tokens": tokens,
        "seq_len": seq,
        "refine_steps_max": steps or 300,
        "seconds_total_s": round(seconds, 2),
        "seconds_per_layer_s": round(per_layer, 2),
        "extrapolated_32_layers_s": round(per_layer * 32, 1),
        "peak_device_bytes": peak,
        "plan_device_peak_bytes": est.device_peak_bytes if est else None,
        "plan_host_peak_bytes": est.host_peak_bytes if est else None,
    }
    if not args.tiny:
        out["target_s_per_layer_met"] = per_layer <= TARGET_S_PER_LAYER
        out["target_32_layers_met"] = per_layer * 32 < TARGET_32_LAYERS_S
        out["target_device_memory_met"] = peak is not None and peak <= TARGET_DEVICE_BYTES
    return out


def kl_to_original(model_dir: Path, original_logits: list, batches: list, device: str) -> float:
    """Mean KL(original || model) per token over the held-out ``batches``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, ref in zip(batches, original_logits, strict=True):
            logp = torch.log_softmax(model(input_ids=ids.to(device)).logits.float().cpu(), -1)
            ref_logp = torch.log_softmax(ref, -1)
            total += float((ref_logp.exp() * (ref_logp - logp)).sum())
            n += ids.numel()
    del model
    return total / n


def quality(args: argparse.Namespace, work: Path, calib: Path, held: Path) -> dict:
    """Part 2: SmolLM2's shape, 3 -> 1, on the device and on the CPU: the removed share of each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gqa_uptrain import convert

    cfg = dict(SMOLLM2)
    layers = args.smol_layers
    if args.tiny:
        cfg |= {"hidden_size": 144, "intermediate_size": 384}
    src = work / "smol"
    src.mkdir()
    vocab = train_tokenizer(calib, src, 4000 if not args.tiny else 1000)
    build_checkpoint(src, cfg, layers, vocab, seed=1, qk_scale=4.0)
    tokens, seq = (8192, 256) if not args.tiny else (1024, 64)
    steps = None if not args.tiny else 5
    tok = AutoTokenizer.from_pretrained(src)
    text = "\n".join(p.read_text() for p in sorted(held.iterdir()))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: 8 * seq]).view(-1, seq)
    batches = list(ids.split(2))
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [original(input_ids=b).logits.float() for b in batches]
    del original
    convert(src, work / "smol-mean", 1, "mean", progress=False)
    mean_kl = kl_to_original(work / "smol-mean", ref, batches, "cpu")
    out: dict = {"layers": layers, "hidden": cfg["hidden_size"], "calibration_tokens": tokens, "seq_len": seq,
                 "kl_mean_nats": mean_kl}  # fmt: skip
    for where in dict.fromkeys([args.device, "cpu"]):
        t0 = time.perf_counter()
        convert(
            src, work / f"smol-{where}", 1, "aligned", calibration=str(calib), calibration_tokens=tokens,
            calibration_seq_len=seq, refine=steps, device=where, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        kl = kl_to_original(work / f"smol-{where}", ref, batches, "cpu")
        key = "device" if where != "cpu" else "cpu"
        out[f"{key}_seconds_s"] = round(seconds, 2)
        out[f"{key}_kl_nats"] = kl
        out[f"{key}_removed_share_pct"] = round(100 * (1 - kl / mean_kl), 2) if mean_kl > 0 else math.nan
    if "device_removed_share_pct" in out:
        gap = abs(out["device_removed_share_pct"] - out["cpu_removed_share_pct"])
        out["gap_points"] = round(gap, 2)
        out["target_within_one_point_met"] = gap <= 1.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="where the JSON figures go")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (CI)")
    ap.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-wide checkpoint")
    ap.add_argument("--smol-layers", type=int, default=None, help="layers of the SmolLM2-shaped model")
    args = ap.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.layers = 1
    args.smol_layers = args.smol_layers or 2
    work = Path(tempfile.mkdtemp(prefix="gpu_check_convert-"))
    try:
        calib, held = text_folders(work)
        figures = {"device": args.device, "tiny": args.tiny}
        figures["llama2_7b_width"] = wide_conversion(args, work, calib)
        figures["smollm2_shape_3_to_1"] = quality(args, work, calib, held)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    w, q = figures["llama2_7b_width"], figures["smollm2_shape_3_to_1"]
    peak, planned = w["peak_device_bytes"], w["plan_device_peak_bytes"]
    print(f"convert on {args.device}{' (tiny)' if args.tiny else ''}")
    print(f"  width {w['hidden']}, {w['layers']} layers, 32 -> 8: {w['seconds_per_layer_s']} s/layer "
          f"(32 layers ~{w['extrapolated_32_layers_s']} s), peak device "
          f"{'-' if peak is None else f'{peak / 1e9:.2f} GB'} (plan: "
          f"{'-' if planned is None else f'{planned / 1e9:.2f} GB'})")  # fmt: skip
    shares = ", ".join(
        f"{k}: {q[k]}%" for k in ("device_removed_share_pct", "cpu_removed_share_pct") if k in q
    )
    print(f"  SmolLM2 shape 3 -> 1 ({q['layers']} layers): removed share of mean pooling's KL {shares}")


if __name__ == "__main__":
    main()
