"""Similarity grouping: the partition search, and permuting whole heads leaves the model unchanged."""

from __future__ import annotations

import itertools
import math
import random
import tracemalloc

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqa_uptrain.conversion.pipeline import convert
from gqa_uptrain.merging.aligned import CalibratedMerge
from gqa_uptrain.merging.grouping import (
    EXHAUSTIVE_LIMIT,
    MAX_EVALS,
    _partitions,
    best_partition,
    count_partitions,
    kv_permutation,
    query_permutation,
)


def _logits(folder, x):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("n", [8, 16])  # exhaustive search, and greedy + swaps
def test_best_partition_finds_planted_groups(n):
    size = 4
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(n)) % (n // size)

    def cost(group):  # zero for a planted group, positive for any mixed one
        return float(len({int(labels[h]) for h in group}) - 1)

    groups = best_partition(n, size, cost)
    assert sorted(h for g in groups for h in g) == list(range(n))
    assert all(cost(g) == 0 for g in groups)


@pytest.mark.parametrize(("n", "size"), [(4, 2), (6, 2), (6, 3), (8, 2), (8, 4), (9, 3), (10, 5), (12, 4)])
def test_count_partitions_is_the_closed_form(n, size):
    assert count_partitions(n, size) == sum(1 for _ in _partitions(tuple(range(n)), size))
    assert count_partitions(n, size) == math.factorial(n) // (
        math.factorial(size) ** (n // size) * math.factorial(n // size)
    )


def test_count_partitions_at_real_head_counts_costs_nothing():
    tracemalloc.start()
    try:
        assert count_partitions(32, 16) == math.comb(31, 15) == 300_540_195  # 32 heads -> 2 groups
        assert count_partitions(64, 8) > 10**47  # 64 heads -> 8 groups
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1e6  # nothing listed
    with pytest.raises(ValueError):
        count_partitions(10, 4)


def _random_cost(seed: int):
    """A deterministic arbitrary cost per group (ties practically impossible)."""

    def cost(group):
        return random.Random(f"{seed}:{group}").random()

    return cost


@pytest.mark.parametrize(("n", "size"), [(6, 2), (6, 3), (8, 2), (8, 4), (9, 3)])
def test_small_cases_are_searched_exhaustively(n, size):
    """Below the limit the result is the true minimum over every partition, as before the bounded search."""
    assert count_partitions(n, size) <= EXHAUSTIVE_LIMIT
    cost = _random_cost(n * 10 + size)
    brute = min(_partitions(tuple(range(n)), size), key=lambda p: sum(cost(g) for g in p))
    assert best_partition(n, size, cost) == sorted(tuple(sorted(g)) for g in brute)


def _points_cost(n: int, num_groups: int, seed: int = 0):
    """Heads as noisy points around ``num_groups`` interleaved centres; a group's cost is its spread
    (sum of squared distances to its mean, via pairwise distances), like mean pooling's error."""
    rng = random.Random(seed)
    centres = [[rng.gauss(0, 1) for _ in range(3)] for _ in range(num_groups)]
    pts = [[c + 0.3 * rng.gauss(0, 1) for c in centres[h % num_groups]] for h in range(n)]
    dist = [[sum((a - b) ** 2 for a, b in zip(p, q, strict=True)) for q in pts] for p in pts]
    calls = [0]

    def cost(group):
        calls[0] += 1
        return sum(dist[a][b] for a, b in itertools.combinations(group, 2)) / len(group)

    return cost, calls


def _divisors(n):
    return [g for g in range(1, n + 1) if n % g == 0]


@pytest.mark.parametrize(
    ("n", "num_groups", "pairwise"),
    [(32, g, False) for g in _divisors(32)]
    + [(64, g, False) for g in _divisors(64)]
    + [(32, 4, True), (64, 8, True)],
)
def test_search_is_bounded_at_real_head_counts(n, num_groups, pairwise):
    """32 and 64 K/V heads into every group count: a valid equal-size partition, no worse than
    contiguous groups, a bounded number of cost calls and little memory (the search used to list
    every partition: C(31, 15) = 3e8 tuples for 32 heads into 2 groups). Its time is printed by
    scripts/bench_convert.py, not asserted here."""
    size = n // num_groups
    cost, calls = _points_cost(n, num_groups)
    tracemalloc.start()
    try:
        groups = best_partition(n, size, cost, pairwise=pairwise, max_exact_evals=200 if pairwise else 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"{peak / 1e6:.1f} MB"
    assert sorted(h for g in groups for h in g) == list(range(n))
    assert all(len(g) == size for g in groups)
    contiguous = [tuple(range(i, i + size)) for i in range(0, n, size)]
    assert sum(cost(g) for g in groups) <= sum(cost(g) for g in contiguous) + 1e-9
    # greedy seeding (< n^2 / 2 calls), the budget, the comparisons; pairwise: n(n-1)/2 pair calls
    assert calls[0] <= MAX_EVALS + n * n + 4 * num_groups + (200 if pairwise else 0)
    if 1 < num_groups < n:  # interleaved clusters: the search gets within 10% of the planted groups
        planted = [tuple(range(c, n, num_groups)) for c in range(num_groups)]
        assert sum(cost(g) for g in groups) <= 1.1 * sum(cost(g) for g in planted)


def test_query_permutation_moves_query_heads_with_their_kv_head():
    kv = kv_permutation([(2, 0), (1, 3)])
    assert kv.tolist() == [2, 0, 1, 3]
    assert query_permutation(kv, 8).tolist() == [4, 5, 0, 1, 2, 3, 6, 7]


class _RandomPermutation(CalibratedMerge):
    """Mean pooling at G = Hkv (a copy) after a random permutation of the heads in every module."""

    def prepare(self, src, num_kv_heads):
        super().prepare(src, num_kv_heads)
        gen = torch.Generator().manual_seed(0)
        for plan in self.plans.values():
            hkv = int(src.config.get("num_key_value_heads") or src.config["num_attention_heads"])
            while plan.kv_perm is None or torch.equal(plan.kv_perm, torch.arange(hkv)):
                plan.kv_perm = torch.randperm(hkv, generator=gen)


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {}),  # GQA source: query heads move with their K/V head
        ("qwen2", {}),  # biases
        ("olmo2", {}),  # whole-projection q/k norms
        ("stablelm", {"qk_layernorm": True}),  # one norm module per head
        ("phi3", {}),  # fused qkv_proj
    ],
)
def test_permuting_heads_leaves_logits_unchanged(make_model, tmp_path, model_type, extra):
    folder, model = make_model(model_type, num_heads=8, num_kv_heads=4, **extra)
    x = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    method = _RandomPermutation(
        "mean", grouping="similarity", tokens=torch.randint(3, 128, (2, 16)), progress=False
    )
    convert(folder, tmp_path / "out", 4, method, progress=False)
    assert all(p.kv_perm is not None for p in method.plans.values())
    # the tensors did change (heads moved) ...
    from safetensors.torch import load_file

    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # ... the function did not
    with torch.no_grad():
        ref = model(x).logits
    torch.testing.assert_close(_logits(tmp_path / "out", x), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_similarity_grouping_finds_interleaved_twins(make_model, tmp_path):
    """Heads 0=2 and 1=3: contiguous groups mix different heads, similarity groups pair the twins,
    so similarity + mean is lossless and contiguous + mean is not."""
    folder, model = make_model("llama", num_heads=4, num_kv_heads=4)
    d = model.config.hidden_size // 4
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.view(4, d, -1)
            w[2], w[3] = w[0], w[1]
    model.save_pretrained(folder)
    x = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = model(x).logits
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    for name, grouping in itertools.product(["mean", "aligned"], ["contiguous", "similarity"]):
        method = CalibratedMerge(name, grouping=grouping, tokens=calib, progress=False)
        out = tmp_path / f"{name}-{grouping}"
        result = convert(folder, out, 2, method, progress=False)
        err = (_logits(out, x) - ref).abs().max().item()
        if grouping == "similarity":
            assert err < 1e-3, (name, err)
            assert any("permuted into similarity groups in 2 of 2" in n for n in result.extra["card_notes"])
        elif name == "mean":
            assert err > 1e-2


@torch.no_grad()
@pytest.mark.parametrize(("num_heads", "num_groups"), [(32, 2), (32, 4), (32, 8), (64, 8)])
def test_similarity_finds_interleaved_groups_at_real_head_counts(make_model, tmp_path, num_heads, num_groups):
    """32 and 64 K/V heads (narrow: head_dim 4) whose K/V heads are tied in interleaved groups
    (head h copies head h % G): only those groups merge losslessly, contiguous ones mix different
    heads. Similarity grouping through the real calibration costs finds them for mean and aligned,
    so the converted model reproduces the original."""
    folder, model = make_model(
        "llama", num_heads=num_heads, num_kv_heads=num_heads, hidden=4 * num_heads, num_hidden_layers=1
    )
    d = 4
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.view(num_heads, d, -1)
            w.copy_(w[torch.arange(num_heads) % num_groups])
    model.save_pretrained(folder)
    x = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    ref = model(x).logits
    calib = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    for name in ("mean", "aligned"):
        method = CalibratedMerge(name, grouping="similarity", tokens=calib, progress=False)
        out = tmp_path / f"{name}-{num_heads}-{num_groups}"
        convert(folder, out, num_groups, method, progress=False)
        (plan,) = method.plans.values()
        size = num_heads // num_groups
        groups = plan.kv_perm.view(num_groups, size) % num_groups
        assert (groups == groups[:, :1]).all(), (name, plan.kv_perm)  # each group one tied class
        torch.testing.assert_close(_logits(out, x), ref, rtol=1e-4, atol=1e-4)
