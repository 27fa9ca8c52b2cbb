"""The speed settings of a run (recipe section ``speed``): the chunked loss's output head and ``torch.compile``.

Neither changes what a step computes: the chunked loss equals the plain one, gradients included
(:mod:`.losses`), and a compiled model computes the model's own forward and backward. Both are
applied to the prepared model (on its device, after any DDP wrapping), the head first so that its
check runs eagerly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import UptrainConfig
from .losses import OutputHead

logger = logging.getLogger(__name__)


def compile_enabled(cfg: UptrainConfig, device: torch.device) -> bool:
    """``speed.compile``, with ``None`` meaning: on a CUDA GPU."""
    return cfg.speed.compile if cfg.speed.compile is not None else device.type == "cuda"


def apply_speed_settings(cfg: UptrainConfig, accelerator: Any, model: torch.nn.Module) -> OutputHead | None:
    """Attach the chunked loss's head and compile ``model`` (the prepared one) as ``cfg.speed`` says.

    Returns the :class:`~gqa_uptrain.training.losses.OutputHead` the loop computes the loss with,
    or ``None`` for the plain loss: when ``speed.loss_chunk_tokens`` is 0, when the model's logits
    are more than a projection of its hidden states, or when FSDP or DeepSpeed shard the
    projection's weight (it is read outside the model's forward, where only a gathered weight is whole).
    """
    unwrapped = accelerator.unwrap_model(model)
    head = None
    if cfg.speed.loss_chunk_tokens > 0:
        if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
            logger.info("speed.loss_chunk_tokens: the output projection is sharded (%s); using the plain loss",
                        accelerator.distributed_type.value)  # fmt: skip
        else:
            head = OutputHead.attach(unwrapped, cfg.speed.loss_chunk_tokens)
            if head is not None:
                logger.info(
                    "loss computed %d positions at a time from hidden states", cfg.speed.loss_chunk_tokens
                )
    if compile_enabled(cfg, accelerator.device):
        # In place (nn.Module.compile): parameter names, checkpoints and the saved model are unchanged.
        unwrapped.compile(mode=cfg.speed.compile_mode)
        logger.info(
            "torch.compile: on (mode %s); the first steps compile", cfg.speed.compile_mode or "default"
        )
    return head
