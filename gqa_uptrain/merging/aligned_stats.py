"""A module's weights seen through its calibration moments (:class:`ModuleStats`): the fit of each
group's shared head (:class:`ModuleFit`), folding it into the weights, and the costs similarity
grouping scores groups by. The maths is in ``aligned_math.py``; ``aligned.py`` runs it per module."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .aligned_math import (
    LinearFit,
    _rows_gram,
    _sqrtm,
    _subspace_residual,
    _weigh_pairs,
    _whitened_gram,
    linear_fit,
    pair_fit,
)
from .grouping import MAX_EVALS, best_partition
from .methods import HeadBlocks

# Similarity grouping with ``aligned``: cost evaluations the exact polish may spend, as a budget of
# eigenvalue work (evaluations × (g·d)³): ~150 evaluations of 4-head groups at head_dim 128, all
# MAX_EVALS on tiny test models. A few seconds per module on 2 cores.
POLISH_WORK = 2e10
# Query heads per product with the moments when computing their energy (:meth:`ModuleStats._q_energy`).
Q_ENERGY_HEADS = 4


def _kind(suffix: str) -> str:
    if "norm" in suffix:
        return "norm"
    return "bias" if suffix.endswith("bias") else "weight"


def _find(blocks: HeadBlocks, role: str, kind: str) -> str | None:
    hits = [s for s, parts in blocks.items() if role in parts and _kind(s) == kind]
    return hits[0] if hits else None


def _augmented(blocks: HeadBlocks, role: str) -> torch.Tensor:
    """``[n_heads, d, n+1]``: the role's weight rows with the bias (or zeros) as last column."""
    w = blocks[_find(blocks, role, "weight")][role]  # type: ignore[index]
    b_suffix = _find(blocks, role, "bias")
    # Filled in place (casts are exact): a float64 copy of the weight and then its concatenation
    # with the bias would hold the role twice (134 MB each at Llama-2-7B width).
    out = torch.empty(*w.shape[:2], w.shape[2] + 1, dtype=torch.float64, device=w.device)
    out[..., :-1] = w
    if b_suffix:
        out[..., -1] = blocks[b_suffix][role]
    else:
        out[..., -1] = 0
    return out


def _write(blocks: HeadBlocks, role: str, wt: torch.Tensor) -> None:
    """Store ``[n, d, n+1]`` back into the role's weight and bias blocks (dtypes kept)."""
    ws = _find(blocks, role, "weight")
    w = blocks[ws][role]  # type: ignore[index]
    blocks[ws][role] = wt[..., :-1].to(w.dtype)  # type: ignore[index]
    bs = _find(blocks, role, "bias")
    if bs:
        blocks[bs][role] = wt[..., -1].to(blocks[bs][role].dtype)


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
            # A copy whatever the dtype: ``apply(in_place=True)`` writes into it.
            o=blocks[_find(blocks, "o", "weight")]["o"].to(torch.float64, copy=True),  # type: ignore[index]
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
            sigma = self._sigma()
            # A few heads at a time (the same figures, bit for bit): ``W_q Σ`` of all heads at once
            # and its product with ``W_q`` would be two more copies of the query weights.
            e = torch.cat([((w @ sigma) * w).sum(-1) for w in self.wq.split(Q_ENERGY_HEADS)])  # [H, d]
            self._cache["qe"] = e.view(-1, self.r, e.shape[-1]).sum(1)
        return self._cache["qe"]

    def _pair_gram(self, members: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per rotary pair: weighted member Gram ``[P, g, g]`` (complex) and weights ``[P, g]``."""
        p = self.rot // 2
        idx = self._index(members)
        wk = self.wk[idx]
        re, im = wk[:, :p], wk[:, p : 2 * p]  # [g, P, n+1]: z = re + i·im
        sigma = self._sigma()
        # E[conj(z_m) z_k] in real arithmetic, as :meth:`_tables` computes it: a complex copy of
        # the [n+1, n+1] moments would be twice their size (268 MB at Llama-2-7B width).
        yre, yim = re @ sigma, im @ sigma
        real = torch.einsum("mpn,kpn->pmk", re, yre) + torch.einsum("mpn,kpn->pmk", im, yim)
        imag = torch.einsum("mpn,kpn->pmk", re, yim) - torch.einsum("mpn,kpn->pmk", im, yre)
        return _weigh_pairs(torch.complex(real, imag), self._pair_weights(idx))

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

    def apply(self, fit: ModuleFit, in_place: bool = False) -> dict[str, torch.Tensor]:
        """New augmented weights ``{q: [H,d,n+1], k: [G,d,n+1], v: [G,d,n+1], o: [H,d,out]}``: the
        shared heads built and each member's maps folded into its query rows and output columns.

        ``in_place``: fold into these statistics' own query and output weights (returned as ``q``
        and ``o``) instead of copies; the same figures, without two more copies of the largest
        weights. The statistics are spent afterwards."""
        hkv, d = self.wk.shape[:2]
        num_groups = fit.num_groups
        g, r, p = hkv // num_groups, self.r, self.rot // 2
        # Each member's rows are read before they are written, and no row is read again after.
        wq, o = (self.wq, self.o) if in_place else (self.wq.clone(), self.o.clone())
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
                        new_r, new_i = al * qr - be * qi, be * qr + al * qi
                        wq[qs, :p], wq[qs, p : 2 * p] = new_r, new_i
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
