"""Calibration moments ``Σ = E[x̃ x̃ᵀ]`` of an attention module's input (``calibration.py`` walks
the layers that produce them), and how many calibration sequences one forward runs: the parts of
calibration whose memory grows with the model's width."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The most bytes one of a calibration forward's MLP intermediates may take (float32, tokens ×
# intermediate size): wide models run fewer sequences at a time (see :func:`forward_batch_size`).
FORWARD_CHUNK_BYTES = 32 << 20


def forward_batch_size(config: dict[str, Any], seq_len: int, batch_size: int) -> int:
    """Calibration sequences per forward: ``batch_size``, fewer when one MLP intermediate of that
    many tokens would pass :data:`FORWARD_CHUNK_BYTES` (at Llama-2-7B width 8 sequences of 512
    tokens make three 180 MB intermediates beside the 0.8 GB float32 layer; it runs 1 at a time).

    Small models keep their batch, so their moments are summed as before, bit for bit; where it
    shrinks, the moments are the same sums taken in smaller pieces (float64 rounding noise)."""
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    width = int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden)
    if not width:
        return batch_size
    fits = FORWARD_CHUNK_BYTES // max(seq_len * width * 4, 1)
    return int(max(1, min(batch_size, fits)))


class MomentAccumulator:
    """Accumulates ``Σ = E[x̃ x̃ᵀ]`` of a module's input ``x̃ = [x; 1]`` (as a forward pre-hook, or
    fed directly with :meth:`add`)."""

    def __init__(self, defer: bool = False) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0
        # ``defer``: the hook keeps its inputs and :meth:`moments` sums them (in the same order).
        self.defer = defer
        self.pending: list[torch.Tensor] = []

    # Rows of x̃ᵀx̃ computed at a time: the same figures bit for bit as the whole product (each row
    # block is its own product over the same tokens), without a second [n+1, n+1] matrix beside
    # the sum (134 MB at Llama-2-7B width).
    ROW_BLOCK = 512

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` ``[..., n]``."""
        x = x.reshape(-1, x.shape[-1])
        n1 = x.shape[1] + 1
        xt = torch.empty(x.shape[0], n1, dtype=torch.float64, device=x.device)  # x̃ = [x; 1]: [N, n+1]
        xt[:, :-1] = x
        xt[:, -1] = 1
        first = self.sum is None
        if first:
            self.sum = torch.empty(n1, n1, dtype=torch.float64, device=x.device)
        for j in range(0, n1, self.ROW_BLOCK):
            rows = xt[:, j : j + self.ROW_BLOCK].T @ xt  # [block, n+1]
            if first:
                self.sum[j : j + self.ROW_BLOCK] = rows  # type: ignore[index]
            else:
                self.sum[j : j + self.ROW_BLOCK].add_(rows)  # type: ignore[index]
        self.count += x.shape[0]

    def hook(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook form of :meth:`add`: the module's first input is ``x``."""
        x = args[0] if args else kwargs["hidden_states"]
        if self.defer:
            self.pending.append(x.detach())
        else:
            self.add(x)

    def moments(self, module_name: str, has_qk_norm: bool) -> ModuleMoments:
        """The mean: ``Σ`` (the accumulator is emptied, so the big matrix is freed once consumed)."""
        while self.pending:
            self.add(self.pending.pop(0))
        s, self.sum = self.sum, None
        assert s is not None, f"{module_name} never ran"
        return ModuleMoments(module_name, s.div_(self.count), self.count, has_qk_norm)


@dataclass
class ModuleMoments:
    """What calibration found about one attention module's input."""

    module_name: str  # checkpoint name of the attention module, e.g. ``model.layers.3.self_attn``
    sigma: torch.Tensor  # [n+1, n+1] float64, E[x̃ x̃ᵀ] with x̃ = [x; 1]
    num_tokens: int
    has_qk_norm: bool  # the module normalises K after projecting (a family fact): K is not linear in x
