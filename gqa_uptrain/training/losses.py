"""The training objectives: next-token cross-entropy, and KL to a teacher for distillation.

Two ways to compute them:

* from the model's logits (:func:`causal_lm_loss`, :func:`kl_to_teacher`): the plain definitions,
  which need the whole float32 ``[B, T, V]`` logits (and autograd keeps them, and their softmax,
  for the backward pass);
* from the last hidden states and the output projection (:func:`chunked_lm_loss`): the same values
  computed ``chunk_tokens`` positions at a time, each chunk's gradient taken at once in the forward
  pass, so no ``[B, T, V]`` tensor ever exists. At a 128k vocabulary and 16k tokens per micro-batch
  the plain path holds 8 GiB of float32 logits plus their gradient; the chunked one holds one
  chunk's. :class:`OutputHead` turns the model's output projection into a pass-through so that the
  model returns hidden states, after checking on a few tokens that the projection is all that lies
  between them and the logits (no soft-capping or logit scaling it cannot see).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..evaluation.perplexity import next_token_nll

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------------
# The chunked loss: hidden states + output projection -> loss, one chunk of positions at a time
# --------------------------------------------------------------------------------------------------


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Position t's target is token t+1; the last position has none (-100). [B, T] -> [B*T]."""
    return F.pad(input_ids[:, 1:], (0, 1), value=-100).reshape(-1)


class _ChunkedHeadLoss(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None) -> (mean cross-entropy, mean KL), chunk by chunk.

    The gradients of both terms with respect to the hidden states, weight and bias are computed in
    the forward pass while each chunk's logits exist (softmax minus one-hot for the cross-entropy,
    T·(p_student − p_teacher) for the KL), and scaled by the incoming gradients in the backward pass:
    one matrix product forward and two backward per chunk, as autograd would do, but never more than
    one chunk's ``[n, V]`` logits at a time.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,  # [N, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        targets: torch.Tensor,  # [N], -100 = no target
        teacher: torch.Tensor | None,  # [N, V] teacher logits, or None
        temperature: float,
        chunk: int,
        compute_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_rows = hidden.shape[0]
        want_grad = any(ctx.needs_input_grad[:3])
        n_scored = (targets != -100).sum().clamp_min(1)  # tensor: no host sync
        w = weight.to(compute_dtype)  # [V, H]
        ce_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        kl_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grads: dict[str, list[torch.Tensor | None]] = {}
        for term in ("ce", "kl") if teacher is not None else ("ce",):
            grads[term] = [
                torch.empty_like(hidden) if ctx.needs_input_grad[0] else None,
                torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None,
                torch.zeros_like(bias, dtype=torch.float32)
                if bias is not None and ctx.needs_input_grad[2]
                else None,
            ]
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            h = hidden[start:end].to(compute_dtype)  # [n, H]
            logits = h @ w.T  # [n, V], in the compute dtype as the model's own head would be
            if bias is not None:
                logits = logits + bias.to(compute_dtype)
            logits = logits.float()  # [n, V]: the loss in float32, as HF models compute it
            tgt = targets[start:end]  # [n]
            valid = tgt != -100  # [n]
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            picked = logits.gather(1, tgt.clamp_min(0)[:, None]).squeeze(1)  # [n]
            ce_sum += torch.where(valid, lse - picked, 0.0).sum()
            d_terms: dict[str, torch.Tensor] = {}
            if want_grad:
                # d(mean CE)/d logits = (softmax - onehot) / n_scored on scored rows.
                d = torch.exp(logits - lse[:, None])  # [n, V]
                d.scatter_add_(1, tgt.clamp_min(0)[:, None], -torch.ones_like(lse)[:, None])
                d *= (valid.float() / n_scored)[:, None]
                d_terms["ce"] = d
            if teacher is not None:
                s_logp = F.log_softmax(logits / temperature, dim=-1)  # [n, V]
                t_logp = F.log_softmax(teacher[start:end].float() / temperature, dim=-1)  # [n, V]
                t_p = t_logp.exp()
                kl_sum += (t_p * (t_logp - s_logp)).sum()
                if want_grad:
                    # d(T² · mean KL)/d logits = T · (p_student - p_teacher) / N over all N rows.
                    d_terms["kl"] = (s_logp.exp() - t_p) * (temperature / n_rows)
            for term, d in d_terms.items():
                g_h, g_w, g_b = grads[term]
                dc = d.to(compute_dtype)  # [n, V]
                if g_h is not None:
                    g_h[start:end] = (dc @ w).to(hidden.dtype)  # [n, H]
                if g_w is not None:
                    g_w += (dc.T @ h).float()  # [V, H]
                if g_b is not None:
                    g_b += d.sum(0)  # [V]
        ctx.grads = grads
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        kl = kl_sum * temperature**2 / n_rows
        return ce_sum / n_scored, kl

    @staticmethod
    def backward(ctx, g_ce: torch.Tensor, g_kl: torch.Tensor):  # type: ignore[override]
        out: list[torch.Tensor | None] = [None, None, None]
        for term, g in (("ce", g_ce), ("kl", g_kl)):
            if term not in ctx.grads:
                continue
            for i, t in enumerate(ctx.grads[term]):
                if t is not None:
                    out[i] = t * g if out[i] is None else out[i] + t * g
        w_dtype, b_dtype = ctx.dtypes
        if out[1] is not None:
            out[1] = out[1].to(w_dtype)
        if out[2] is not None:
            out[2] = out[2].to(b_dtype)
        ctx.grads = None
        return out[0], out[1], out[2], None, None, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    input_ids: torch.Tensor,
    chunk_tokens: int = 4096,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token cross-entropy (and KL to a teacher) from hidden states, never materialising [B, T, V].

    hidden [B, T, H] (the model's last hidden states, after its final norm), weight [V, H] and
    bias [V] (the output projection), input_ids [B, T], teacher_logits [B, T, V] or None ->
    (mean cross-entropy over the B*(T-1) scored positions, KL(teacher ‖ student) · T² averaged over
    B*T positions or None). Equal to :func:`causal_lm_loss` and :func:`kl_to_teacher` on
    ``hidden @ weight.T + bias`` for blocks of one length (training blocks are), gradients included.
    Under autocast the projection runs in the autocast dtype (as the model's own head would), the
    softmax in float32.
    """
    B, T, H = hidden.shape
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
    with torch.autocast(device_type, enabled=False):
        ce, kl = _ChunkedHeadLoss.apply(
            hidden.reshape(B * T, H),
            weight,
            bias,
            next_token_targets(input_ids),
            teacher_logits.reshape(B * T, -1) if teacher_logits is not None else None,
            float(temperature),
            max(1, int(chunk_tokens)),
            compute_dtype,
        )
    return ce, (kl if teacher_logits is not None else None)


@torch.no_grad()
def chunked_next_token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    input_ids: torch.Tensor,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~gqa_uptrain.evaluation.perplexity.next_token_nll` from hidden states, chunk by chunk.

    hidden [B, T, H], input_ids [B, T] -> (summed NLL [B] in float32, scored tokens [B]).
    """
    B, T, H = hidden.shape
    device_type = hidden.device.type
    cdt = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    targets = next_token_targets(input_ids)  # [B*T]
    flat = hidden.reshape(B * T, H)
    nll = torch.empty(B * T, device=hidden.device, dtype=torch.float32)
    w = weight.to(cdt)
    for start in range(0, B * T, max(1, chunk_tokens)):
        end = min(start + chunk_tokens, B * T)
        logits = flat[start:end].to(cdt) @ w.T  # [n, V]
        if bias is not None:
            logits = logits + bias.to(cdt)
        nll[start:end] = F.cross_entropy(
            logits.float(), targets[start:end], ignore_index=-100, reduction="none"
        )
    return nll.view(B, T).sum(dim=1), (targets.view(B, T) != -100).sum(dim=1)


class OutputHead:
    """The model's output projection, turned into a pass-through while the chunked loss is in use.

    :meth:`attach` replaces the projection module's ``forward`` by the identity (its parameters stay
    where they are, under their own names, so optimizer, checkpoints and the saved model do not
    change) and checks on a few tokens that ``hidden @ weight.T + bias`` reproduces the model's own
    logits: a family that soft-caps or scales its logits after the projection (Gemma 2, Cohere,
    Granite) fails the check and keeps the plain loss. :meth:`detach` restores the module.
    """

    def __init__(self, module: torch.nn.Module, chunk_tokens: int) -> None:
        self.module = module
        self.chunk_tokens = chunk_tokens

    @property
    def weight(self) -> torch.Tensor:
        """The projection's weight [V, H] (tied to the input embeddings in some families)."""
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The projection's bias [V], or None."""
        return getattr(self.module, "bias", None)

    @classmethod
    def attach(cls, model: torch.nn.Module, chunk_tokens: int) -> OutputHead | None:
        """Make ``model`` return hidden states in ``.logits`` and give its head, or ``None`` (with the
        reason logged) when the model's logits are not a plain projection of them."""
        get = getattr(model, "get_output_embeddings", None)
        module = get() if callable(get) else None
        weight = getattr(module, "weight", None)
        if (
            not isinstance(module, torch.nn.Module)
            or not isinstance(weight, torch.Tensor)
            or weight.ndim != 2
        ):
            logger.warning(
                "speed.loss_chunk_tokens: the model has no plain output projection; using the plain loss"
            )
            return None
        head = cls(module, chunk_tokens)
        vocab = weight.shape[0]
        ids = (torch.arange(8, device=weight.device) * 7919 % vocab)[None]  # [1, 8]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                want = model(input_ids=ids, use_cache=False).logits.float()  # [1, 8, V]
                head._install()
                hidden = model(input_ids=ids, use_cache=False).logits  # [1, 8, H]
                got = (hidden.to(weight.dtype) @ weight.T).float()
                if head.bias is not None:
                    got = got + head.bias.float()
        finally:
            model.train(was_training)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
            head.detach()
            logger.warning(
                "speed.loss_chunk_tokens: this model's logits are not a plain projection of its hidden "
                "states (soft-capping or scaling?); using the plain loss"
            )
            return None
        return head

    def _install(self) -> None:
        self.module.forward = _identity  # type: ignore[method-assign]

    def detach(self) -> None:
        """Give the projection module its own ``forward`` back."""
        self.module.__dict__.pop("forward", None)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
