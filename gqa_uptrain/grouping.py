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
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

GROUPINGS = ("contiguous", "similarity")
Group = tuple[int, ...]
EXHAUSTIVE_LIMIT = 5000  # partitions evaluated exactly below this count, else greedy + swaps


def _count_partitions(n: int, size: int) -> int:
    total, left = 1, n
    while left > size:
        total *= len(list(itertools.combinations(range(left - 1), size - 1)))
        left -= size
    return total


def _partitions(items: tuple[int, ...], size: int):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        left = tuple(x for x in rest if x not in others)
        for tail in _partitions(left, size):
            yield [(first, *others), *tail]


def best_partition(n: int, size: int, cost: Callable[[Group], float], max_rounds: int = 20) -> list[Group]:
    """Equal groups of ``size`` out of ``range(n)`` with a small total ``cost`` (lower is better).

    Exact search when there are few partitions; otherwise greedy construction (each group grows
    from the cheapest seed by the cheapest addition) improved by swapping members between groups.
    Groups come back sorted by their smallest member, members sorted, so the result is canonical.
    """
    if size == 1 or size == n:
        return [tuple(range(i, i + size)) for i in range(0, n, size)]
    cache: dict[Group, float] = {}

    def c(group: Sequence[int]) -> float:
        key = tuple(sorted(group))
        if key not in cache:
            cache[key] = cost(key)
        return cache[key]

    if _count_partitions(n, size) <= EXHAUSTIVE_LIMIT:
        best = min(_partitions(tuple(range(n)), size), key=lambda p: sum(c(g) for g in p))
        return sorted(tuple(sorted(g)) for g in best)

    left = set(range(n))
    groups: list[list[int]] = []
    while left:
        group = [min(left)]
        left.discard(group[0])
        while len(group) < size:
            nxt = min(left, key=lambda x: c([*group, x]))
            group.append(nxt)
            left.discard(nxt)
        groups.append(group)
    for _ in range(max_rounds):
        improved = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            base = c(groups[a]) + c(groups[b])
            for i, j in itertools.product(range(size), range(size)):
                ga, gb = list(groups[a]), list(groups[b])
                ga[i], gb[j] = gb[j], ga[i]
                if c(ga) + c(gb) < base - 1e-12:
                    groups[a], groups[b], base, improved = ga, gb, c(ga) + c(gb), True
        if not improved:
            break
    return sorted(tuple(sorted(g)) for g in groups)


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
