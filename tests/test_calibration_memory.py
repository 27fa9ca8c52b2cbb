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


def test_peak_rss_is_the_processs_own_not_its_parents():
    """``peak_rss_bytes`` reads the child's own high-water mark: ``ru_maxrss`` would report the peak
    of the (large) process that started it, which is how the dry-run plan's bound once failed in CI."""
    import json
    import subprocess
    import sys

    from gqa_uptrain.merging.memory import peak_rss_bytes

    ballast = bytearray(1 << 30)  # 1 GiB resident in this (the parent) process
    ballast[::4096] = b"\1" * len(ballast[::4096])
    assert peak_rss_bytes() > (1 << 30)
    child = (
        "import json, resource; from gqa_uptrain.merging.memory import peak_rss_bytes; "
        "print(json.dumps([peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))"
    )
    own, inherited = json.loads(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                                              check=True).stdout)  # fmt: skip
    del ballast
    assert 0 < own < 600_000_000, own  # the interpreter and what gqa_uptrain imports
    assert inherited > (1 << 30)  # the parent's peak, carried through exec (why ru_maxrss is not used)
