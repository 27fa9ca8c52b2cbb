"""Perplexity with strided sliding windows (the standard Hugging Face recipe).

Documents are tokenized the way uptraining tokenizes them (``gqa_uptrain.data.text``: no special tokens,
EOS after each document) and concatenated into one stream. Windows of ``max_length`` tokens start
every ``stride`` tokens; each window scores only the tokens the previous window did not (labels
-100 on the overlap), so every token after the first is predicted exactly once, with at least
``max_length - stride`` tokens of context once the stream is long enough
(https://huggingface.co/docs/transformers/perplexity). ``stride = max_length - 1`` is close to
plain chunking (fastest, pessimistic); a smaller stride gives each token more context. The stride
is at most ``max_length - 1``: with non-overlapping windows the first token of every window would
go unscored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError, GQAError

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """Perplexity of one model on one token stream."""

    perplexity: float
    nll_per_token: float  # mean negative log-likelihood, nats
    tokens_scored: int
    max_length: int
    stride: int
    windows: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return asdict(self)


def tokenize_documents(
    texts: Any, tokenizer: Any, max_tokens: int | None = None, add_eos: bool = True, batch_size: int = 256
) -> torch.Tensor:
    """Tokenize an iterable of documents into one 1-D stream of token ids (EOS after each document).

    Stops once ``max_tokens`` tokens are collected (the stream is cut there). Empty documents are
    skipped. Raises :class:`GQAError` when there is no text at all.
    """
    eos = tokenizer.eos_token_id if add_eos else None
    ids: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for row in tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]:
            if row:
                ids.extend(row)
                if eos is not None:
                    ids.append(eos)
        batch.clear()

    for text in texts:
        if isinstance(text, str) and text.strip():
            batch.append(text)
        if len(batch) >= batch_size:
            flush()
            if max_tokens is not None and len(ids) >= max_tokens:
                break
    if batch:
        flush()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise GQAError(
            "the evaluation text is empty (fewer than 2 tokens); point --data at files or a dataset with text"
        )
    return torch.tensor(ids, dtype=torch.long)


def _windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) for each window: tokens ``end - scored .. end-1`` get a loss."""
    out = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(
    model: Any,
    ids: torch.Tensor,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on the token stream ``ids`` (1-D) with strided windows.

    ``stride`` defaults to ``max_length // 2`` and must be below ``max_length``. Windows of equal length are batched ``batch_size``
    at a time (they need no padding). Returns the exponent of the mean NLL over the
    ``len(ids) - 1`` predicted tokens.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError(
            "perplexity of an encoder-decoder model is not defined on plain text; "
            "evaluate it with --skip-perplexity, or use a decoder-only model"
        )
    stride = stride or max(1, max_length // 2)
    # A window's first token has no context inside the window, so windows must overlap by at least
    # one token, or every window would leave one token unscored (a known flaw of the plain recipe).
    if not 1 <= stride < max_length:
        raise ConfigError(f"--stride must be between 1 and --max-length - 1 ({max_length - 1}), got {stride}")
    device = next(model.parameters()).device
    wins = _windows(len(ids), max_length, stride)
    # Group windows of the same length (all but possibly the last) into batches.
    groups: list[list[tuple[int, int, int]]] = []
    for w in wins:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == w[1] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])

    nll_sum = 0.0
    scored = 0
    for group in tqdm(groups, desc="perplexity", unit="batch", disable=not progress, leave=False):
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)  # (B, L)
        labels = x.clone()
        for row, (b, e, trg) in enumerate(group):
            labels[row, : (e - b) - trg] = -100  # overlap with the previous window: context only
        logits = model(input_ids=x, use_cache=False).logits  # (B, L, V)
        # The one next-token NLL (uptraining's held-out perplexity uses it too): position t predicts
        # token t+1, so the first token of the stream is never predicted.
        nll, tokens = next_token_nll(logits, labels)  # (B,), (B,)
        nll_sum += nll.double().sum().item()
        scored += int(tokens.sum())
    mean = nll_sum / scored
    logger.info("perplexity %.3f over %d tokens (%d windows)", math.exp(mean), scored, len(wins))
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll_per_token=mean,
        tokens_scored=scored,
        max_length=max_length,
        stride=stride,
        windows=len(wins),
    )


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood (nats, float32) and scored-token count of each sequence.

    Position t predicts token t+1; labels of -100 are context only, and the last position predicts
    nothing. logits [B, L, V], labels [B, L] -> (nll [B], tokens [B]). Perplexity is
    ``exp(sum(nll) / sum(tokens))`` over all scored tokens (the token-weighted mean NLL): what
    uptraining reports on its held-out blocks (``gqa_uptrain.training.loop.held_out_perplexity``)
    and the definition :func:`perplexity` computes over its windows.
    """
    B, L, V = logits.shape
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy the largest tensor ([B, L, V]).
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, L]
    nll = F.cross_entropy(
        logits.float().reshape(B * L, V), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return nll.view(B, L).sum(dim=1), (targets != -100).sum(dim=1)
