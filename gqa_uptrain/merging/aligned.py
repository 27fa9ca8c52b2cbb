"""Function-aware merging: fit each group's shared K/V head on calibration data, fold the rest into Q and O.

Mean pooling averages K/V heads that were never trained to agree: each head works in its own
basis. ``aligned`` instead fits the shared head to what the group computes on calibration
activations of the original model, and folds each member's map onto the shared head into weights
that stay per head (its query rows, its output-projection columns), so the result is a plain GQA
checkpoint with nothing added at inference (align-then-merge, arXiv 2412.20677; SVD/PCA
initialisation, Yu et al. 2024 and Palu, arXiv 2407.21118).

Everything is linear in the attention input ``x̃ = [x; 1]`` (the 1 carries biases), so one statistic
per module is enough: ``Σ = E[x̃ x̃ᵀ]`` from ``calibration.py``. Notation per module: ``H`` query
heads, ``Hkv`` K/V heads, ``G`` groups of ``g = Hkv/G`` members, ``r = H/Hkv`` query heads per K/V
head, ``W̃`` a head's ``[d, n+1]`` weight with its bias as last column.

Keys, rotary dimensions (rotate_half layout: dims ``p`` and ``p + R/2`` form a complex number
``z``): RoPE multiplies ``z`` by a phase, so only complex scalings commute with it. Per group and
pair, the shared key is ``z_s = Σ_m c_m z_m`` and member ``m`` is approximated by ``a_m z_s``; this is
the best rank-1 fit of the members' keys, each weighted by ``w_m = E|q_p|²`` summed over the query
heads that read it (score error ∝ ``|q|·|key error|``). ``conj(a_m)`` is folded into the member's
query rows ``p, p + R/2`` as a 2x2 rotation-scaling (weights and bias).

Keys, non-rotary dimensions (partial rotary, no RoPE), and values: a general linear fit. With
``L_m`` the square root of the member's weighting (query covariance for keys; ``Σ_i O_i O_iᵀ`` over its
query heads for values), the shared head spans the top principal subspace of the stacked
``L_m · head_m`` and each member's map ``A_m`` is folded into Q (``A_mᵀ q``) or O (``O_i A_m``).

The shared head's basis (a gauge: ``k → T k``, ``q_m → T⁻ᵀ q_m``; ``v → T v``, ``O_i → O_i T⁻¹``; for
rotary pairs only a complex scalar per pair) does not change what the model computes, only how
large the written weights are. Each group's basis is balanced: the shared head's weights and the
average member's folded Q rows / O columns get equal Gram matrices (the minimum of their summed
squared norms, where weight decay leaves a trained model), and the rotation left free (a phase per
rotary pair) is the orthogonal Procrustes fit of the shared head to the group's mean head. No
direction is then blown up on one side to make up for a small one on the other, so the weights stay
in the original's range and survive rounding (bf16, 8-bit quantization) as the original does (a basis
regressed on the mean head instead reached ``|w|`` in the thousands on SmolLM2). With ``G = Hkv``
the maps are the identity and the model is unchanged, bit for bit.

K norms (Qwen3 ``k_norm``, OLMo2, StableLM ``qk_layernorm``; each family declares them, see
``architectures``) normalise keys after projecting, so
keys are no longer linear in ``x`` and no fold into Q is exact: for those, K is mean-pooled (with a
warning) and values are still aligned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..architectures import Architecture, ModuleTensors, get_architecture
from ..errors import ConfigError
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
    MAX_EVALS,
    best_partition,
    kv_permutation,
    permute_blocks,
    query_permutation,
)
from .memory import release_free_memory
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
from .refine import BlockStore, ModuleReport, RefineSpec, refine_layers

if TYPE_CHECKING:
    from ..io.checkpoint import Source

logger = logging.getLogger(__name__)

# Similarity grouping with ``aligned``: cost evaluations the exact polish may spend, as a budget of
# eigenvalue work (evaluations × (g·d)³): ~150 evaluations of 4-head groups at head_dim 128, all
# MAX_EVALS on tiny test models. A few seconds per module on 2 cores.
POLISH_WORK = 2e10


def rotary_dims(config: dict[str, Any], head_dim: int) -> int:
    """How many leading dims of each head RoPE rotates (rotate_half layout); 0 without RoPE.

    A fact of the family (:attr:`~gqa_uptrain.architectures.Architecture.rotary`), read from the
    checkpoint's config.
    """
    rotary = get_architecture(config).rotary
    if rotary.layout != "rotate_half":  # pragma: no cover - every family so far
        raise ConfigError(f"--method aligned does not know the {rotary.layout!r} rotary layout")
    return rotary.dims(config, head_dim)


def _kind(suffix: str) -> str:
    if "norm" in suffix:
        return "norm"
    return "bias" if suffix.endswith("bias") else "weight"


def _find(blocks: HeadBlocks, role: str, kind: str) -> str | None:
    hits = [s for s, parts in blocks.items() if role in parts and _kind(s) == kind]
    return hits[0] if hits else None


def _augmented(blocks: HeadBlocks, role: str) -> torch.Tensor:
    """``[n_heads, d, n+1]``: the role's weight rows with the bias (or zeros) as last column."""
    w = blocks[_find(blocks, role, "weight")][role].double()  # type: ignore[index]
    b_suffix = _find(blocks, role, "bias")
    b = (
        blocks[b_suffix][role].double()
        if b_suffix
        else torch.zeros(w.shape[:2], dtype=torch.float64, device=w.device)
    )
    return torch.cat([w, b.unsqueeze(-1)], dim=-1)


def _write(blocks: HeadBlocks, role: str, wt: torch.Tensor) -> None:
    """Store ``[n, d, n+1]`` back into the role's weight and bias blocks (dtypes kept)."""
    ws = _find(blocks, role, "weight")
    w = blocks[ws][role]  # type: ignore[index]
    blocks[ws][role] = wt[..., :-1].to(w.dtype)  # type: ignore[index]
    bs = _find(blocks, role, "bias")
    if bs:
        blocks[bs][role] = wt[..., -1].to(blocks[bs][role].dtype)


def _sqrtm(m: torch.Tensor, rel_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its inverse (regularised)."""
    e, u = torch.linalg.eigh(m)
    e = e.clamp_min(0) + rel_eps * e.abs().max().clamp_min(1e-30)
    return (u * e.sqrt()) @ u.T, (u / e.sqrt()) @ u.T


def _balance(k: torch.Tensor, r: torch.Tensor, floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """A gauge ``T`` (and ``T⁻¹``) with ``T K Tᵀ = T⁻ᵀ R T⁻¹`` (diagonal): balanced realisation.

    ``K`` is the Gram of the shared head's weight rows, ``R`` that of the folded weights per unit of
    shared head (their columns' Gram): the gauge ``head → T head``, ``fold → fold T⁻¹`` that makes
    them equal minimises ``‖T head‖² + ‖fold T⁻¹‖²`` (the balance weight decay drives a trained
    model to). Eigenvalues are floored at ``floor`` times the largest, so rank-deficient sides stay
    finite.
    """
    ek, vk = torch.linalg.eigh(k)
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    if not float(ek.max()) > 0:  # an all-zero head: any basis computes the same nothing
        return eye, eye
    ek = ek.clamp_min(floor * ek.max())
    zk, zk_inv = (vk * ek.sqrt()) @ vk.T, (vk / ek.sqrt()) @ vk.T  # K^{1/2}, K^{-1/2}
    s2, v = torch.linalg.eigh(zk @ r @ zk)  # eigenvalues: the balanced Grams' squares
    if not float(s2.max()) > 0:  # nothing reads the head
        return eye, eye
    s = s2.clamp_min(floor * s2.max()).sqrt().sqrt()
    return (v * s).T @ zk_inv, zk @ (v / s)


def _rows_gram(w: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``[..., a, n+1]`` rows -> ``[..., a, a]`` their second moments ``W Σ Wᵀ``."""
    return w @ sigma @ w.transpose(-1, -2)


@dataclass
class LinearFit:
    """Shared head ``Σ_m C_m head_m``; member ``m`` ≈ ``A_m`` shared."""

    c: torch.Tensor  # [g, e, e]
    a: torch.Tensor  # [g, e, e]
    residual: float  # weighted energy the shared head misses
    total: float


def linear_fit(
    w: torch.Tensor,
    sigma: torch.Tensor,
    l_sqrt: torch.Tensor,
    l_inv: torch.Tensor,
    fold: torch.Tensor | None = None,
) -> LinearFit:
    """Weighted principal-subspace fit of ``g`` members' heads ``w`` ``[g, e, n+1]``.

    ``l_sqrt``/``l_inv`` ``[g, e, e]``: each member's weighting square root and its inverse; the
    error ``Σ_m E‖L_m (head_m − A_m shared)‖²`` is minimised over rank-``e`` shared heads.
    ``fold`` ``[g, e, e]``: the Gram of the weights each member's map is folded into (``Σ_i O_i O_iᵀ``
    over its query heads for values, ``Σ_i W_qi W_qiᵀ`` for keys; identity if omitted): it sets the
    shared head's basis (:func:`_fit_gauge`). With ``g == 1`` the maps are the identity.
    """
    g, e, _ = w.shape
    b = (l_sqrt @ w).reshape(g * e, -1)  # [g e, n+1] weighted members, stacked
    s = b @ sigma @ b.T  # [g e, g e]
    lam, vec = torch.linalg.eigh(s)
    lam, u = lam.flip(0)[:e].clamp_min(0), vec.flip(1)[:, :e]  # top-e: [e], [g e, e]
    total = float(s.trace())
    residual = max(total - float(lam.sum()), 0.0)
    if g == 1:  # the member itself: nothing to fit, the model stays as it was
        eye = torch.eye(e, dtype=w.dtype, device=w.device)[None]
        return LinearFit(eye, eye, residual, total)
    um = u.reshape(g, e, e)  # U_m: [g, e(member dims), e(components)]
    c0 = um.transpose(1, 2) @ l_sqrt  # C_m = U_mᵀ L_m: components of the weighted members
    a0 = l_inv @ um  # A_m = L_m⁻¹ U_m
    if fold is None:
        fold = torch.eye(e, dtype=w.dtype, device=w.device).expand(g, e, e)
    m, m_inv = _fit_gauge((c0 @ w).sum(0), a0, fold, w.mean(0), sigma)
    return LinearFit(m @ c0, a0 @ m_inv, residual, total)


def _fit_gauge(
    shared: torch.Tensor, a: torch.Tensor, fold: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The basis ``M`` (and ``M⁻¹``) of a shared head: ``shared → M shared``, ``A_m → A_m M⁻¹``.

    Any invertible ``M`` computes the same function; it only decides how large the written weights
    are. ``M = Q T``: ``T`` balances the shared head's weights ``shared`` ``[e, n+1]`` against the
    average member's folded weights (Gram ``(1/g) Σ_m A_mᵀ F_m A_m``; :func:`_balance`), so
    neither side carries the other's scale and no direction of one is blown up to compensate a
    small one in the other; ``Q`` is the rotation (orthogonal Procrustes) that brings the balanced
    head closest to the group's ``mean`` head on the calibration data, so the shared head still
    looks like the heads it replaces.
    """
    r = (a.transpose(1, 2) @ fold @ a).mean(0)
    t, t_inv = _balance(shared @ shared.T, r)
    cross = mean @ sigma @ (t @ shared).T  # E[mean (T shared)ᵀ]
    pu, _, pvh = torch.linalg.svd(cross)
    q = pu @ pvh
    return q @ t, t_inv @ q.T


@dataclass
class ModuleFit:
    """What ``aligned`` keeps of a module between calibration and streaming: the fitted maps only.

    Per group ``j``: the rotary keys' complex weights ``c``/``a`` (``[P, g]`` each: shared key
    ``Σ c_m z_m``, member ``z_m ≈ a_m z_s``), the non-rotary keys' :class:`LinearFit` and the values'
    :class:`LinearFit` (``C_m``, ``A_m``: ``[g, e, e]`` each). About ``2·Hkv·d²`` floats per module
    (8 MB at Llama-2-7B width), where the moment matrix it comes from is ``(n+1)²`` (134 MB).
    """

    num_groups: int
    key_mean: bool  # K norms: keys mean-pooled, no key maps
    k_pairs: list[tuple[torch.Tensor, torch.Tensor] | None]
    k_lin: list[LinearFit | None]
    v: list[LinearFit]

    def to(self, device: torch.device | str) -> ModuleFit:
        """The same maps on ``device``."""

        def lin(f: LinearFit | None) -> LinearFit | None:
            return None if f is None else LinearFit(f.c.to(device), f.a.to(device), f.residual, f.total)

        return ModuleFit(
            self.num_groups,
            self.key_mean,
            [None if p is None else (p[0].to(device), p[1].to(device)) for p in self.k_pairs],
            [lin(f) for f in self.k_lin],
            [lin(f) for f in self.v],  # type: ignore[misc]
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the maps."""
        ts = [t for pair in self.k_pairs if pair for t in pair]
        ts += [t for f in (*self.k_lin, *self.v) if f is not None for t in (f.c, f.a)]
        return sum(t.numel() * t.element_size() for t in ts)


@dataclass
class ModuleStats:
    """A module's blocks (already in group order) seen through its calibration moments.

    ``sigma`` is needed to fit (:meth:`fit`) and to score groups (:meth:`aligned_cost`,
    :meth:`mean_cost`); applying a fit to the weights (:meth:`apply`) needs only the blocks.
    """

    wq: torch.Tensor  # [H, d, n+1]
    wk: torch.Tensor  # [Hkv, d, n+1]
    wv: torch.Tensor  # [Hkv, d, n+1]
    o: torch.Tensor  # [H, d, out]
    sigma: torch.Tensor | None  # [n+1, n+1]
    rot: int  # rotary dims R
    key_mean: bool  # K norms: keys are mean-pooled
    _cache: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        blocks: HeadBlocks,
        sigma: torch.Tensor | None,
        rot: int,
        key_mean: bool,
        device: torch.device | None = None,
    ) -> ModuleStats:
        """Augmented float64 weights from head ``blocks``, with the moments ``sigma`` (or None), on
        ``device`` (default: ``sigma``'s, else the blocks')."""
        if device is None and sigma is not None:
            device = sigma.device
        if device is not None:
            blocks = {s: {r: t.to(device) for r, t in p.items()} for s, p in blocks.items()}
        return cls(
            wq=_augmented(blocks, "q"),
            wk=_augmented(blocks, "k"),
            wv=_augmented(blocks, "v"),
            o=blocks[_find(blocks, "o", "weight")]["o"].double(),  # type: ignore[index]
            sigma=None if sigma is None else sigma.double(),
            rot=rot,
            key_mean=key_mean,
        )

    @property
    def r(self) -> int:
        return self.wq.shape[0] // self.wk.shape[0]

    def _index(self, members: tuple[int, ...]) -> torch.Tensor:
        """``members`` as an index tensor on the weights' device."""
        return torch.tensor(members, device=self.wk.device)

    def _sigma(self) -> torch.Tensor:
        if self.sigma is None:
            raise ValueError("these statistics carry no calibration moments: only apply() is possible")
        return self.sigma

    def _q_energy(self) -> torch.Tensor:
        """``[Hkv, d]``: E[q²] per dim, summed over each K/V head's query heads."""
        if "qe" not in self._cache:
            e = ((self.wq @ self._sigma()) * self.wq).sum(-1)  # [H, d]
            self._cache["qe"] = e.view(-1, self.r, e.shape[-1]).sum(1)
        return self._cache["qe"]

    def _pair_gram(self, members: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per rotary pair: weighted member Gram ``[P, g, g]`` (complex) and weights ``[P, g]``."""
        p = self.rot // 2
        idx = self._index(members)
        wk = self.wk[idx]
        om = torch.complex(wk[:, :p], wk[:, p : 2 * p])  # [g, P, n+1]
        gram = torch.einsum("mpn,kpn->pmk", om.conj(), om @ self._sigma().to(om.dtype))  # E[conj(z_m) z_k]
        return _weigh_pairs(gram, self._pair_weights(idx))

    def _pair_weights(self, idx: torch.Tensor) -> torch.Tensor:
        """``[P, g]``: each member's query energy per rotary pair (its keys' error weight)."""
        p = self.rot // 2
        qe = self._q_energy()[idx]
        return (qe[:, :p] + qe[:, p : 2 * p]).T

    # Per-member weightings are cached: a similarity search meets each head in many groups.
    def _nonrot_root(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("nonrot", m)
        if key not in self._cache:
            wq = self.wq[m * self.r : (m + 1) * self.r, self.rot :]  # [r, e, n+1]
            self._cache[key] = _sqrtm(_rows_gram(wq, self._sigma()).sum(0))
        return self._cache[key]

    def _v_root(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("vroot", m)
        if key not in self._cache:
            self._cache[key] = _sqrtm(sum(oi @ oi.T for oi in self.o[m * self.r : (m + 1) * self.r]))
        return self._cache[key]

    def _fold_gram(self, role: str, m: int) -> torch.Tensor:
        """``[e, e]``: Gram of the weights member ``m``'s map is folded into, over its query heads:
        its non-rotary query rows (``role="q"``) or its output-projection columns (``"o"``)."""
        key = ("fold", role, m)
        if key not in self._cache:
            heads = slice(m * self.r, (m + 1) * self.r)
            ws = self.wq[heads, self.rot :] if role == "q" else self.o[heads]
            self._cache[key] = (ws @ ws.transpose(1, 2)).sum(0)
        return self._cache[key]

    def _q_pair_norms(self) -> torch.Tensor:
        """``[Hkv, P]``: squared norm of each K/V head's query rows per rotary pair (both rows of the
        pair, its query heads summed): the weights a pair's complex scale is folded into."""
        if "qpn" not in self._cache:
            p = self.rot // 2
            n = self.wq[:, :p].pow(2).sum(-1) + self.wq[:, p : 2 * p].pow(2).sum(-1)  # [H, P]
            self._cache["qpn"] = n.view(-1, self.r, p).sum(1)
        return self._cache["qpn"]

    def _weights_nonrot(self, members: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        roots = [self._nonrot_root(m) for m in members]
        return torch.stack([a for a, _ in roots]), torch.stack([b for _, b in roots])

    def _weights_v(self, members: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        roots = [self._v_root(m) for m in members]
        return torch.stack([a for a, _ in roots]), torch.stack([b for _, b in roots])

    # -- costs (for similarity grouping): relative energy lost, K and V added ------------------
    # A search scores thousands of groups, so the products with the [n+1, n+1] moment matrix are
    # taken once per module (every head against every head, :meth:`_tables`); a group's cost then
    # only gathers its members' entries: O(g²) for mean, an eigenvalue problem of size g·d for
    # aligned. Same quantities as the fit's, summed in another order (last-bit differences).
    def aligned_cost(self, members: tuple[int, ...]) -> float:
        """Relative K + V error of the aligned fit of ``members`` (lower merges better)."""
        t = self._tables(aligned=True)
        idx = self._index(members)
        v_res, v_tot = _subspace_residual(t["v"], idx)
        if self.key_mean:
            return self.mean_cost(members, keys_only=True) + v_res / max(v_tot, 1e-30)
        k_res = k_tot = 0.0
        if self.rot:
            gram = t["k_pairs"][:, idx][:, :, idx]
            a, _ = _weigh_pairs(gram, t["k_pair_w"][:, idx])
            lam = torch.linalg.eigvalsh(a)  # [P, g]
            k_tot += float(lam.sum())
            k_res += float(lam[:, :-1].sum())
        if self.rot < self.wk.shape[1]:
            res, tot = _subspace_residual(t["k_lin"], idx)
            k_res, k_tot = k_res + res, k_tot + tot
        return k_res / max(k_tot, 1e-30) + v_res / max(v_tot, 1e-30)

    def similarity_groups(self, num_groups: int, aligned: bool) -> list[tuple[int, ...]]:
        """``num_groups`` equal groups of K/V heads that merge well under ``aligned`` (or mean
        pooling), as :func:`~gqa_uptrain.merging.grouping.best_partition` finds them."""
        hkv, d = self.wk.shape[:2]
        size = hkv // num_groups
        if not aligned:
            return best_partition(hkv, size, self.mean_cost)
        # A group's aligned cost is an eigenvalue problem of size g·d, too slow for thousands of
        # calls on large groups: a bounded search scores groups by their pairs' costs, then
        # polishes with the real cost for about POLISH_WORK of eigenvalue work.
        polish = min(MAX_EVALS, int(POLISH_WORK / (size * d) ** 3))
        return best_partition(hkv, size, self.aligned_cost, pairwise=True, max_exact_evals=polish)

    def mean_cost(self, members: tuple[int, ...], keys_only: bool = False) -> float:
        """Relative K (+ V) error of mean pooling ``members``: E‖head_m − mean‖² over E‖head_m‖².

        With ``T_mk = E[head_m · head_k]``: ``Σ_m T_mm − (1/g) Σ_mk T_mk`` over ``Σ_m T_mm``.
        """
        t = self._tables(aligned=False)
        idx = self._index(members)
        out = 0.0
        for name in ("k_tr",) if keys_only else ("k_tr", "v_tr"):
            tr = t[name][idx][:, idx]
            energy = float(tr.diagonal().sum())
            out += max(energy - float(tr.sum()) / len(members), 0.0) / max(energy, 1e-30)
        return out

    def _tables(self, aligned: bool) -> dict[str, torch.Tensor]:
        """Every-head-against-every-head moments the costs read (computed once per module).

        ``k_tr``/``v_tr`` ``[Hkv, Hkv]``: ``E[head_m · head_k]``. With ``aligned``: ``k_pairs``
        ``[P, Hkv, Hkv]`` complex ``E[conj(z_m) z_k]`` per rotary pair and ``k_pair_w`` ``[P, Hkv]``
        its weights; ``k_lin`` and ``v`` ``[Hkv, e, Hkv, e]``: the blocks ``L_m E[head_m head_kᵀ] L_kᵀ``
        of :func:`linear_fit`'s matrix for any group.
        """
        if ("tables", True) in self._cache:  # the aligned tables hold the mean ones too
            return self._cache[("tables", True)]
        key = ("tables", aligned)
        if key in self._cache:
            return self._cache[key]
        sigma = self._sigma()
        hkv, d, n1 = self.wk.shape
        t: dict[str, torch.Tensor] = {}
        yk = (self.wk.reshape(-1, n1) @ sigma).view(hkv, d, n1)  # W_k Σ, all heads at once
        t["k_tr"] = torch.einsum("mdn,kdn->mk", yk, self.wk)
        if aligned and not self.key_mean:
            p, rot = self.rot // 2, self.rot
            if p:
                yre, yim = yk[:, :p].transpose(0, 1), yk[:, p:rot].transpose(0, 1)  # [P, Hkv, n+1]
                re, im = self.wk[:, :p].transpose(0, 1), self.wk[:, p:rot].transpose(0, 1)
                real = yre @ re.transpose(1, 2) + yim @ im.transpose(1, 2)  # E[re_m re_k + im_m im_k]
                imag = yre @ im.transpose(1, 2) - yim @ re.transpose(1, 2)  # E[re_m im_k - im_m re_k]
                t["k_pairs"] = torch.complex(real, imag)
                t["k_pair_w"] = self._pair_weights(torch.arange(hkv, device=self.wk.device))
                del yre, yim, real, imag
            if rot < d:
                roots = torch.stack([self._nonrot_root(m)[0] for m in range(hkv)])
                t["k_lin"] = _whitened_gram(yk[:, rot:], self.wk[:, rot:], roots)
        del yk
        yv = (self.wv.reshape(-1, n1) @ sigma).view(hkv, d, n1)
        t["v_tr"] = torch.einsum("mdn,kdn->mk", yv, self.wv)
        if aligned:
            roots = torch.stack([self._v_root(m)[0] for m in range(hkv)])
            t["v"] = _whitened_gram(yv, self.wv, roots)
        self._cache[key] = t
        return t

    def _v_fit(self, members: tuple[int, ...]) -> LinearFit:
        key = ("v", members)
        if key not in self._cache:
            ls, li = self._weights_v(members)
            fold = torch.stack([self._fold_gram("o", m) for m in members])
            self._cache[key] = linear_fit(self.wv[self._index(members)], self._sigma(), ls, li, fold)
        return self._cache[key]

    # -- the fit itself ------------------------------------------------------------------------
    def fit(self, num_groups: int) -> ModuleFit:
        """Fit each contiguous group of the (already permuted) heads: the maps :meth:`apply` folds."""
        hkv, d = self.wk.shape[:2]
        g, p = hkv // num_groups, self.rot // 2
        k_pairs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        k_lin: list[LinearFit | None] = []
        v: list[LinearFit] = []
        for j in range(num_groups):
            members = tuple(range(j * g, (j + 1) * g))
            idx = self._index(members)
            pair = lin = None
            if not self.key_mean and p:
                wk = self.wk[idx]
                keys = torch.complex(wk[:, :p], wk[:, p : 2 * p])  # [g, P, n+1]
                pair = pair_fit(*self._pair_gram(members), keys, self._q_pair_norms()[idx].T)
            if not self.key_mean and self.rot < d:
                ls, li = self._weights_nonrot(members)
                fold = torch.stack([self._fold_gram("q", m) for m in members])
                lin = linear_fit(self.wk[idx, self.rot :], self._sigma(), ls, li, fold)
            k_pairs.append(pair)
            k_lin.append(lin)
            v.append(self._v_fit(members))
        return ModuleFit(num_groups, self.key_mean, k_pairs, k_lin, v)

    def apply(self, fit: ModuleFit) -> dict[str, torch.Tensor]:
        """New augmented weights ``{q: [H,d,n+1], k: [G,d,n+1], v: [G,d,n+1], o: [H,d,out]}``: the
        shared heads built and each member's maps folded into its query rows and output columns."""
        hkv, d = self.wk.shape[:2]
        num_groups = fit.num_groups
        g, r, p = hkv // num_groups, self.r, self.rot // 2
        wq, o = self.wq.clone(), self.o.clone()
        k_new = torch.empty(num_groups, d, self.wk.shape[-1], dtype=torch.float64, device=self.wk.device)
        v_new = torch.empty_like(k_new)
        for j in range(num_groups):
            members = tuple(range(j * g, (j + 1) * g))
            idx = self._index(members)
            if fit.key_mean:
                k_new[j] = self.wk[idx].mean(0)
            else:
                pair = fit.k_pairs[j]
                if pair is not None:
                    c, a = pair
                    wk = self.wk[idx]
                    re, im = wk[:, :p], wk[:, p : 2 * p]  # [g, P, n+1]
                    cr, ci = c.real.T[:, :, None], c.imag.T[:, :, None]  # [g, P, 1]
                    k_new[j, :p] = (cr * re - ci * im).sum(0)
                    k_new[j, p : 2 * p] = (ci * re + cr * im).sum(0)
                    for mi, m in enumerate(members):
                        # q ← conj(a) q: a 2x2 rotation-scaling of rows (p, p + R/2)
                        al, be = a.real[:, mi, None], -a.imag[:, mi, None]  # [P, 1]
                        qs = slice(m * r, (m + 1) * r)
                        qr, qi = self.wq[qs, :p], self.wq[qs, p : 2 * p]
                        wq[qs, :p] = al * qr - be * qi
                        wq[qs, p : 2 * p] = be * qr + al * qi
                f = fit.k_lin[j]
                if f is not None:
                    k_new[j, self.rot :] = (f.c @ self.wk[idx, self.rot :]).sum(0)
                    for mi, m in enumerate(members):
                        qs = slice(m * r, (m + 1) * r)
                        wq[qs, self.rot :] = f.a[mi].T @ self.wq[qs, self.rot :]
            f = fit.v[j]
            v_new[j] = (f.c @ self.wv[idx]).sum(0)
            for mi, m in enumerate(members):
                qs = slice(m * r, (m + 1) * r)
                o[qs] = f.a[mi].T @ self.o[qs]  # O_i A_m, in the [d, out] block layout
        return {"q": wq, "k": k_new, "v": v_new, "o": o}

    def merged(self, num_groups: int) -> dict[str, torch.Tensor]:
        """:meth:`fit` then :meth:`apply` for contiguous groups of ``num_groups``."""
        return self.apply(self.fit(num_groups))


def pair_fit(
    gram: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, q_norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary keys of one group: per pair, complex ``c``, ``a`` ``[P, g]`` with shared key
    ``z_s = Σ_m c_m z_m`` and member ``z_m ≈ a_m z_s`` (``conj(a_m)`` is folded into its queries).

    ``gram``/``w``: the weighted pair Gram ``[P, g, g]`` and its weights (:func:`_weigh_pairs`);
    ``keys`` ``[g, P, n+1]``: the members' key rows as complex numbers; ``q_norms`` ``[P, g]``: the
    squared norm of each member's query rows per pair. The top eigenvector gives the best rank-1 fit;
    its free complex scale ``λ`` per pair (``c → λ c``, ``a → a/λ``) has the modulus that balances
    the shared key's weights against the average member's folded query weights (as
    :func:`_fit_gauge` does for linear maps) and the phase that brings the shared key closest to the
    group's mean key. With ``g == 1``: ``c = a = 1``.
    """
    p, g = w.shape
    if g == 1:
        one = torch.ones(p, 1, dtype=gram.dtype, device=gram.device)
        return one, one.clone()
    _, vec = torch.linalg.eigh(gram)
    u = vec[..., -1]  # [P, g] top eigenvector per pair
    sw = w.sqrt().to(u.dtype)
    c, a = sw * u, u.conj() / sw  # z_s = Σ c_m z_m ; z_m ≈ a_m z_s
    k = torch.einsum("pm,mpn->pn", c, keys).abs().pow(2).sum(-1)  # [P] shared key's weight norm²
    r = (a.abs().pow(2) * q_norms).mean(1)  # [P] average member's folded query norm² per unit λ
    k, r = k.clamp_min(1e-12 * float(k.max()) + 1e-300), r.clamp_min(1e-12 * float(r.max()) + 1e-300)
    plain = gram / (sw[:, :, None] * sw[:, None, :])  # E[conj(z_m) z_k]
    cross = torch.einsum("pk,pkm->p", c.conj(), plain) / g  # E[conj(z_s) mean]
    phase = torch.where(cross.abs() > 0, cross / cross.abs().clamp_min(1e-300), torch.ones_like(cross))
    lam = ((r / k) ** 0.25).to(phase.dtype) * phase
    return c * lam[:, None], a / lam[:, None]


def _weigh_pairs(gram: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary pair Gram ``[P, g, g]`` weighted by ``sqrt(w)`` on both sides (``w`` ``[P, g]``
    regularised relative to the group's largest weight); returns it and ``w``."""
    w = w + 1e-9 * w.amax().clamp_min(1e-30)
    d = w.sqrt().to(gram.dtype)
    return d[:, :, None] * gram * d[:, None, :], w


def _whitened_gram(y: torch.Tensor, w: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
    """``[H, e, H, e]`` blocks ``L_m (W_m Σ W_kᵀ) L_k`` from ``y = W Σ`` ``[H, e, n+1]``, the weights
    ``w`` ``[H, e, n+1]`` and each head's symmetric weighting root ``L`` ``[H, e, e]``."""
    h, e, n1 = w.shape
    gram = (y.reshape(h * e, n1) @ w.reshape(h * e, n1).T).view(h, e, h, e)
    gram = torch.einsum("mab,mbkc->makc", roots, gram)
    return torch.einsum("makc,kcd->makd", gram, roots)


def _subspace_residual(blocks: torch.Tensor, idx: torch.Tensor) -> tuple[float, float]:
    """Residual and total energy of :func:`linear_fit` for the group ``idx``, from the whitened
    blocks ``[H, e, H, e]`` (:func:`_whitened_gram`): the energy outside the top ``e`` eigenvalues."""
    e = blocks.shape[1]
    s = blocks[idx][:, :, idx].reshape(idx.numel() * e, idx.numel() * e)
    lam = torch.linalg.eigvalsh(s).flip(0)[:e].clamp_min(0)
    total = float(s.trace())
    return max(total - float(lam.sum()), 0.0), total


@dataclass
class _ModulePlan:
    kv_perm: torch.Tensor | None  # new K/V slot -> old K/V head; None: contiguous
    fit: ModuleFit | None  # None: mean pooling after the permutation


class CalibratedMerge(BaseMethod):
    """``aligned`` (or ``mean`` with similarity grouping): needs calibration before streaming.

    ``prepare(src, G)`` runs the calibration pass (see ``calibration.py``) and, as each layer's
    moments arrive, reads that module's weights, chooses its head permutation and fits it; it keeps
    only the permutation and the fitted maps (:class:`ModuleFit`, ``~2·Hkv·d²`` floats), never the
    ``[n+1, n+1]`` moments, so memory does not grow by a moment matrix per layer. ``merge`` folds
    the maps into the weights when the converter streams that module.
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
            ctx = MergeContext(mom.module_name, num_kv_heads)
            blocks = self._merge_planned(_read_blocks(src, units[mom.module_name]), ctx)
            # merge() takes the refined blocks from the store: the fitted maps are not needed again
            # (8.5 MB per layer at Llama-2-7B width, kept for the whole run otherwise).
            plan = self.plans[mom.module_name]
            if plan.fit is not None and plan.fit.key_mean:
                key_mean.add(mom.module_name)
            self.plans[mom.module_name] = _ModulePlan(plan.kv_perm, None)
            return blocks

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
                collect_moments(
                    src,
                    tokens,
                    on_module,
                    batch_size=bs,
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
            # the converter streams the weights they are folded into.
            fit = ModuleStats.build(blocks, sigma, self._rot, mom.has_qk_norm).fit(self._g).to("cpu")
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
        new = stats.apply(fit)
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
    "CalibratedMerge",
    "ModuleFit",
    "ModuleStats",
    "build_method",
    "linear_fit",
    "query_permutation",
    "rotary_dims",
)
