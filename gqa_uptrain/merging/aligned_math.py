"""The closed-form fit behind ``aligned``: weighted subspace fits, rotary pair fits and the basis
(gauge) of each shared head. Pure float64 linear algebra on whatever device its inputs are on.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
