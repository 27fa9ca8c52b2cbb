"""The training objectives: next-token cross-entropy, and KL to a teacher for distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..evaluation.perplexity import next_token_nll


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, per_sequence: bool = False) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1.

    logits [B, T, V], input_ids [B, T] -> scalar mean over B*(T-1) tokens, or [B] per sequence.
    Computed in float32 whatever the autocast dtype, as HF models do; the per-token NLL is
    :func:`~gqa_uptrain.evaluation.perplexity.next_token_nll`, the one perplexity is defined by.
    """
    nll, tokens = next_token_nll(logits, input_ids)  # [B], [B] (T - 1 each)
    per_seq = nll / tokens
    return per_seq if per_sequence else per_seq.mean()


def kl_to_teacher(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over [B, T]; scaled by T² (Hinton et al.) so its
    gradient magnitude does not shrink with the temperature."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, T, V]
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [B, T, V]
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2
