"""LoRA and QLoRA uptraining: adapters (peft) on a frozen base, merged into a plain checkpoint at the end.

Full-parameter training of a 7B model needs about 16 bytes per weight before activations (float32
weights and gradients, AdamW's two moments): no single GPU has that. LoRA trains
``B @ A · alpha / r`` beside each chosen linear layer of a frozen base; QLoRA also stores the base's
linear layers in 4 bits (bitsandbytes NF4). The README's memory table gives the figures.

* :func:`lora_target_modules`: which linear layers get adapters, from the family's attention data
  (:mod:`gqa_uptrain.architectures.trainable`: the same names ``freeze.mode`` uses).
* :func:`apply_lora`: quantize the base (QLoRA) and wrap the model with peft.
* :func:`register_adapter_checkpointing`: checkpoints hold the adapters, not the frozen base (a
  7B base is 13 GiB per checkpoint in bf16; its adapters are tens of MiB), and ``--resume`` puts
  them back exactly.
* :func:`merged_model`: the adapters merged for ``model/`` into the checkpoint's own weights, read
  again from disk (not into the bf16 or 4-bit copy the run trained on).

peft and bitsandbytes are optional (``pip install 'gqa-uptrain[lora]'`` / ``[qlora]``) and are
imported only when a recipe asks for them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..architectures.trainable import attention_parameter_kinds
from ..errors import ConfigError
from .config import LoraConfig

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
# A module inside a numbered block (``model.layers.3.mlp.up_proj``): what "mlp" targets are read from.
_IN_BLOCK = re.compile(r"\.\d+\.")


def _require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "recipe key lora.mode: LoRA needs peft, which is not installed; pip install 'gqa-uptrain[lora]'"
        ) from None
    return peft


def _require_bitsandbytes(device: torch.device) -> Any:
    """bitsandbytes, once a 4-bit layer has run forward and backward on ``device``; else a one-line error."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "recipe key lora.mode: qlora needs bitsandbytes, which is not installed; "
            "pip install 'gqa-uptrain[qlora]' (or use lora.mode=lora)"
        ) from None
    try:  # the smallest real use: quantize, forward, backward
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
    except Exception as e:  # bitsandbytes raises many types for an unsupported device
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"recipe key lora.mode: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit layers on "
            f"{device.type} ({first}); use lora.mode=lora, or a device bitsandbytes supports"
        ) from None
    return bnb


def _linear_names(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module with a 2-D ``weight`` that peft can adapt (``nn.Linear``, GPT-2's ``Conv1D``)."""
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if (
            name
            and isinstance(w, torch.Tensor)
            and w.ndim == 2
            and not isinstance(module, torch.nn.Embedding)
        ):
            out[name] = module
    return out


def lora_target_modules(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The full names of the linear layers that get adapters for ``lora.targets``.

    ``attention``: every linear layer of the attention modules; ``kv``: the K and V projections (a
    fused QKV projection counts: it holds K and V); ``mlp``: the other linear layers inside the
    numbered blocks; anything else: layers whose name ends with it (``k_proj``). Which names are
    attention is the family's data (:func:`~gqa_uptrain.architectures.trainable.attention_parameter_kinds`).
    The output projection and embeddings never get adapters.
    """
    linears = _linear_names(model)
    kinds = attention_parameter_kinds(
        getattr(model.config, "model_type", None), (f"{n}.weight" for n in linears)
    )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen: list[str] = []
    for target in targets:
        t = target.strip()
        if t == "attention":
            found = [n for n in linears if f"{n}.weight" in kinds]
        elif t == "kv":
            found = [n for n in linears if kinds.get(f"{n}.weight") in ("kv", "fused_qkv")]
        elif t == "mlp":
            found = [
                n
                for n in linears
                if f"{n}.weight" not in kinds and _IN_BLOCK.search(f".{n}.") and linears[n] is not head
            ]
        else:
            found = [n for n in linears if n == t or n.endswith("." + t)]
        if not found:
            sample = ", ".join(list(linears)[:6])
            raise ConfigError(
                f"recipe key lora.targets: {t!r} matches no linear layer of this model (layers like {sample}); "
                "use attention, kv, mlp or a name suffix of one of them"
            )
        chosen += [n for n in found if n not in chosen and linears[n] is not head]
    return chosen


def _quantize_4bit(
    model: torch.nn.Module, cfg: LoraConfig, device: torch.device, compute_dtype: torch.dtype
) -> int:
    """Replace every ``nn.Linear`` inside the numbered blocks by a bitsandbytes 4-bit layer on ``device``.

    One layer at a time, so the device holds the 4-bit base plus one float layer at most. Returns the
    number of layers quantized. Embeddings, norms and the output projection stay as they are (QLoRA's
    recipe; the output projection feeds the float32 loss).
    """
    bnb = _require_bitsandbytes(device)
    head = model.get_output_embeddings()
    n = 0
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or module is head or not _IN_BLOCK.search(f".{name}."):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            module.weight.data,
            requires_grad=False,
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
        )
        if module.bias is not None:
            q.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        _keep_differentiable(q)
        setattr(parent, child, q.to(device))  # moving quantizes
        n += 1
    if n == 0:
        raise ConfigError("recipe key lora.mode: qlora found no nn.Linear layer to quantize in this model")
    return n


def _keep_differentiable(layer: torch.nn.Module) -> None:
    """Keep a 4-bit layer on the kernel that has a backward pass, in evaluation too.

    On a CPU with AVX512-BF16, bitsandbytes (0.50.2, the locked version) repacks a ``Linear4bit``'s
    weight for a faster inference-only kernel the first time the layer runs in eval mode on an input
    that needs no gradient, and keeps it so. That kernel has no backward: after the run's first
    evaluation the layer would pass no gradient to its input, and every adapter below it would train
    on part of its gradient, silently (measured: the input's gradient is ``None``). A run evaluates
    before its first step, so that would be every step. ``tests/test_uptrain_speed.py`` checks the
    gradients after an evaluation, so a bitsandbytes that changes this switch fails there.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def apply_lora(
    model: torch.nn.Module, cfg: LoraConfig, device: torch.device, compute_dtype: torch.dtype, base_path: str
) -> tuple[torch.nn.Module, int]:
    """Wrap ``model`` with LoRA adapters (QLoRA: on a 4-bit base on ``device``); return it and how
    many weights train. Every base weight is frozen; the adapters are float32."""
    peft = _require_peft()
    modules = lora_target_modules(model, cfg.targets)
    if cfg.mode == "qlora":
        n = _quantize_4bit(model, cfg, device, compute_dtype)
        logger.info("QLoRA: %d linear layers of the base stored in 4 bits (%s)", n, cfg.quant_type)
    model.requires_grad_(False)
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n in modules)
    pcfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=modules,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    wrapped = peft.get_peft_model(model, pcfg)
    wrapped.peft_config["default"].base_model_name_or_path = base_path
    for p in wrapped.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the adapters are the master weights
        elif p.is_floating_point() and compute_dtype != torch.float32:
            # The frozen base needs no float32 master copy: hold it in the compute dtype (half the
            # memory); model/ is merged into the checkpoint's own weights read again (merged_model).
            p.data = p.data.to(compute_dtype)
    n_train = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    logger.info(
        "LoRA r=%d alpha=%g on %d layers (%s): %s trainable weights",
        cfg.rank, cfg.alpha, len(modules), ", ".join(cfg.targets), f"{n_train:,}",
    )  # fmt: skip
    return wrapped, n_train


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights of a peft model (what a checkpoint holds), detached on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def register_adapter_checkpointing(accelerator: Any) -> None:
    """Make ``save_state`` / ``load_state`` write and read the adapters only, not the frozen base.

    accelerate's model hooks: the save hook takes the model's (full) state dict out of what
    accelerate writes and writes the adapters' weights (float32, exact) instead; the load hook puts
    them back and takes the model out of what accelerate loads. Optimizer, scheduler and RNG states
    are accelerate's as usual, so ``--resume`` continues exactly.
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def is_peft(m: Any) -> bool:
        return hasattr(accelerator.unwrap_model(m), "peft_config")

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i in reversed(range(len(models))):
            if is_peft(models[i]):
                if accelerator.is_main_process:
                    save_file(
                        adapter_state_dict(accelerator.unwrap_model(models[i])),
                        str(Path(output_dir) / ADAPTER_FILE),
                    )
                if i < len(weights):
                    weights.pop(i)

    def load_hook(models: list, input_dir: str) -> None:
        for i in reversed(range(len(models))):
            if is_peft(models[i]):
                file = Path(input_dir) / ADAPTER_FILE
                if not file.is_file():
                    raise ConfigError(
                        f"checkpoint {input_dir} holds no LoRA adapters ({ADAPTER_FILE}): it is not a LoRA run's; "
                        "resume with the recipe it was trained with, or start over with --overwrite"
                    )
                unwrapped = accelerator.unwrap_model(models.pop(i))
                device = next(p.device for p in unwrapped.parameters() if p.requires_grad)
                state = {k: v.to(device) for k, v in load_file(str(file)).items()}
                result = set_peft_model_state_dict(unwrapped, state)
                missing = [k for k in result.missing_keys if "lora_" in k]
                if result.unexpected_keys or missing:
                    raise ConfigError(
                        f"checkpoint {input_dir}: its adapters do not fit this model's (lora.rank / lora.targets "
                        "differ?); resume with the recipe it was trained with"
                    )

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def merged_model(
    model: torch.nn.Module, cfg: Any, adapters_dir: Path, load_base: Any
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The base with the adapters merged in, as a plain transformers model, and its state dict.

    The adapters are saved in peft's format into ``adapters_dir`` first (an existing folder is
    replaced). The base they are merged into is read again from the checkpoint by ``load_base()``
    (float32, on the CPU): the training model's base may be a bf16 (LoRA on a GPU) or 4-bit (QLoRA)
    copy, and the saved model must carry the checkpoint's own weights plus the adapters' update.
    """
    peft = _require_peft()
    from ..io.outputs import atomic_output_dir

    with atomic_output_dir(adapters_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
    model = peft.PeftModel.from_pretrained(load_base(), str(adapters_dir))
    merged = model.merge_and_unload()
    return merged, merged.state_dict()
