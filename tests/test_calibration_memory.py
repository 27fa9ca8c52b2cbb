"""The calibration moments computed in less memory are the same figures, bit for bit (issue 22)."""

from __future__ import annotations

import torch

from gqa_uptrain.merging.moments import FORWARD_CHUNK_BYTES, MomentAccumulator, forward_batch_size


def _reference(xs: list[torch.Tensor]) -> torch.Tensor:
    """What the accumulator computed before: ``x̃ᵀx̃`` of each batch as one product, summed."""
    total = None
    for x in xs:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        s = x.T @ x
        total = s if total is None else total.add_(s)
    return total


def test_row_blocks_and_deferred_sums_equal_the_whole_product():
    g = torch.Generator().manual_seed(0)
    # 1,100 + 1 columns: three row blocks of 512; three batches.
    xs = [torch.randn(2, 40, 1100, generator=g) for _ in range(3)]
    want = _reference(xs)
    for defer in (False, True):
        acc = MomentAccumulator(defer=defer)
        for x in xs:
            acc.hook(None, (x,), {})
        assert len(acc.pending) == (3 if defer else 0)
        got = acc.moments("m", False)
        assert got.num_tokens == 240
        assert torch.equal(got.sigma, want / 240)


def test_forward_batch_size_shrinks_only_for_wide_models():
    llama_7b = {"hidden_size": 4096, "intermediate_size": 11008}
    assert forward_batch_size(llama_7b, 512, 8) == 1  # one 512-token MLP intermediate: 22 MB
    assert FORWARD_CHUNK_BYTES < 8 * 512 * 11008 * 4
    smollm2 = {"hidden_size": 576, "intermediate_size": 1536}
    assert forward_batch_size(smollm2, 512, 8) == 8  # unchanged: its moments are summed as before
    assert forward_batch_size({"n_embd": 64}, 32, 8) == 8  # GPT-2 style config: 4 × n_embd
