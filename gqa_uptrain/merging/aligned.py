"""Function-aware merging: fit each group's shared K/V head on calibration data, fold the rest into Q and O.

Mean pooling averages K/V heads that were never trained to agree: each head works in its own
basis. ``aligned`` instead fits the shared head to what the group computes on calibration
activations of the original model, and folds each member's map onto the shared head into weights
that stay per head (its query rows, its output-projection columns), so the result is a plain GQA
checkpoint with nothing added at inference (align-then-merge, arXiv 2412.20677; SVD/PCA
initialisation, Yu et al. 2024 and Palu, arXiv 2407.21118).

K norms (Qwen3 ``k_norm``, OLMo2, StableLM ``qk_layernorm``; each family declares them, see
``architectures``) normalise keys after projecting, so
keys are no longer linear in ``x`` and no fold into Q is exact: for those, K is mean-pooled (with a
warning) and values are still aligned.

Layout: this module runs the method per module (calibration, planning, folding while streaming);
``aligned_stats.py`` holds a module's weights and moments and fits them (:class:`ModuleStats`);
``aligned_math.py`` the linear algebra of the fits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..architectures import Architecture, ModuleTensors, get_architecture
from ..errors import ConfigError
from .aligned_math import LinearFit, _balance, linear_fit, pair_fit
from .aligned_stats import POLISH_WORK, ModuleFit, ModuleStats, _augmented, _find, _kind, _write
from .calibration import (
    CalibrationSpec,
    ModuleMoments,
    NotCalibratable,
    calibration_tokens,
    collect_moments,
    iter_isotropic,
)
from .device import resolve_device
from .grouping import (
    GROUPINGS,
    kv_permutation,
    permute_blocks,
    query_permutation,
)
from .memory import release_free_memory, return_large_blocks_at_once
from .methods import (
    BaseMethod,
    HeadBlocks,
    MeanPooling,
    MergeContext,
    MethodOptions,
    build_method,
    register_method,
    register_similarity,
)
from .moments import forward_batch_size
from .refine import BlockStore, ModuleReport, RefineSpec, refine_layers

if TYPE_CHECKING:
    from ..io.checkpoint import Source

logger = logging.getLogger(__name__)


def rotary_dims(config: dict[str, Any], head_dim: int) -> int:
    """How many leading dims of each head RoPE rotates (rotate_half layout); 0 without RoPE.

    A fact of the family (:attr:`~gqa_uptrain.architectures.Architecture.rotary`), read from the
    checkpoint's config.
    """
    rotary = get_architecture(config).rotary
    if rotary.layout != "rotate_half":  # pragma: no cover - every family so far
        raise ConfigError(f"--method aligned does not know the {rotary.layout!r} rotary layout")
    return rotary.dims(config, head_dim)


@dataclass
class _ModulePlan:
    kv_perm: torch.Tensor | None  # new K/V slot -> old K/V head; None: contiguous
    fit: ModuleFit | None  # None: mean pooling after the permutation (unless ``merged``)
    merged: bool = False  # merged in prepare(): the result waits in the block store


class CalibratedMerge(BaseMethod):
    """``aligned`` (or ``mean`` with similarity grouping): needs calibration before streaming.

    ``prepare(src, G)`` runs the calibration pass (see ``calibration.py``) and, as each layer's
    moments arrive, reads that module's weights, chooses its head permutation and fits it; it keeps
    only the permutation and the fitted maps (:class:`ModuleFit`, ``~2·Hkv·d²`` floats), never the
    ``[n+1, n+1]`` moments, so memory does not grow by a moment matrix per layer. ``aligned`` then
    folds the maps into the weights right away and spills the merged blocks to a
    :class:`BlockStore` (refinement trains them first), so nothing per module stays in memory and
    the fit's float64 working copies are gone before the converter streams; ``merge`` takes them
    from the store. Mean pooling after similarity grouping, and the weights-only fallback, merge
    while streaming.
    """

    def __init__(
        self,
        name: str = "aligned",
        calibration: CalibrationSpec | None = None,
        grouping: str = "contiguous",
        *,
        progress: bool = True,
        tokens: torch.Tensor | None = None,
        refine: RefineSpec | None = None,
        device: str | torch.device | None = None,
        max_device_memory: int | None = None,
    ):
        if grouping not in GROUPINGS:
            raise ConfigError(f"unknown --grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
        if name not in ("aligned", "mean"):
            raise ConfigError(f"--grouping similarity works with --method aligned or mean, not {name!r}")
        self.name = name
        self.calibration = calibration
        self.grouping = grouping
        self.progress = progress
        self.tokens = tokens  # pre-tokenized calibration data (library use), else from ``calibration``
        self.refine = refine  # layer-wise refinement after the closed-form fit (None: closed form only)
        # Where calibration, the fits and refinement compute (``auto``: the first GPU if any), and
        # the most bytes they may keep there (None: most of a GPU's free memory).
        self.device = device
        self.max_device_memory = max_device_memory
        self.reports: list[ModuleReport] = []
        self._store: BlockStore | None = None
        self.plans: dict[str, _ModulePlan] = {}
        self.notes: list[str] = []
        self.fallback: str | None = None

    # -- before streaming ----------------------------------------------------------------------
    def prepare(self, src: Source, num_kv_heads: int) -> None:
        """Calibrate on the original model and plan each module (grouping included)."""
        if self.calibration is None and self.tokens is None:
            if self.name == "aligned":
                raise ConfigError(
                    "--method aligned needs calibration text: add --calibration DATA (a text file or folder)"
                )
            raise ConfigError("--grouping similarity needs calibration text: add --calibration DATA")
        arch = get_architecture(src.config)
        dims = arch.converted_dims(src.config)
        self._rot = rotary_dims(src.config, dims.head_dim)
        return_large_blocks_at_once()  # RSS flat with depth (see memory.py)
        self._g = num_kv_heads
        units = _module_tensors(src, arch)
        device = resolve_device(self.device)
        logger.info("calibrating on %s", device)
        tokens = self.tokens if self.tokens is not None else calibration_tokens(src, self.calibration)  # type: ignore[arg-type]

        def on_module(mom: ModuleMoments) -> None:
            self._plan(mom, units[mom.module_name], src, dims.num_heads)

        key_mean: set[str] = set()

        def planned_blocks(mom: ModuleMoments) -> HeadBlocks:
            on_module(mom)
            # Fitted: the moments are not read again. Freed before the merge's float64 copies of the
            # weights are made (134 MB at Llama-2-7B width; the caller still holds ``mom``).
            mom.sigma = mom.sigma.new_empty(0)
            ctx = MergeContext(mom.module_name, num_kv_heads)
            blocks = self._merge_planned(_read_blocks(src, units[mom.module_name]), ctx)
            # merge() takes the merged (or refined) blocks from the store: the fitted maps are not
            # needed again (8.5 MB per layer at Llama-2-7B width, kept for the whole run otherwise).
            plan = self.plans[mom.module_name]
            if plan.fit is not None and plan.fit.key_mean:
                key_mean.add(mom.module_name)
            self.plans[mom.module_name] = _ModulePlan(plan.kv_perm, None, merged=True)
            return blocks

        def merged_now(mom: ModuleMoments) -> None:
            # Without refinement too: merged as soon as fitted, then spilled (in the checkpoint's
            # dtype, what merge() would have returned), so the fitted maps are not kept for the
            # whole run (8 MB per layer at Llama-2-7B width) and streaming holds no float64 copies.
            self._store.put(mom.module_name, planned_blocks(mom))  # type: ignore[union-attr]

        try:
            if self.refine is not None and num_kv_heads < dims.num_kv_heads:
                self._store = BlockStore()
                self.reports = refine_layers(
                    src,
                    tokens,
                    num_kv_heads,
                    self.refine,
                    plan=planned_blocks,
                    store=self._store,
                    progress=self.progress,
                    device=device,
                    max_device_memory=self.max_device_memory,
                )
            else:
                bs = self.calibration.batch_size if self.calibration else 8
                if self.name == "aligned":
                    self._store = BlockStore()
                collect_moments(
                    src,
                    tokens,
                    merged_now if self.name == "aligned" else on_module,
                    batch_size=forward_batch_size(src.config, tokens.shape[1], bs),
                    progress=self.progress,
                    device=device,
                    max_device_memory=self.max_device_memory,
                )
        except NotCalibratable as e:
            self.fallback = str(e)
            logger.warning(
                "%s cannot be calibrated layer by layer (%s): fitting from the weights alone (isotropic inputs)",
                arch.name,
                e,
            )
            self.plans.clear()
            self.reports.clear()
            key_mean.clear()
            if self._store is not None:
                self._store.close()
                self._store = None
            for mom in iter_isotropic(src):
                self._plan(mom, units[mom.module_name], src, dims.num_heads)
        n_norm = len(key_mean) + sum(1 for p in self.plans.values() if p.fit is not None and p.fit.key_mean)
        logger.debug(
            "calibrated %d modules; fitted maps kept until streaming: %.1f MB",
            len(self.plans),
            sum(p.fit.nbytes for p in self.plans.values() if p.fit is not None) / 1e6,
        )
        if self.name == "aligned" and n_norm:
            logger.warning(
                "%s normalises keys (q/k norms): keys are mean-pooled in %d modules, values aligned%s",
                arch.name,
                n_norm,
                " (then refined)" if self.reports else "",
            )
        self._card_notes(tokens, n_norm)

    def _plan(self, mom: ModuleMoments, unit: ModuleTensors, src: Source, num_heads: int) -> None:
        """Group (similarity) and fit (aligned) one module as soon as its moments exist; the moments
        are dropped when this returns."""
        perm = None
        blocks = _read_blocks(src, unit) if self.grouping == "similarity" or self.name == "aligned" else {}
        if self.grouping == "similarity":
            stats = ModuleStats.build(blocks, mom.sigma, self._rot, mom.has_qk_norm)
            hkv = stats.wk.shape[0]
            groups = stats.similarity_groups(self._g, aligned=self.name == "aligned")
            del stats  # its cost tables are as large as the moments
            perm = kv_permutation(groups)
            if torch.equal(perm, torch.arange(hkv)):
                perm = None
            logger.debug("%s: groups %s", mom.module_name, groups)
        fit = None
        if self.name == "aligned":
            if perm is not None:  # fit the heads in the order merge() will see them
                n_q = blocks[_find(blocks, "q", "weight")]["q"].shape[0]  # type: ignore[index]
                blocks = permute_blocks(blocks, perm, n_q)
            # Rounded through float32 as the moments were stored before fits moved here, so the
            # converted weights stay bit for bit what earlier releases wrote. In place: the moments
            # are not used again, and a second float64 copy is 134 MB at Llama-2-7B width.
            sigma = mom.sigma.copy_(mom.sigma.float())
            # Fitted where the moments are (the device); the small maps are kept on the host, where
            # the converter streams the weights they are folded into. The checkpoint's blocks are
            # dropped once the statistics hold their float64 copies.
            stats = ModuleStats.build(blocks, sigma, self._rot, mom.has_qk_norm)
            del blocks, sigma
            fit = stats.fit(self._g).to("cpu")
            del stats
        self.plans[mom.module_name] = _ModulePlan(perm, fit)
        release_free_memory()

    def _card_notes(self, tokens: torch.Tensor, n_norm: int) -> None:
        data = self.calibration.data if self.calibration else "pre-tokenized tokens"
        notes = [f"- **Merge method:** `{self.name}`; **grouping:** `{self.grouping}`"]
        if self.fallback:
            notes.append(f"- **Calibration:** not run ({self.fallback}); fitted from the weights alone")
        else:
            notes.append(
                f"- **Calibration data:** `{data}`, {tokens.numel():,} tokens ({tokens.shape[0]} × {tokens.shape[1]})"
            )
        if n_norm and self.name == "aligned":
            refined = " (then refined with the rest of the module)" if self.reports else ""
            notes.append(
                f"- Keys start from mean pooling in {n_norm} modules with K norms (a norm after the key "
                f"projection makes no fold into Q exact); values aligned{refined}"
            )
        if self.reports:
            kept = [r for r in self.reports if r.kept]
            mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
            notes.append(
                f"- **Layer-wise refinement:** {len(kept)} of {len(self.reports)} attention modules trained to "
                f"reproduce the original's output on the calibration text (up to {self.refine.steps} Adam steps "
                f"and {self.refine.max_epochs:g} passes over the calibration batches each, "
                f"{sum(r.steps for r in self.reports):,} steps in all, {sum(r.seconds for r in self.reports):.0f}s"
                f"{', in bf16 autocast' if any(r.bf16 for r in self.reports) else ''}); "
                f"relative attention-output error {mean([r.error_before for r in self.reports]):.3f} after the "
                f"closed-form fit, {mean([r.error_after for r in self.reports]):.3f} after refinement (mean over modules); "
                f"{self.refine.validation:.1%} of the calibration sequences held out to stop each module early and "
                f"pick its best weights{self._backoff_note(kept)}"
            )
        elif self.refine is not None and self.fallback:
            notes.append("- **Layer-wise refinement:** not run (the family cannot be run layer by layer)")
        moved = sum(1 for p in self.plans.values() if p.kv_perm is not None)
        if self.grouping == "similarity":
            notes.append(f"- Heads permuted into similarity groups in {moved} of {len(self.plans)} modules")
        self.notes = notes

    @staticmethod
    def _backoff_note(kept: list[ModuleReport]) -> str:
        """Card text for modules that trained at a backed-off step size, if any."""
        slow = [r for r in kept if r.backoffs]
        return (
            f"; {len(slow)} modules trained at a reduced step size after a first try made them worse"
            if slow
            else ""
        )

    def card_notes(self) -> list[str]:
        """Lines for the model card (method, grouping, calibration data and token count)."""
        return list(self.notes)

    # -- while streaming -----------------------------------------------------------------------
    def merge(self, blocks: HeadBlocks, ctx: MergeContext) -> HeadBlocks:
        """Permute (similarity grouping), then fit and fold (``aligned``) or mean-pool."""
        refined = self._store.take(ctx.module_name) if self._store is not None else None
        if refined is not None:  # trained in prepare(): already permuted, fitted and merged
            return {s: {r: t.to(blocks[s][r].dtype) for r, t in p.items()} for s, p in refined.items()}
        return self._merge_planned(blocks, ctx)

    def _merge_planned(self, blocks: HeadBlocks, ctx: MergeContext) -> HeadBlocks:
        plan = self.plans.get(ctx.module_name)
        if plan is None:
            raise ConfigError(f"{ctx.module_name} was not calibrated; run prepare() before merging")
        if plan.merged:
            raise ConfigError(f"{ctx.module_name} was merged already; run prepare() again to merge it twice")
        if plan.kv_perm is not None:
            num_heads = blocks[_find(blocks, "q", "weight")]["q"].shape[0]  # type: ignore[index]
            blocks = permute_blocks(blocks, plan.kv_perm, num_heads)
        if plan.fit is None:
            return MeanPooling().merge(blocks, ctx)
        if plan.fit.num_groups != ctx.num_kv_heads:
            raise ConfigError(
                f"{ctx.module_name} was calibrated for {plan.fit.num_groups} K/V heads, not {ctx.num_kv_heads}"
            )
        out = self._apply(blocks, ctx, plan.fit)
        release_free_memory()  # the float64 working copies are gone by now
        return out

    def _apply(self, blocks: HeadBlocks, ctx: MergeContext, fit: ModuleFit) -> HeadBlocks:
        stats = ModuleStats.build(blocks, None, self._rot, fit.key_mean)
        new = stats.apply(fit, in_place=True)
        out = {s: dict(p) for s, p in blocks.items()}
        _write(out, "q", new["q"])
        ws = _find(out, "o", "weight")
        out[ws]["o"] = new["o"].to(out[ws]["o"].dtype)  # type: ignore[index]
        _write(out, "k", new["k"])
        _write(out, "v", new["v"])
        if stats.key_mean:  # K norms (and anything else of role k): mean-pooled like the keys
            for s, parts in out.items():
                if "k" in parts and _kind(s) == "norm":
                    x = parts["k"]
                    parts["k"] = x.reshape(ctx.num_kv_heads, -1, *x.shape[1:]).float().mean(1).to(x.dtype)
        return out


def _module_tensors(src: Source, arch: Architecture) -> dict[str, ModuleTensors]:
    """Converted attention modules of ``src`` and their tensors, by module name."""
    return arch.attention_modules((i.name for i in src.reader.infos()), converted_only=True)


def _read_blocks(src: Source, unit: ModuleTensors) -> HeadBlocks:
    """A module's head blocks read from the checkpoint (per-head templates stacked in head order)."""
    dims = unit.module.dims(src.config)
    infos = {i.name: i for i in src.reader.infos()}
    out = {}
    for suffix, names in unit.tensors.items():
        t = (
            torch.cat([src.reader.read(infos[n]) for n in names])
            if "{i}" in suffix
            else src.reader.read(infos[names[0]])
        )
        out[suffix] = unit.module.tensors[suffix].unpack(t, dims)
    return out


def _calibrated(name: str) -> Callable[[MethodOptions], CalibratedMerge]:
    def build(opts: MethodOptions) -> CalibratedMerge:
        return CalibratedMerge(
            name,
            opts.calibration,
            opts.grouping,
            progress=opts.progress,
            refine=opts.refine,
            device=opts.device,
            max_device_memory=opts.max_device_memory,
        )

    return build


# Registered here, not in methods.py, so the registry never imports this module (merging/__init__
# imports it, so the names are there whenever the package is).
register_method("aligned", _calibrated("aligned"))
register_similarity("mean", _calibrated("mean"))

__all__: Iterable[str] = (
    "POLISH_WORK",
    "CalibratedMerge",
    "LinearFit",
    "_augmented",
    "_balance",
    "_find",
    "_kind",
    "_write",
    "pair_fit",
    "ModuleFit",
    "ModuleStats",
    "build_method",
    "linear_fit",
    "query_permutation",
    "rotary_dims",
)
