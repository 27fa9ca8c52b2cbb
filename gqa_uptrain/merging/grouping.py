"""Which K/V heads share a group, and moving them next to each other.

transformers' ``repeat_kv`` makes the group of K/V head ``j`` the contiguous run of source K/V
heads ``j*g .. j*g+g-1``. ``similarity`` grouping picks equal-size groups by how well their heads
merge on calibration data (QCQA, arXiv 2406.10247; align-then-merge, arXiv 2412.20677), then
permutes whole heads (Q rows, K/V rows, O columns, biases, per-head norms together) so every group
is contiguous. A K/V head moves together with the ``H / Hkv`` query heads that read it, so the
permutation alone leaves the model's function unchanged.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

GROUPINGS = ("contiguous", "similarity")
Group = tuple[int, ...]
EXHAUSTIVE_LIMIT = 5000  # partitions evaluated exactly up to this count, else greedy + swaps
# Cost evaluations the bounded search may spend (greedy seeding always completes; it needs about
# n^2 / 2). Each swap round costs about n^2 evaluations, so 32 heads get ~20 rounds, 64 heads ~4.
MAX_EVALS = 20_000


def count_partitions(n: int, size: int) -> int:
    """How many ways ``range(n)`` splits into unlabelled groups of ``size``: ``n! / (size!^(n/size) (n/size)!)``.

    Closed form (the first remaining item picks its ``size - 1`` partners, then recurse), so the
    count costs nothing even where it is astronomically large (64 heads in 8 groups: ~4.5e47).
    """
    if size <= 0 or n % size:
        raise ValueError(f"{n} items do not split into groups of {size}")
    total, left = 1, n
    while left > size:
        total *= math.comb(left - 1, size - 1)
        left -= size
    return total


def _partitions(items: tuple[int, ...], size: int) -> Iterator[list[Group]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        left = tuple(x for x in rest if x not in others)
        for tail in _partitions(left, size):
            yield [(first, *others), *tail]


class _CachedCost:
    """``cost`` memoised on the sorted group, counting the distinct groups it evaluated."""

    def __init__(self, cost: Callable[[Group], float]):
        self.cost = cost
        self.cache: dict[Group, float] = {}

    @property
    def evals(self) -> int:
        return len(self.cache)

    def __call__(self, group: Sequence[int]) -> float:
        key = tuple(sorted(group))
        if key not in self.cache:
            self.cache[key] = self.cost(key)
        return self.cache[key]


def best_partition(
    n: int,
    size: int,
    cost: Callable[[Group], float],
    max_rounds: int = 20,
    max_evals: int = MAX_EVALS,
    *,
    pairwise: bool = False,
    max_exact_evals: int = 0,
) -> list[Group]:
    """Equal groups of ``size`` out of ``range(n)`` with a small total ``cost`` (lower is better).

    Up to :data:`EXHAUSTIVE_LIMIT` partitions (counted in closed form, never listed), every one is
    evaluated and the cheapest kept. Above it the search is bounded: greedy seeding (each group
    starts from the smallest head left and grows by its cheapest addition), or the contiguous
    groups if those cost less, then pairwise swaps between groups, kept when they lower the total,
    for at most ``max_rounds`` passes and ``max_evals`` cost evaluations in all (seeding included,
    and always finished). Memory is one cached float per evaluated group, at any head count.

    ``pairwise``: for a ``cost`` too slow to call thousands of times on large groups, the bounded
    search scores a group by the sum of ``cost`` over its pairs instead (``n(n-1)/2`` calls on
    pairs, made once), then polishes the result with swaps scored by ``cost`` itself, for at most
    ``max_exact_evals`` calls of it on groups.

    The result is never worse than contiguous grouping under ``cost``. Groups come back sorted by
    their smallest member, members sorted, so the result is canonical.
    """
    if size == 1 or size == n:
        return [tuple(range(i, i + size)) for i in range(0, n, size)]
    exact = _CachedCost(cost)
    count = count_partitions(n, size)
    if count <= EXHAUSTIVE_LIMIT:
        best = min(_partitions(tuple(range(n)), size), key=lambda p: sum(exact(g) for g in p))
        return sorted(tuple(sorted(g)) for g in best)

    c = _CachedCost(_pair_sum(n, cost) if pairwise else cost)
    contiguous = [list(range(i, i + size)) for i in range(0, n, size)]
    groups = _greedy_groups(n, size, c)
    if sum(c(g) for g in contiguous) < sum(c(g) for g in groups):
        groups = contiguous
    rounds = _swap_search(groups, c, max_rounds, max_evals)
    if pairwise:
        # The stand-in's optimum is not the cost's: polish with the cost, and keep the guarantee.
        rounds += _swap_search(groups, exact, max_rounds, max_exact_evals) if max_exact_evals else 0
        if sum(exact(g) for g in contiguous) <= sum(exact(g) for g in groups):
            groups = contiguous
    logger.debug(
        "partition of %d into groups of %d (%.3g partitions): %d evaluations (%d of the cost), %d swap rounds",
        n, size, count, c.evals, exact.evals, rounds,
    )  # fmt: skip
    return sorted(tuple(sorted(g)) for g in groups)


def _pair_sum(n: int, cost: Callable[[Group], float]) -> Callable[[Group], float]:
    """A group's stand-in cost: the sum of ``cost`` over its pairs (all pairs evaluated here)."""
    pc = [[0.0] * n for _ in range(n)]
    for a, b in itertools.combinations(range(n), 2):
        pc[a][b] = pc[b][a] = cost((a, b))

    def summed(group: Group) -> float:
        return sum(pc[a][b] for a, b in itertools.combinations(group, 2))

    return summed


def _greedy_groups(n: int, size: int, c: _CachedCost) -> list[list[int]]:
    """Each group starts from the smallest head left and grows by its cheapest addition."""
    left = set(range(n))
    groups: list[list[int]] = []
    while left:
        group = [min(left)]
        left.discard(group[0])
        while len(group) < size:
            # sorted: ties go to the smallest head, whatever the set's iteration order
            nxt = min(sorted(left), key=lambda x: c([*group, x]))
            group.append(nxt)
            left.discard(nxt)
        groups.append(group)
    return groups


def _swap_search(groups: list[list[int]], c: _CachedCost, max_rounds: int, max_evals: int) -> int:
    """Improve ``groups`` in place by swapping members between pairs of groups (first improvement).

    Stops after a pass with no improvement, ``max_rounds`` passes, or once ``c`` has evaluated
    ``max_evals`` groups; returns the passes run.
    """
    size = len(groups[0])
    for rnd in range(max_rounds):
        improved = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            if c.evals >= max_evals:
                return rnd + 1
            base = c(groups[a]) + c(groups[b])
            for i, j in itertools.product(range(size), range(size)):
                if c.evals >= max_evals:
                    return rnd + 1
                ga, gb = list(groups[a]), list(groups[b])
                ga[i], gb[j] = gb[j], ga[i]
                new = c(ga) + c(gb)
                if new < base - 1e-12:
                    groups[a], groups[b], base, improved = ga, gb, new, True
        if not improved:
            return rnd + 1
    return max_rounds


def kv_permutation(groups: Sequence[Group]) -> torch.Tensor:
    """``[Hkv]``: new K/V slot -> old K/V head, groups laid out one after the other."""
    return torch.tensor([h for g in groups for h in g], dtype=torch.long)


def query_permutation(kv_perm: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[H]``: new query slot -> old query head; each K/V head brings its ``H/Hkv`` query heads."""
    r = num_heads // kv_perm.numel()
    return (kv_perm[:, None] * r + torch.arange(r)[None, :]).reshape(-1)


def permute_blocks(blocks: dict, kv_perm: torch.Tensor, num_heads: int) -> dict:
    """Head blocks ``{suffix: {role: [n, d, *rest]}}`` with whole heads reordered (Q/O by the query
    permutation, K/V by ``kv_perm``); per-head norms and biases are blocks too, so they follow."""
    q_perm = query_permutation(kv_perm, num_heads)
    out = {}
    for suffix, parts in blocks.items():
        out[suffix] = {}
        for role, x in parts.items():
            perm = kv_perm if role in ("k", "v") else q_perm
            out[suffix][role] = x.index_select(0, perm) if x.shape[0] == perm.numel() else x
    return out
