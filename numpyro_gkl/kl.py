r"""Closed-form KL(p‖q) between two Gaussians in common form, without cancellation.

For p = N(μp, Σp), q = N(μq, Σq) in K dimensions and δ = μp − μq,

    KL(p‖q) = ½ [ f(Σp‖Σq) + δᵀ Σq⁻¹ δ ],   f = tr(Σq⁻¹Σp) − K − log|Σp| + log|Σq| ≥ 0.

When both covariances have triangular square roots (diagonal or Cholesky), M = Lq⁻¹Lp is lower
triangular with diag(M)ᵢ = Lp,ᵢᵢ / Lq,ᵢᵢ = exp(tᵢ), so

    f = Σᵢ g(2tᵢ) + Σ_{i>j} Mᵢⱼ²,   g(x) = eˣ − 1 − x,

a sum of non-negative terms: KL ≥ 0 by construction and KL(p‖p) = 0 exactly. Where a low-rank
structure is involved the same idea is carried through the Woodbury identity and the matrix
determinant lemma (Cq = I + WqᵀDq⁻¹Wq = Lc Lcᵀ, μ = eig(WpᵀDp⁻¹Wp), h(μ) = μ − log(1 + μ);
Σ h(μ) is evaluated without eigenvalues as tr X − log|I + X|, ``trace_minus_log_det_1p``):

- low-rank p against diagonal q, x = (Dp − σq²)/σq² (``square_minus``, one rounding):
  f = Σᵢ h(xᵢ) + Σᵢ ‖Wp,ᵢ‖² xᵢ/Dp,ᵢ + Σ_k h(μ_k), every piece small when p ≈ q;
- diagonal p against low-rank q: ``_diag_vs_lowrank``;
- low-rank p against low-rank q: ``_cov_lowrank_pair`` (three pieces through an intermediate
  Gaussian, each computed from the differences of the parameters);
- full p against low-rank q: f(Σp‖Dq) + log|Cq| − ‖Lc⁻¹ WqᵀDq⁻¹ Lp‖²_F;
- low-rank p against full q: f(Dp‖Σq) + ‖Lq⁻¹Wp‖²_F − log|Cp|.

The last two mix a Cholesky factor with a low-rank factor, whose difference has no exact small
form: their pieces cancel when p ≈ q, so a result below 10⁶·K·eps is recomputed from the residual
Σp − Σq formed exactly (``numpyro_gkl.exact.gram_residual``, O(K³), only then).

Costs per pair, p \\ q (diagonal | full | low rank), r the larger rank:
- diagonal p: O(K) | O(K³) once per q (column norms of Lq⁻¹), then O(K²) | O(K r² + r³);
- full p:     O(K²) | O(K³) (one triangular solve with K right-hand sides, or a shared Lq⁻¹ and
  a blocked triangular product of a third of the dense flops) | O(K² r), O(K³) when close;
- low-rank p: O(K r² + r³) | O(K³) once per q, then O(K² r), O(K³) when close | O(K r² + r³).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
from jax import Array, lax

from numpyro_gkl.exact import gram_residual, square_minus
from numpyro_gkl.full_pair import twice_kl
from numpyro_gkl.gaussian import (
    Diagonal,
    Gaussian,
    LowRank,
    Tril,
    _sum_event,
    describe,
    entropy,
)
from numpyro_gkl.linalg import (
    diagonal,
    event_sum,
    highest_precision,
    scale_ratio_term,
    solve_lower,
    strict_lower_sq_sum,
    trace_minus_log_det_1p,
    tril_inverse,
    x_minus_log1p,
)

_LOG_2PI = math.log(2 * math.pi)


def _sq_norm(x: Array) -> Array:
    """Squared Frobenius norm over the last two axes."""
    return jnp.sum(jnp.square(x), axis=(-2, -1))


def _diag_terms(scale_p: Array, scale_q: Array) -> Array:
    """Σᵢ g(2tᵢ), tᵢ = log(scale_p,ᵢ / scale_q,ᵢ), the diagonal of the triangular form. O(K)."""
    return event_sum(scale_ratio_term(scale_p, scale_q))


def _cov_vs_diag(p: Gaussian, sq: Array) -> Array:
    """f(Σp ‖ diag(sq²)) for a vector event. O(K) diagonal, O(K²) full, O(K r² + r³) low rank."""
    if isinstance(p, Diagonal):
        return _diag_terms(p.scale, sq)
    if isinstance(p, Tril):  # M = diag(1/σq) Lp: the factor's rows scaled inside the sum
        lp = p.scale_tril
        return _diag_terms(diagonal(lp), sq) + strict_lower_sq_sum(lp, 1.0 / sq)
    assert isinstance(p, LowRank)
    dq = jnp.square(sq)
    dd = -square_minus(sq, p.cov_diag)  # Dp − σq², exact to one rounding when Dp ≈ σq²
    w2 = jnp.sum(jnp.square(p.cov_factor), -1)
    u = p.whitened_factor
    return (
        jnp.sum(x_minus_log1p(dd / dq), -1)
        + jnp.sum(w2 * dd / (p.cov_diag * dq), -1)
        + trace_minus_log_det_1p(jnp.swapaxes(u, -1, -2) @ u)
    )


def _vs_tril(p: Gaussian, lq: Array, delta: Array) -> Array:
    """f(Σp ‖ Lq Lqᵀ) + δᵀΣq⁻¹δ.

    Full p: ``full_pair.twice_kl`` (M − I = Lq⁻¹(Lp − Lq): the off-diagonals come from the exact
    difference and keep their digits): for small K the substitution Lq⁻¹ [Lp − Lq | δ] unrolled
    over the triangles' entries, one elementwise pass over the batch, else Lq⁻¹ by blocks (once
    when q's factor is shared by the batch) and one product. Diagonal or low-rank p: Lq⁻¹ once per
    q, O(K³/3), then column norms and matmuls, O(K²) (O(K² r) low rank) per p. No two
    independent batched solves in one program: those can deadlock XLA's CPU thread pool
    (jaxlib 0.10).
    """
    k = lq.shape[-1]
    if isinstance(p, Tril):
        return twice_kl(p.scale_tril, lq, delta)
    sp = p.scale if isinstance(p, Diagonal) else jnp.sqrt(p.cov_diag)
    # M = Lq⁻¹ diag(sp): its strict lower part needs the column norms of Lq⁻¹.
    lq_inv = tril_inverse(lq)
    col = jnp.sum(jnp.square(jnp.tril(lq_inv, -1)), -2)
    f = _diag_terms(sp, diagonal(lq)) + event_sum(jnp.square(sp) * col)
    if isinstance(p, LowRank):
        # Mixes a Cholesky with a low-rank factor: the pieces cancel when p ≈ q.
        lp = p.capacitance_tril()
        f = f + _sq_norm(lq_inv @ p.cov_factor) - 2.0 * jnp.sum(jnp.log(diagonal(lp)), -1)
        f = _exact_when_close(
            jnp.maximum(f, 0.0), k, _exact_lowrank_vs_tril, p.cov_factor, p.cov_diag, jnp.tril(lq)
        )
    return f + _sq_norm(lq_inv @ delta[..., None])


def _sandwich(lc: Array, x: Array) -> Array:
    """Lc⁻¹ X Lc⁻ᵀ for symmetric X (r × r). O(r³)."""
    y = solve_lower(lc, x)
    return solve_lower(lc, jnp.swapaxes(y, -1, -2))


def _woodbury_solve(d: Array, w: Array, lc: Array, z: Array) -> Array:
    """(D + W Wᵀ)⁻¹ Z = D⁻¹Z − D⁻¹W C⁻¹ WᵀD⁻¹Z, C = Lc Lcᵀ. O(K r m) for Z of m columns."""
    y = w / d[..., None]
    zt = z / d[..., None]
    c_inv = solve_lower(lc, solve_lower(lc, jnp.swapaxes(y, -1, -2) @ z), transpose=True)
    return zt - y @ c_inv


def _trace(x: Array) -> Array:
    return jnp.trace(x, axis1=-2, axis2=-1)


def _cov_lowrank_pair(dp: Array, wp: Array, dq: Array, wq: Array) -> Array:
    """f(Dp + WpWpᵀ ‖ Dq + WqWqᵀ) without cancellation, through r = N(·, Dp + WqWqᵀ).

    With A = Σq⁻¹Σr and B = Σr⁻¹Σp, f(p‖q) = f(r‖q) + f(p‖r) + tr((A − I)(B − I)):
    f(r‖q) changes only the diagonal (ΔD = Dp − Dq), f(p‖r) only the factor (ΔW = Wp − Wq,
    zero-padded to a common rank), and the cross term is a product of the two differences, so each
    piece is computed from the (exact) differences and none cancels:

      f(r‖q) = Σ h(ΔD/Dq) + tr G − log|I + G| − tr H,   G = −Lq⁻¹Wqᵀ diag(ΔD/(DpDq)) Wq Lq⁻ᵀ,
               H = Lq⁻¹Wqᵀ diag(ΔD²/(Dq²Dp)) Wq Lq⁻ᵀ,  Lq Lqᵀ = I + WqᵀDq⁻¹Wq;
      f(p‖r) = tr(Cu⁻¹UᵀU EᵀE) − ‖Lu⁻¹UᵀE‖² + h(Lu⁻¹(EᵀU + UᵀE + EᵀE)Lu⁻ᵀ),
               h(X) = tr X − log|I + X|,
               U = Dp^-½Wq, E = Dp^-½ΔW, Cu = I + UᵀU = Lu Luᵀ;
      cross  = Σᵢⱼ (Σq⁻¹[Wq, ΔW])ᵢⱼ ΔDᵢ (Σr⁻¹[ΔW, Wp])ᵢⱼ  (Woodbury).

    Cost O(K r² + r³).
    """
    r = max(wp.shape[-1], wq.shape[-1])
    wp = jnp.pad(wp, [(0, 0)] * (wp.ndim - 1) + [(0, r - wp.shape[-1])])
    wq = jnp.pad(wq, [(0, 0)] * (wq.ndim - 1) + [(0, r - wq.shape[-1])])
    wp, wq = jnp.broadcast_arrays(wp, wq)  # O(K r) per pair: cheap next to the r × r work
    eye = jnp.eye(r, dtype=wq.dtype)
    dd = dp - dq
    dw = wp - wq
    wqt = jnp.swapaxes(wq, -1, -2)

    lq = jnp.linalg.cholesky(eye + wqt @ (wq / dq[..., None]))
    g = -_sandwich(lq, wqt @ (wq * (dd / (dp * dq))[..., None]))
    h = _sandwich(lq, wqt @ (wq * (jnp.square(dd) / (jnp.square(dq) * dp))[..., None]))
    f_rq = jnp.sum(x_minus_log1p(dd / dq), -1) + trace_minus_log_det_1p(g) - _trace(h)

    sp = jnp.sqrt(dp)[..., None]
    u, e = wq / sp, dw / sp
    ut, et = jnp.swapaxes(u, -1, -2), jnp.swapaxes(e, -1, -2)
    lu = jnp.linalg.cholesky(eye + ut @ u)
    ete, ute = et @ e, ut @ e
    f_pr = (
        _trace(ete)
        - _sq_norm(solve_lower(lu, et))
        - _sq_norm(solve_lower(lu, ute))
        + trace_minus_log_det_1p(_sandwich(lu, jnp.swapaxes(ute, -1, -2) + ute + ete))
    )

    x_q = _woodbury_solve(dq, wq, lq, jnp.concatenate([wq, dw], -1))
    x_r = _woodbury_solve(dp, wq, lu, jnp.concatenate([dw, wp], -1))
    cross = jnp.sum(x_q * dd[..., None] * x_r, axis=(-2, -1))
    return f_rq + f_pr + cross


def _diag_vs_lowrank(sp: Array, q: LowRank) -> Array:
    """f(diag(sp²) ‖ Dq + WqWqᵀ) as three pieces that are each small when p ≈ q. O(K r² + r³).

    With x = (sp² − Dq)/Dq (``square_minus``: one rounding), V = Dq^-½Wq, G = VᵀV = Lc Lcᵀ − I
    and Z = Lc⁻¹Vᵀ:

      f = Σᵢ h(xᵢ) + h(−ZZᵀ) − Σᵢ xᵢ ‖Z₍:,ᵢ₎‖²,   h(X) = tr X − log|I + X|,

    ZZᵀ = Lc⁻¹GLc⁻ᵀ, the middle term being Σ log(1 + μ) − μ/(1 + μ) ≥ 0 over the eigenvalues μ
    of G (the factor removed), the last the coupling of the two changes.
    """
    dq = q.cov_diag
    x = square_minus(sp, dq) / dq
    v = q.whitened_factor
    lc = q.capacitance_tril()
    z = solve_lower(lc, jnp.swapaxes(v, -1, -2))
    removed = trace_minus_log_det_1p(-(z @ jnp.swapaxes(z, -1, -2)))  # Lc⁻¹GLc⁻ᵀ = ZZᵀ
    coupling = jnp.sum(x * jnp.sum(jnp.square(z), -2), -1)
    return jnp.sum(x_minus_log1p(x), -1) + removed - coupling


def _cov_vs_lowrank(p: Gaussian, q: LowRank) -> Array:
    """f(Σp ‖ Dq + WqWqᵀ). Diagonal p: ``_diag_vs_lowrank``; low-rank p: ``_cov_lowrank_pair``;
    both O(K r² + r³). Full p: Woodbury and the determinant lemma,
    f(Σp‖Dq) + log|Cq| − ‖Lc⁻¹WqᵀDq⁻¹Lp‖², O(K² r), or the exact residual when that is small."""
    if isinstance(p, Diagonal):
        return _diag_vs_lowrank(p.scale, q)
    if isinstance(p, LowRank):
        return _cov_lowrank_pair(p.cov_diag, p.cov_factor, q.cov_diag, q.cov_factor)
    lc = q.capacitance_tril()
    y = q.cov_factor / q.cov_diag[..., None]  # Dq⁻¹ Wq
    lp = jnp.tril(p.scale_tril)  # a factor's upper triangle is ignored everywhere
    correction = _sq_norm(solve_lower(lc, jnp.swapaxes(y, -1, -2) @ lp))
    log_det_c = 2.0 * jnp.sum(jnp.log(diagonal(lc)), -1)
    f = _cov_vs_diag(p, jnp.sqrt(q.cov_diag)) + log_det_c - correction
    return _exact_when_close(
        jnp.maximum(f, 0.0), p.dim, _exact_tril_vs_lowrank, lp, q.cov_factor, q.cov_diag
    )


# A mixed full/low-rank f below K·eps·_EXACT_BELOW is recomputed from the exact residual: the
# cancelling pieces of the cheap forms carry absolute errors of a few K·eps (benchmarks/accuracy.py
# measured up to 4.4 K·eps), so above the threshold they keep a relative error below 1e-5.
_EXACT_BELOW = 1e6


def _exact_when_close(f: Array, k: int, exact: Callable[..., Array], *operands: Array) -> Array:
    """``f`` if every entry is above K·eps·_EXACT_BELOW, else ``exact(f, *operands)``.

    A ``lax.cond`` on the whole batch, so only one branch runs under ``jit`` (both where the
    predicate is batched, as under ``vmap``); the branches are module-level functions so that
    their traces and compilations are cached across calls.
    """
    tol = _EXACT_BELOW * k * jnp.finfo(f.dtype).eps
    return lax.cond(jnp.any(f < tol), exact, _cheap, f, *operands)


def _cheap(f: Array, *_: Array) -> Array:
    return f


def _exact_lowrank_vs_tril(f: Array, wp: Array, dp: Array, lq: Array) -> Array:
    """f(Dp + WpWpᵀ ‖ LqLqᵀ) from the exact residual, broadcast like the cheap ``f``."""
    return jnp.broadcast_to(_residual_f(wp, dp, lq, lq, sign=1.0), f.shape)


def _exact_tril_vs_lowrank(f: Array, lp: Array, wq: Array, dq: Array) -> Array:
    """f(LpLpᵀ ‖ Dq + WqWqᵀ) from the exact residual, whitened by chol(Dq + WqWqᵀ)."""
    cov_q = dq[..., None] * jnp.eye(dq.shape[-1], dtype=dq.dtype) + wq @ jnp.swapaxes(wq, -1, -2)
    lq = jnp.linalg.cholesky(cov_q)
    return jnp.broadcast_to(_residual_f(wq, dq, lp, lq, sign=-1.0), f.shape)


def _residual_f(w: Array, d: Array, tril: Array, whiten: Array, sign: float) -> Array:
    """f(Σp‖Σq) = h(Lw⁻¹ R Lw⁻ᵀ), h(X) = tr X − log|I + X|, from the exact residual
    R = sign·(W Wᵀ + D − L Lᵀ) (``gram_residual``, L = ``tril``), Lw Lwᵀ ≈ Σq (``whiten``).
    Low-rank p against full q is sign = 1 (W, D from p, L = Lq), full p against low-rank q
    sign = −1. O(T² K²(K + r) + K³).
    """
    batch = jnp.broadcast_shapes(w.shape[:-2], tril.shape[:-2], d.shape[:-1])
    k, r = tril.shape[-1], w.shape[-1]
    a = jnp.concatenate(
        [jnp.broadcast_to(w, (*batch, k, r)), jnp.broadcast_to(tril, (*batch, k, k))], axis=-1
    )
    signs = jnp.concatenate([jnp.full((r,), sign, w.dtype), jnp.full((k,), -sign, w.dtype)])
    resid = gram_residual(a, signs, sign * d)
    return trace_minus_log_det_1p(_sandwich(whiten, resid))


def _mahalanobis(delta: Array, q: Gaussian) -> Array:
    """δᵀ Σq⁻¹ δ for a diagonal (O(K)) or low-rank (O(K r), given the capacitance factor) q."""
    if isinstance(q, Diagonal):
        return event_sum(jnp.square(delta / q.scale))
    y = q.cov_factor / q.cov_diag[..., None]
    proj = jnp.swapaxes(y, -1, -2) @ delta[..., None]
    return jnp.sum(jnp.square(delta) / q.cov_diag, -1) - _sq_norm(
        solve_lower(q.capacitance_tril(), proj)
    )


def _unmasked_kl(p: Gaussian, q: Gaussian) -> Array:
    """KL(p‖q) of whole events, masks ignored."""
    if isinstance(p, Diagonal) and isinstance(q, Diagonal):
        z = jnp.square((p.loc - q.loc) / q.scale)
        return _sum_event(0.5 * (scale_ratio_term(p.scale, q.scale) + z), p)
    delta = p.loc - q.loc
    if isinstance(q, Tril):
        return 0.5 * _vs_tril(p, q.scale_tril, delta)
    f = _cov_vs_diag(p, q.scale) if isinstance(q, Diagonal) else _cov_vs_lowrank(p, q)
    return 0.5 * (f + _mahalanobis(delta, q))


def _diag_masked_kl(p: Diagonal, q: Diagonal) -> Array:
    """Elementwise E_p[m_p log p − m_q log q] for two diagonal forms, summed over the event."""
    z = jnp.square((p.loc - q.loc) / q.scale)
    kl = 0.5 * (scale_ratio_term(p.scale, q.scale) + z)
    neg_h = -(0.5 * (1.0 + _LOG_2PI) + jnp.log(p.scale))
    ce = 0.5 * (_LOG_2PI + 1.0) + jnp.log(p.scale) + kl
    mp = True if p.mask is None else p.mask
    mq = True if q.mask is None else q.mask
    out = jnp.where(mp, jnp.where(mq, kl, neg_h), jnp.where(mq, ce, 0.0))
    return _sum_event(out, p)


def _diag_cross_entropy(p: Gaussian, q: Diagonal) -> Array:
    """E_p[−log q] per coordinate of a diagonal q, ½ log 2π + log σq + ((μp − μq)² + Σp,ᵢᵢ)/(2σq²),
    shaped like the locations. O(K) for a diagonal p (O(K²) full, O(K r) low rank: the
    marginal variances)."""
    return (
        0.5 * _LOG_2PI
        + jnp.log(q.scale)
        + 0.5 * (jnp.square(p.loc - q.loc) + p.marginal_var()) / jnp.square(q.scale)
    )


def _masked_correction(p: Gaussian, q: Gaussian, kl: Array) -> Array:
    """E_p[m_p log p − m_q log q] − KL(p‖q): the terms a mask removes from the sampled estimator.

    A masked-out unit of p adds its entropy, a masked-out unit of q subtracts its cross-entropy
    E_p[−log q]; a unit is a coordinate for a diagonal form (mask inside ``Independent``) and a
    whole event otherwise.
    """
    out = 0.0
    if p.mask is not None:
        if isinstance(p, Diagonal):
            h = 0.5 * (1.0 + _LOG_2PI) + jnp.log(p.scale)
            out = out + _sum_event(jnp.where(p.mask, 0.0, h), p)
        else:
            out = out + jnp.where(p.mask, 0.0, entropy(p))
    if q.mask is not None:
        if isinstance(q, Diagonal):
            out = out - _sum_event(jnp.where(q.mask, 0.0, _diag_cross_entropy(p, q)), q)
        else:
            ce = entropy(p) + kl
            out = out - jnp.where(q.mask, 0.0, ce)
    return out


def check_pair(p: Gaussian, q: Gaussian, names: tuple[str, str]) -> None:
    """Raises unless ``gaussian_kl(p, q)`` is defined by shapes; ``names`` describe p and q.

    ``NotImplementedError`` for a full or low-rank form against a form whose event is not a
    vector (no closed form here), ``ValueError`` for different event shapes or batch shapes that
    do not broadcast. Shapes only: costs nothing at run time.
    """
    vector_only = not (isinstance(p, Diagonal) and isinstance(q, Diagonal))
    if vector_only and (len(p.event_shape) != 1 or len(q.event_shape) != 1):
        raise NotImplementedError(
            "numpyro_gkl: a full or low-rank Gaussian pairs only with a vector event, got "
            f"{names[0]} and {names[1]}"
        )
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL divergence needs equal event shapes, got {names[0]} and {names[1]}")
    try:
        jnp.broadcast_shapes(p.batch_shape, q.batch_shape)
    except ValueError as err:
        raise ValueError(
            f"KL divergence needs broadcastable batch shapes, got {names[0]} and {names[1]}"
        ) from err


def _checked_pair(p: Gaussian, q: Gaussian) -> tuple[Gaussian, Gaussian]:
    """``check_pair``, then both forms in one dtype, the promotion of all their parameters."""
    check_pair(p, q, (describe(p), describe(q)))
    dtype = jnp.result_type(p.dtype, q.dtype)
    return p.astype(dtype), q.astype(dtype)


def _nan_where_invalid(x: Array, p: Gaussian, q: Gaussian) -> Array:
    """``x`` with NaN where either form is not ``valid()``, broadcast to the pair's batch shape."""
    x = jnp.where(p.valid() & q.valid(), x, jnp.nan)
    return jnp.broadcast_to(x, jnp.broadcast_shapes(p.batch_shape, q.batch_shape))


@highest_precision
def gaussian_kl(p: Gaussian, q: Gaussian) -> Array:
    """KL(p‖q) with shape ``broadcast(p.batch_shape, q.batch_shape)``.

    Masked units contribute what the sampled estimator E_p[log p − log q] gives in expectation
    with NumPyro's masked ``log_prob`` (zero where masked): KL where both are present, −H(p)
    where only p is, the cross-entropy E_p[−log q] where only q is, 0 where neither is.

    Bad input (docs/robustness.md): shapes are checked first (``check_pair``). Both forms are
    computed in one dtype, the promotion of all their parameters, so that a float32 side does
    not spoil the exact differences of a float64 one. A batch element where either form is not
    ``valid()`` (a location that is not finite, a scale, factor diagonal or ``cov_diag`` not in
    (0, ∞)) is NaN, masked or not; a NaN elsewhere (off-diagonal, ``cov_factor``) reaches the
    result through the arithmetic. Cost of the checks: O(K) per batch element.
    """
    p, q = _checked_pair(p, q)
    masked = p.mask is not None or q.mask is not None
    if masked and isinstance(p, Diagonal) and isinstance(q, Diagonal):
        kl = _diag_masked_kl(p, q)
    else:
        kl = _unmasked_kl(p, q)
        if masked:
            kl = kl + _masked_correction(p, q, kl)
    return _nan_where_invalid(kl, p, q)


@highest_precision
def cross_entropy(p: Gaussian, q: Gaussian) -> Array:
    """E_p[−log q] = H(p) + KL(p‖q), with shape ``broadcast(p.batch_shape, q.batch_shape)``.

    Two unmasked diagonal forms: Σ ½ log 2π + log σq + ((μp − μq)² + σp²)/(2σq²) over the event,
    one elementwise pass, O(K) (the log σp of H(p) and of KL(p‖q) cancel, so neither is
    formed: nothing here is a small difference of large terms). Otherwise H(p) + KL(p‖q). NaN
    where either form is not ``valid()``, as ``gaussian_kl``.
    """
    diagonal_pair = isinstance(p, Diagonal) and isinstance(q, Diagonal)
    if not diagonal_pair or p.mask is not None or q.mask is not None:
        return entropy(p) + gaussian_kl(p, q)
    p, q = _checked_pair(p, q)
    return _nan_where_invalid(_sum_event(_diag_cross_entropy(p, q), p), p, q)
