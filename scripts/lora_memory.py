#!/usr/bin/env python
"""Training memory of full / LoRA / QLoRA uptraining at Llama-2-7B width, measured on CPU at reduced depth.

A GQA-8 Llama of Llama-2-7B's width (hidden 4096, 32 heads, 8 K/V heads, MLP 11008, vocabulary
32000) is built with 1 and with 2 layers, on the CPU, and measured the way the uptraining run
holds it (gqa_uptrain.training.lora.apply_lora, the same code):

  weights      the bytes of every parameter and buffer as the run stores them: float32 masters
               (full), the frozen base in bf16 (LoRA on a bf16 GPU), the linear layers as
               bitsandbytes NF4 with double quantization plus the rest in bf16 (QLoRA, real
               Params4bit storage and quantization state)
  adapters     LoRA r=16, alpha 32 on the attention projections (the recipe default), float32
  grads+AdamW  4 + 8 bytes per trainable weight (the gradient, AdamW's two moments)
  bf16 copies  autocast's bf16 copies of float32 weights, kept for the backward pass (full only)
  activations  the tensors autograd saves for the backward pass (saved_tensors_hooks, counted once
               per storage) of one forward at --tokens tokens under bf16 autocast, with the chunked
               loss; no gradient checkpointing

Per layer = (2-layer model) - (1-layer model); the rest (embeddings, LM head, final norm, loss) =
(1-layer model) - per layer. The 7B total is ``rest + 32 x per layer`` for each term, activations
scaled linearly from --tokens to --scale-tokens (SDPA keeps no [T, T] scores, so they grow
linearly with tokens). Framework overhead (CUDA context, allocator fragmentation, temporary
buffers of the largest matmul) is not included: expect 1-3 GiB more on a GPU.

    python scripts/lora_memory.py               # ~2 minutes on 2 CPU cores, ~4 GiB of RAM
"""

from __future__ import annotations

import argparse
import logging

import torch

GIB = 2**30
WIDTH = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 8,
         "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False}  # fmt: skip


def build(layers: int, mode: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqa_uptrain.training.config import LoraConfig
    from gqa_uptrain.training.lora import apply_lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **WIDTH)).train()
    if mode != "full":
        model, _ = apply_lora(model, LoraConfig(mode=mode), torch.device("cpu"), torch.bfloat16, "memory")
    return model


def storage_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen bytes, trainable bytes) as stored (Params4bit: its packed bytes and quantization state)."""
    frozen = trainable = 0
    for p in model.parameters():
        n = p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:  # absmax (and its own quantization), code book
            for t in (qs.absmax, qs.code, getattr(getattr(qs, "state2", None), "absmax", None)):
                if isinstance(t, torch.Tensor):
                    n += t.numel() * t.element_size()
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    return frozen, trainable


def activation_bytes(model: torch.nn.Module, tokens: int) -> tuple[int, int]:
    """Bytes autograd saves for backward in one training forward + chunked loss of ``tokens`` tokens:
    (activations, autocast's bf16 copies of float32 weights). The copies are told apart by shape
    (a weight's; ``tokens`` is chosen to be no weight dimension) and do not grow with tokens."""
    from gqa_uptrain.training.losses import OutputHead, chunked_lm_loss

    head = OutputHead.attach(model, 4096)
    shapes = {tuple(p.shape) for p in model.parameters() if p.ndim == 2}
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights saved as they are
    seen: dict[int, int] = {}
    casts: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or t.untyped_storage().data_ptr() in own:
            return t  # a weight (or a view of one), already counted
        where = casts if tuple(t.shape) in shapes else seen
        try:
            ptr = t.untyped_storage().data_ptr()
            where[ptr] = max(where.get(ptr, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            where[id(t)] = t.numel() * t.element_size()
        return t

    ids = torch.randint(0, 32000, (1, tokens))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        hidden = model(input_ids=ids, use_cache=False).logits
        ce, _ = chunked_lm_loss(hidden, head.weight, head.bias, ids, 4096)
    ce.backward()
    return sum(seen.values()), sum(casts.values())


def measure(mode: str, layers: int, tokens: int) -> dict[str, int]:
    model = build(layers, mode)
    frozen, trainable = storage_bytes(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"weights": frozen + (trainable if mode == "full" else 0),
           "adapters": trainable if mode != "full" else 0,
           "grads+adamw": 12 * n_train}  # fmt: skip
    out["activations"], out["bf16 copies"] = activation_bytes(model, tokens)
    del model
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="tokens of the measured forward")
    p.add_argument("--scale-tokens", type=int, default=4096, help="tokens per micro-batch of the 7B figure")
    p.add_argument("--layers", type=int, default=32, help="depth to extrapolate to (Llama-2-7B: 32)")
    p.add_argument("--modes", default="full,lora,qlora")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gqa_uptrain").setLevel(logging.ERROR)
    scale = args.scale_tokens / args.tokens
    print(f"Llama-2-7B width (GQA-8), measured at 1 and 2 layers on CPU, {args.tokens} tokens; "
          f"extrapolated to {args.layers} layers, activations to {args.scale_tokens} tokens per micro-batch")  # fmt: skip
    print(f"{'mode':6s}{'term':>13s}{'per layer MiB':>15s}{'rest MiB':>10s}{'7B GiB':>9s}")
    for mode in args.modes.split(","):
        one, two = measure(mode, 1, args.tokens), measure(mode, 2, args.tokens)
        total = 0.0
        for term in one:
            per = two[term] - one[term]
            rest = one[term] - per
            f = scale if term == "activations" else 1.0
            gib = (rest + args.layers * per) * f / GIB
            total += gib
            print(f"{mode:6s}{term:>13s}{per * f / 2**20:15.1f}{rest * f / 2**20:10.1f}{gib:9.2f}")
        print(f"{mode:6s}{'total':>13s}{'':15s}{'':10s}{total:9.2f}")


if __name__ == "__main__":
    main()
