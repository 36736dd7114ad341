r"""2·KL between two full Gaussians, N(μp, LpLpᵀ) and N(μq, LqLqᵀ).

With δ = μp − μq, D = tril(Lp − Lq), Y = Lq⁻¹D (lower triangular, M = Lq⁻¹Lp = I + Y, so
Yᵢᵢ = uᵢ = (Lp,ᵢᵢ − Lq,ᵢᵢ)/Lq,ᵢᵢ) and z = Lq⁻¹δ,

    2 KL = ‖Y‖²_F + 2 Σᵢ h(uᵢ) + ‖z‖²,   h(x) = x − log(1 + x) ≥ 0

(``linalg.x_minus_log1p``): three sums of non-negative terms, each entry of Y computed from the
exact difference D, so nothing cancels and a tiny KL keeps its relative accuracy.

Paths, chosen from static shapes (jit-friendly):

- K ≤ 4, or K ≤ 8 with a factor per element: the substitution Lq⁻¹[D | δ] unrolled over the
  triangles' entries, elementwise over the batch (``linalg.solve_sq_sums_unrolled``); for
  4 < K ≤ 8 with a hand-written derivative (below), autodiff otherwise;
- otherwise Lq⁻¹ by blocks (``linalg.tril_inverse``, matmuls only; once when Lq is shared by the
  batch), then Y by matmul: a dense product up to K = 128 per element, a blocked triangular
  product of a third of the flops above (``linalg.sq_sum_of_product``); with a shared Lq⁻¹ the
  blocked product, differentiated through the dense one up to K = 64. Autodiff, with the
  diagonal's derivative as a mask (``linalg.diagonal``).

The hand-written derivative, from dY = Lq⁻¹(dD − tril(dLq) Y) and dz = Lq⁻¹(dδ − tril(dLq) z),
with S = tril(Y, −1), G = 2 Lq⁻ᵀS and w = 2 Lq⁻ᵀz,

    d(2 KL) = Σᵢ φₐ dLp,ᵢᵢ + φ_b dLq,ᵢᵢ + ⟨G, dD − tril(dLq) Y⟩ + ⟨w, dδ − tril(dLq) z⟩,
    φₐ = 2(r² − 1)/a, φ_b = −2(r² − 1)/b, r = a/b  (a = Lp,ᵢᵢ, b = Lq,ᵢᵢ),

is a ``custom_jvp`` whose tangent is linear in (dLp, dLq, dδ) through elementwise products and
one unrolled backward substitution, so reverse mode costs one more pass; zero tangents (a prior
with fixed parameters) are skipped, and derivatives of every order work.

Cost per pair: O(K³/3) forward (K³/3 more for Lq⁻¹ per distinct Lq, plus K³ per pair for the
dense product up to the sizes above); a derivative about as much again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jax.custom_derivatives import SymbolicZero

from numpyro_gkl.linalg import (
    SHARED_SOLVE_MIN_K,
    UNROLL_MAX_K,
    diagonal,
    is_shared,
    product_transposed,
    scale_ratio_term,
    solve_sq_sums_unrolled,
    solve_unrolled,
    sq_sum_of_product,
    tril_inverse,
    x_minus_log1p,
)

# Up to these K the derivative (shared) or the whole product Lq⁻¹D (per element) is formed densely
# (K³ flops), above them by blocks (K³/3 flops in more, smaller matmuls). benchmarks/
# full_pair_forms.py, upstream/ours fwd / fwd+grad, blocked against dense: shared K = 32
# 1.34 / 0.83× against 1.21 / 0.95×, K = 128 1.83 / 1.17× against 1.19 / 1.03×; per element
# K = 128 0.88 / 0.98× against 1.35 / 1.25×, K = 2048 2.93 / 2.16× against 1.77 / 1.51×.
_DENSE_MAX_K_SHARED = 64
_DENSE_MAX_K_PER_ELEMENT = 128


def _batch(lp: Array, lq: Array, delta: Array) -> tuple[int, ...]:
    return jnp.broadcast_shapes(lp.shape[:-2], lq.shape[:-2], delta.shape[:-1])


def twice_kl(lp: Array, lq: Array, delta: Array) -> Array:
    """2 KL(N(μp, LpLpᵀ) ‖ N(μq, LqLqᵀ)) for δ = μp − μq; batch shapes broadcast.

    Upper triangles of the factors are ignored. See the module docstring for the formula, the
    paths and their costs.
    """
    k = lq.shape[-1]
    shared = is_shared(lq, _batch(lp, lq, delta))
    if k <= SHARED_SOLVE_MIN_K:
        return _twice_kl_unrolled(lp, lq, delta)
    if k <= UNROLL_MAX_K and not shared:
        return _twice_kl_with_rule(lp, lq, delta)
    return _twice_kl_by_inverse(lp, lq, delta, shared)


def _twice_kl_unrolled(lp: Array, lq: Array, delta: Array) -> Array:
    """``twice_kl`` by the unrolled substitution (small K only: the program grows as K³)."""
    strict, maha = solve_sq_sums_unrolled(lq, lp, lq, delta)
    return jnp.sum(scale_ratio_term(diagonal(lp), diagonal(lq)), -1) + strict + maha


def _twice_kl_by_inverse(lp: Array, lq: Array, delta: Array, shared: bool) -> Array:
    """``twice_kl`` from Lq⁻¹ (``tril_inverse``) and a dense or blocked product."""
    k = lq.shape[-1]
    a, b = diagonal(lp), diagonal(lq)
    lq_inv = tril_inverse(lq)
    diff = jnp.tril(lp - lq)
    if k > (_DENSE_MAX_K_SHARED if shared else _DENSE_MAX_K_PER_ELEMENT):
        y_sq = sq_sum_of_product(lq_inv, diff)
    elif shared:
        y_sq = _sq_sum_blocked_dense_derivative(lq_inv, diff)
    else:
        y_sq = jnp.sum(jnp.square(lq_inv @ diff), (-2, -1))
    z = (lq_inv @ delta[..., None])[..., 0]
    return y_sq + 2.0 * jnp.sum(x_minus_log1p((a - b) / b), -1) + jnp.sum(jnp.square(z), -1)


def _sq_sum_dense(lq_inv: Array, diff: Array) -> Array:
    """‖Lq⁻¹D‖²_F by one dense product (formed transposed: one GEMM for a shared Lq⁻¹)."""
    return jnp.sum(jnp.square(product_transposed(lq_inv, diff)), (-2, -1))


@jax.custom_jvp
def _sq_sum_blocked_dense_derivative(lq_inv: Array, diff: Array) -> Array:
    """‖Lq⁻¹D‖²_F by the blocked product (a third of the flops), differentiated through the
    dense one: with a shared Lq⁻¹ the blocked forward is faster, and the dense derivative (two
    GEMMs over the batch) beats the blocked one's many small matmuls
    (``benchmarks/full_pair_forms.py``, K = 32)."""
    return sq_sum_of_product(lq_inv, diff)


_sq_sum_blocked_dense_derivative.defjvp(
    lambda primals, tangents: jax.jvp(_sq_sum_dense, primals, tangents)
)


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
    a, b = diagonal(lp), diagonal(lq)
    diff = jnp.tril(lp - lq)
    rhs = jnp.concatenate(
        [
            jnp.broadcast_to(diff, (*batch, k, k)),
            jnp.broadcast_to(delta[..., None], (*batch, k, 1)),
        ],
        axis=-1,
    )
    yz = solve_unrolled(lq, rhs, False)
    y, z = yz[..., :k], yz[..., k]
    s = jnp.tril(y, -1)
    gw = solve_unrolled(lq, jnp.concatenate([2.0 * s, 2.0 * z[..., None]], -1), True)
    g, w = gw[..., :k], gw[..., k]
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
            tangent + _inner(g_low, d_lp, (-2, -1)) + _inner(2.0 * r2m1 / a, diagonal(d_lp), (-1,))
        )
    if not isinstance(d_lq, SymbolicZero):
        d_lq = jnp.tril(d_lq)
        # ⟨G, −dLq − dLq Y⟩ + ⟨w, −dLq z⟩ + Σ φ_b dLq,ᵢᵢ
        tangent = (
            tangent
            - _inner(g_low, d_lq, (-2, -1))
            - _inner(g, d_lq @ y, (-2, -1))
            - _inner(w, (d_lq @ z[..., None])[..., 0], (-1,))
            - _inner(2.0 * r2m1 / b, diagonal(d_lq), (-1,))
        )
    tangent = tangent + _inner(w, d_delta, (-1,))
    return value, tangent


_twice_kl_with_rule = jax.custom_jvp(_twice_kl_unrolled)
_twice_kl_with_rule.defjvp(_twice_kl_jvp, symbolic_zeros=True)
