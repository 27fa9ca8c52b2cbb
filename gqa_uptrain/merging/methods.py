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
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

import torch

from ..architectures.base import Role
from ..errors import ConfigError
from .grouping import GROUPINGS

if TYPE_CHECKING:
    from ..io.checkpoint import Source
    from .calibration import CalibrationSpec
    from .refine import RefineSpec

logger = logging.getLogger(__name__)

HeadBlocks = dict[str, dict[Role, torch.Tensor]]  # tensor suffix -> role -> [n_heads, d, *rest]


@dataclass(frozen=True)
class MergeContext:
    """What a method may need besides the blocks."""

    module_name: str  # e.g. "model.layers.3.self_attn"
    num_kv_heads: int  # G, the target
    seed: int = 0


class MergeMethod(Protocol):
    """Reduces one attention module's K/V heads to ``ctx.num_kv_heads``.

    What the converter needs to know about a method is declared here, so it treats every method
    alike (:class:`BaseMethod` gives the defaults):

    - ``kv_only``: only K/V blocks change, so query and output projections of their own may be
      copied byte for byte instead of decoded and re-encoded;
    - ``grouping``: which heads share a group (``contiguous`` or ``similarity``), credited in the card;
    - ``prepare(src, G)``: runs once on the source before streaming (calibration, fitting);
    - ``card_notes()``: lines the model card adds about the method (data used, fallbacks).
    """

    name: str
    kv_only: bool
    grouping: str

    def prepare(self, src: Source, num_kv_heads: int) -> None: ...

    def merge(self, blocks: HeadBlocks, ctx: MergeContext) -> HeadBlocks: ...

    def card_notes(self) -> list[str]: ...


class BaseMethod:
    """Defaults of the :class:`MergeMethod` protocol: no preparation, no card notes, contiguous
    groups, and Q/O possibly changed (a subclass that touches only K/V sets ``kv_only``)."""

    name = ""
    kv_only = False
    grouping = "contiguous"

    def prepare(self, src: Source, num_kv_heads: int) -> None:
        """Nothing to do before streaming."""

    def merge(self, blocks: HeadBlocks, ctx: MergeContext) -> HeadBlocks:
        raise NotImplementedError

    def card_notes(self) -> list[str]:
        """No notes beyond the method's name."""
        return []


def _group(x: torch.Tensor, g: int) -> torch.Tensor:
    """[Hkv, d, *rest] -> [G, Hkv/G, d, *rest]: contiguous runs of heads form a group."""
    return x.reshape(g, x.shape[0] // g, *x.shape[1:])


def _kind(suffix: str) -> str:
    if "norm" in suffix:
        return "norm"
    return "bias" if suffix.endswith("bias") else "weight"


class _PerBlock(BaseMethod):
    """Base for methods that treat every K/V block on its own."""

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


@dataclass(frozen=True)
class MethodOptions:
    """What a method is built with: calibration text (for methods that fit on it), the grouping,
    whether long steps show progress, and the layer-wise refinement budget of calibrated methods
    (None: closed-form fit only)."""

    calibration: CalibrationSpec | None = None
    grouping: str = "contiguous"
    progress: bool = True
    refine: RefineSpec | None = None
    device: str | None = None  # where calibrated methods compute: auto (None), cpu, cuda, cuda:N
    max_device_memory: int | None = None  # bytes they may keep there (None: most of a GPU's free memory)


# A registry entry builds a fresh method per conversion: calibrated methods keep per-run state (the
# fitted maps), so one shared instance would carry a conversion's fits into the next.
MethodFactory = Callable[[MethodOptions], MergeMethod]


_REGISTRY: dict[str, MethodFactory] = {}
# Methods that group heads by similarity need calibration: the factory for "mean" with
# ``grouping="similarity"`` is registered by the module that calibrates (aligned.py).
_SIMILARITY: dict[str, MethodFactory] = {}

# Names -> factories, in registration order (a live read-only view: aligned.py registers "aligned"
# when ``gqa_uptrain.merging`` is imported, so this module never imports the methods built on it).
METHODS: Mapping[str, MethodFactory] = MappingProxyType(_REGISTRY)


def register_method(name: str, factory: MethodFactory, *, similarity: MethodFactory | None = None) -> None:
    """Add (or replace) method ``name``; ``similarity`` builds it for ``grouping="similarity"``
    (a method registered without one refuses that grouping)."""
    _REGISTRY[name] = factory
    if similarity is not None:
        _SIMILARITY[name] = similarity


def register_similarity(name: str, factory: MethodFactory) -> None:
    """Let the registered method ``name`` run with similarity grouping, built by ``factory``."""
    _SIMILARITY[name] = factory


def _plain(cls: type[_PerBlock]) -> MethodFactory:
    def build(opts: MethodOptions) -> MergeMethod:
        if opts.grouping == "contiguous":
            return cls()
        similarity = _SIMILARITY.get(cls.name)
        if similarity is None:
            raise ConfigError(f"--grouping similarity works with --method aligned or mean, not {cls.name!r}")
        return similarity(opts)

    return build


for _cls in (MeanPooling, FirstHead, RandomInit):
    register_method(_cls.name, _plain(_cls))


def build_method(
    name: str,
    calibration: CalibrationSpec | None = None,
    grouping: str = "contiguous",
    *,
    progress: bool = True,
    refine: RefineSpec | None = None,
    device: str | None = None,
    max_device_memory: int | None = None,
) -> MergeMethod:
    """A fresh merge method ``name`` built with its options (a clear error for unknown names).

    ``refine`` is the layer-wise refinement budget for the calibrated methods (``aligned``, and
    ``mean`` with similarity groups); other methods refuse it. ``device`` and
    ``max_device_memory``: where calibrated methods compute and how much they may keep there
    (:mod:`~gqa_uptrain.merging.device`); the others compute nothing and ignore them.
    """
    if grouping not in GROUPINGS:
        raise ConfigError(f"unknown --grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
    factory = METHODS.get(name)
    if factory is None:
        if grouping == "similarity":
            raise ConfigError(f"--grouping similarity works with --method aligned or mean, not {name!r}")
        raise ConfigError(f"unknown --method {name!r}; choose one of {', '.join(METHODS)}")
    method = factory(MethodOptions(calibration, grouping, progress, refine, device, max_device_memory))
    if refine is not None and not hasattr(method, "refine"):
        raise ConfigError(
            f"layer-wise refinement needs a calibrated method: use --method aligned, not {name!r} (or --no-refine)"
        )
    if calibration is not None and getattr(method, "calibration", None) is None:
        logger.warning("--calibration is not used by --method %s with contiguous groups", name)
    return method


def get_method(name: str) -> MergeMethod:
    """A fresh merge method called ``name`` with default options; a clear error for an unknown one.

    ``aligned`` built this way has no calibration text and asks for it when the conversion starts;
    use :func:`build_method` to give it some.
    """
    return build_method(name)
