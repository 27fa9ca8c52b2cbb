"""How the K/V heads of a group become one head.

A method receives one attention module's head blocks (``{tensor suffix: {role: [n, d, *rest]}}``,
see ``architectures/base.py``) and returns them with the K and V blocks reduced from ``Hkv`` to
``G`` heads. Query and output blocks pass through unchanged for the paper's methods; richer
methods (which fold per-head maps into Q or O) may change them too, as long as shapes are kept.

The paper's methods (Ainslie et al. 2023, Figure 4: mean > first > random):
- ``mean``: each group's heads are averaged (weights, biases and K-norm slices alike);
- ``first``: each group keeps its first head;
- ``random``: new K/V heads are drawn at random (normal, with the standard deviation of the
  tensor they replace; biases start at zero; norm weights are averaged, since a random norm scale
  is not an initialisation anyone uses).

Beyond the paper, ``aligned`` (``aligned.py``) fits each group's shared head on calibration
activations and folds each member's map into Q and O; it needs calibration text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from ..architectures.base import Role
from .aligned import CalibratedMerge

HeadBlocks = dict[str, dict[Role, torch.Tensor]]  # tensor suffix -> role -> [n_heads, d, *rest]


@dataclass(frozen=True)
class MergeContext:
    """What a method may need besides the blocks."""

    module_name: str  # e.g. "model.layers.3.self_attn"
    num_kv_heads: int  # G, the target
    seed: int = 0


class MergeMethod(Protocol):
    """Reduces one attention module's K/V heads to ``ctx.num_kv_heads``."""

    name: str

    def merge(self, blocks: HeadBlocks, ctx: MergeContext) -> HeadBlocks: ...


def _group(x: torch.Tensor, g: int) -> torch.Tensor:
    """[Hkv, d, *rest] -> [G, Hkv/G, d, *rest]: contiguous runs of heads form a group."""
    return x.reshape(g, x.shape[0] // g, *x.shape[1:])


def _kind(suffix: str) -> str:
    if "norm" in suffix:
        return "norm"
    return "bias" if suffix.endswith("bias") else "weight"


class _PerBlock:
    """Base for methods that treat every K/V block on its own."""

    name = ""
    # Only K/V blocks change: the converter may copy query and output projections byte for byte
    # (kernel-side, never decoded) instead of reading them into tensors.
    kv_only = True

    def merge(self, blocks: HeadBlocks, ctx: MergeContext) -> HeadBlocks:
        out: HeadBlocks = {}
        for suffix, parts in blocks.items():
            out[suffix] = dict(parts)
            for role in ("k", "v"):
                if role in parts:
                    x = parts[role]
                    if x.shape[0] == ctx.num_kv_heads:
                        continue  # nothing to merge: keep the tensor bit for bit
                    y = self.merge_block(x.float(), ctx, f"{ctx.module_name}.{suffix}.{role}", _kind(suffix))
                    out[suffix][role] = y.to(x.dtype)
        return out

    def merge_block(self, x: torch.Tensor, ctx: MergeContext, key: str, kind: str) -> torch.Tensor:
        raise NotImplementedError


class MeanPooling(_PerBlock):
    """The paper's method: the mean of each group's heads."""

    name = "mean"

    def merge_block(self, x, ctx, key, kind):
        return _group(x, ctx.num_kv_heads).mean(dim=1)  # [G, d, *rest]


class FirstHead(_PerBlock):
    """The paper's ablation: each group keeps its first head."""

    name = "first"

    def merge_block(self, x, ctx, key, kind):
        return _group(x, ctx.num_kv_heads)[:, 0].clone()


class RandomInit(_PerBlock):
    """The paper's ablation: new K/V heads drawn at random, reproducibly from ``seed``."""

    name = "random"

    def merge_block(self, x, ctx, key, kind):
        g = ctx.num_kv_heads
        if kind == "norm":
            return _group(x, g).mean(dim=1)
        if kind == "bias":
            return torch.zeros(g, *x.shape[1:])
        # Seeded by the tensor's name so the result does not depend on processing order.
        seed = int.from_bytes(hashlib.sha256(f"{ctx.seed}:{key}".encode()).digest()[:8], "little")
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(g, *x.shape[1:], generator=gen) * x.std()


# ``aligned`` (aligned.py) fits merged heads on calibration data: as registered here it has none and
# asks for it; the CLI and library callers pass a CalibratedMerge built with their data.
METHODS: Mapping[str, MergeMethod] = {
    m.name: m for m in (MeanPooling(), FirstHead(), RandomInit(), CalibratedMerge("aligned"))
}


def get_method(name: str) -> MergeMethod:
    """The merge method called ``name``; a clear error for an unknown one."""
    from ..errors import ConfigError

    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown --method {name!r}; choose one of {', '.join(METHODS)}") from None
