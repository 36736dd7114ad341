r"""2·KL between two full Gaussians, N(μp, LpLpᵀ) and N(μq, LqLqᵀ), with a hand-written derivative.

With δ = μp − μq, D = tril(Lp − Lq), Y = Lq⁻¹D (lower triangular, M = Lq⁻¹Lp = I + Y),
S = tril(Y, −1) and z = Lq⁻¹δ,

    2 KL = Σᵢ φ(Lp,ᵢᵢ, Lq,ᵢᵢ) + ‖S‖² + ‖z‖²,   φ(a, b) = (a/b)² − 1 − 2 log(a/b)

(``linalg.scale_ratio_term``). Its derivative, from dY = Lq⁻¹(dD − tril(dLq) Y) and
dz = Lq⁻¹(dδ − tril(dLq) z), with G = 2 Lq⁻ᵀS and w = 2 Lq⁻ᵀz,

    d(2 KL) = Σᵢ φₐ dLp,ᵢᵢ + φ_b dLq,ᵢᵢ + ⟨G, dD − tril(dLq) Y⟩ + ⟨w, dδ − tril(dLq) z⟩,
    φₐ = 2(r² − 1)/a, φ_b = −2(r² − 1)/b, r = a/b,

is written as a ``custom_jvp`` whose tangent is linear in (dLp, dLq, dδ) through elementwise
products and one matmul by [Y | z]: reverse mode transposes it into ⟨·⟩-weighted sums and one
matmul (a single GEMM over the batch when Lq is shared), so a gradient costs one solve by Lqᵀ
(a matmul by Lq⁻ᵀ when shared) and one product, instead of autodiff's separate passes through
the solve, the difference, the mask and the diagonal. Zero tangents (a prior with fixed
parameters) are skipped. Forward and reverse mode, and derivatives of every order, work: the
rule is built from differentiable pieces.

Cost per pair: forward O(K³/3) (one triangular solve with K + 1 right-hand sides, or with a
factor shared by the batch Lq⁻¹ once and a blocked triangular product of a third of the dense
flops); a derivative O(K³) more.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array
from jax.custom_derivatives import SymbolicZero

from numpyro_gkl.linalg import (
    SHARED_SOLVE_MIN_K,
    UNROLL_MAX_K,
    is_shared,
    scale_ratio_term,
    solve_lower,
    solve_sq_sums_unrolled,
    solve_unrolled,
    strict_lower_sq_sum,
    strict_lower_sq_sum_of_product,
)


def _diag(m: Array) -> Array:
    return jnp.diagonal(m, axis1=-2, axis2=-1)


def _batch(lp: Array, lq: Array, delta: Array) -> tuple[int, ...]:
    return jnp.broadcast_shapes(lp.shape[:-2], lq.shape[:-2], delta.shape[:-1])


# Above these K autodiff through the forward is faster than the hand-written rule (the forward's
# blocked product and single solve keep their third of the dense flops in the backward); below,
# the rule is (``kl_speed.py``, gradients w.r.t. p: K = 8 1.1–1.5×, K = 32 per element 1.35×).
_RULE_MAX_K_SHARED = UNROLL_MAX_K
_RULE_MAX_K_PER_ELEMENT = 64
# Up to this K autodiff through the unrolled forward is faster than the rule (K = 2 and 4, shared
# q with gradients: 1.9× and 1.2× upstream against 0.9× and 1.0× with the rule).
_RULE_MIN_K = SHARED_SOLVE_MIN_K


def twice_kl(lp: Array, lq: Array, delta: Array) -> Array:
    """2 KL(N(μp, LpLpᵀ) ‖ N(μq, LqLqᵀ)) for δ = μp − μq; batch shapes broadcast.

    Upper triangles of the factors are ignored. See the module docstring for the formula,
    its derivative and the costs. The derivative is the hand-written rule for 4 < K ≤ 8, and
    4 < K ≤ 64 without a shared factor; autodiff through the same forward otherwise (chosen from
    static shapes, so it is jit-friendly).
    """
    k = lq.shape[-1]
    limit = _RULE_MAX_K_SHARED if is_shared(lq, _batch(lp, lq, delta)) else _RULE_MAX_K_PER_ELEMENT
    if _RULE_MIN_K < k <= limit:
        return _twice_kl_with_rule(lp, lq, delta)
    return _twice_kl(lp, lq, delta)


def _twice_kl(lp: Array, lq: Array, delta: Array) -> Array:
    """The forward of ``twice_kl``: unrolled up to K = 8, then one solve or a shared Lq⁻¹."""
    k = lq.shape[-1]
    batch = _batch(lp, lq, delta)
    diag = jnp.sum(scale_ratio_term(_diag(lp), _diag(lq)), -1)
    if k <= UNROLL_MAX_K:
        strict, maha = solve_sq_sums_unrolled(lq, lp, lq, delta)
        return diag + strict + maha
    diff = jnp.tril(lp - lq)
    if is_shared(lq, batch):
        lq_inv = solve_lower(lq, jnp.eye(k, dtype=lq.dtype))
        strict = strict_lower_sq_sum_of_product(lq_inv, diff)
        return diag + strict + jnp.sum(jnp.square(lq_inv @ delta[..., None]), (-2, -1))
    y, z = _solve_both(lq, diff, delta, batch)
    return diag + strict_lower_sq_sum(y) + jnp.sum(jnp.square(z), -1)


def _solve_both(
    lq: Array,
    diff: Array,
    delta: Array,
    batch: tuple[int, ...],
    solve: Callable[[Array, Array, bool], Array] = solve_lower,
) -> tuple[Array, Array]:
    """Lq⁻¹D and Lq⁻¹δ in one solve with K + 1 right-hand sides."""
    k = lq.shape[-1]
    rhs = jnp.concatenate(
        [
            jnp.broadcast_to(diff, (*batch, k, k)),
            jnp.broadcast_to(delta[..., None], (*batch, k, 1)),
        ],
        axis=-1,
    )
    out = solve(lq, rhs, False)
    return out[..., :k], out[..., k]


def _inner(weight: Array, tangent: Array | SymbolicZero, axes: tuple[int, ...]) -> Array | float:
    """⟨weight, tangent⟩ over ``axes``; 0 for a symbolic-zero tangent."""
    if isinstance(tangent, SymbolicZero):
        return 0.0
    return jnp.sum(weight * tangent, axes)


def _twice_kl_jvp(primals: tuple[Array, Array, Array], tangents: tuple) -> tuple[Array, Array]:
    lp, lq, delta = primals
    d_lp, d_lq, d_delta = tangents
    k = lq.shape[-1]
    batch = _batch(lp, lq, delta)
    a, b = _diag(lp), _diag(lq)
    diff = jnp.tril(lp - lq)
    if k <= UNROLL_MAX_K and not is_shared(lq, batch):
        # Small K, a factor per element: both solves unrolled, elementwise over the batch.
        y, z = _solve_both(lq, diff, delta, batch, solve_unrolled)
        s = jnp.tril(y, -1)
        gw = solve_unrolled(lq, jnp.concatenate([2.0 * s, 2.0 * z[..., None]], -1), True)
        g, w = gw[..., :k], gw[..., k]
    else:
        # Lq⁻¹ (once if shared) and matmuls: XLA's batched triangular solve calls LAPACK per
        # matrix, 2–3× slower than a batched matmul at K = 32 (a second solve for G cost that).
        lq_inv = solve_lower(lq, jnp.eye(k, dtype=lq.dtype))
        y = lq_inv @ diff
        z = (lq_inv @ delta[..., None])[..., 0]
        s = jnp.tril(y, -1)
        lq_inv_t = jnp.swapaxes(lq_inv, -1, -2)
        g = 2.0 * (lq_inv_t @ s)
        w = 2.0 * (lq_inv_t @ z[..., None])[..., 0]
    value = (
        jnp.sum(scale_ratio_term(a, b), -1)
        + jnp.sum(jnp.square(s), (-2, -1))
        + jnp.sum(jnp.square(z), -1)
    )
    r2m1 = (a - b) * (a + b) / jnp.square(b)  # r² − 1, exact to a few roundings when a ≈ b
    g_low = jnp.tril(g)  # D and dD are lower triangular
    tangent = jnp.zeros(batch, value.dtype)
    if not isinstance(d_lp, SymbolicZero):
        tangent = (
            tangent + _inner(g_low, d_lp, (-2, -1)) + _inner(2.0 * r2m1 / a, _diag(d_lp), (-1,))
        )
    if not isinstance(d_lq, SymbolicZero):
        d_lq = jnp.tril(d_lq)
        # ⟨G, −dLq − dLq Y⟩ + ⟨w, −dLq z⟩ + Σ φ_b dLq,ᵢᵢ
        tangent = (
            tangent
            - _inner(g_low, d_lq, (-2, -1))
            - _inner(g, d_lq @ y, (-2, -1))
            - _inner(w, (d_lq @ z[..., None])[..., 0], (-1,))
            - _inner(2.0 * r2m1 / b, _diag(d_lq), (-1,))
        )
    tangent = tangent + _inner(w, d_delta, (-1,))
    return value, tangent


_twice_kl_with_rule = jax.custom_jvp(_twice_kl)
_twice_kl_with_rule.defjvp(_twice_kl_jvp, symbolic_zeros=True)
