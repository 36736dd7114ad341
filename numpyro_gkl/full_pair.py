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
- otherwise, with a factor per element, Lq⁻¹[D | δ] by halves (``linalg.solve_sq_sums``: the
  triangle's off-diagonal block from a dense solve, the diagonal blocks recursively, leaves of
  64 by ``tril_inverse`` and a product; 4K³/7 flops, all in matmuls, Y never assembled);
- with a factor shared by the batch, Lq⁻¹ once by blocks (``linalg.tril_inverse``), then a
  blocked triangular product per element (``linalg.sq_sum_of_product``, a third of the dense
  flops), differentiated through the product by blocks of 64 (dense up to K = 64).
  Both by autodiff, with the diagonal's derivative as a mask (``linalg.diagonal``) and the
  inverse's own rule, d(L⁻¹) = −L⁻¹ tril(dL) L⁻¹ (``linalg.tril_inverse``).

The hand-written derivative, from dY = Lq⁻¹(dD − tril(dLq) Y) and dz = Lq⁻¹(dδ − tril(dLq) z),
with S = tril(Y, −1), G = 2 Lq⁻ᵀS and w = 2 Lq⁻ᵀz,

    d(2 KL) = Σᵢ φₐ dLp,ᵢᵢ + φ_b dLq,ᵢᵢ + ⟨G, dD − tril(dLq) Y⟩ + ⟨w, dδ − tril(dLq) z⟩,
    φₐ = 2(r² − 1)/a, φ_b = −2(r² − 1)/b, r = a/b  (a = Lp,ᵢᵢ, b = Lq,ᵢᵢ),

is a ``custom_jvp`` whose tangent is linear in (dLp, dLq, dδ) through elementwise products and
one unrolled backward substitution, so reverse mode costs one more pass; zero tangents (a prior
with fixed parameters) are skipped, and derivatives of every order work.

Cost per pair: K³/6 multiply-adds unrolled, 4K³/7 flops by halves, or K³/3 once for a shared
Lq⁻¹ and 2K³/3 per pair (2K³ for the dense product up to K = 64); a derivative about as much
again.
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
    event_sum,
    highest_precision,
    is_shared,
    scale_ratio_term,
    solve_sq_sums,
    solve_sq_sums_unrolled,
    solve_unrolled,
    sq_sum_of_product,
    tril_inverse,
    x_minus_log1p,
)

# With a shared Lq⁻¹ the derivative of ‖Lq⁻¹D‖²_F is taken through the product by blocks with
# leaves of this size: up to K = 64 the dense product (two GEMMs over the batch;
# benchmarks/full_pair_forms.py, upstream/ours fwd / fwd+grad at K = 32, blocked forward with the
# dense derivative against blocked both ways: 1.21 / 0.95× against 1.34 / 0.83×), above it the
# blocked one with dense leaves of 64, not the forward's leaves of 8, whose derivative's many
# small matmuls were slower (kl_speed.py, K = 512 with a shared q: docs/performance.md).
_DENSE_MAX_K_SHARED = 64


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
    return _twice_kl_by_blocks(lp, lq, delta, shared)


def _twice_kl_unrolled(lp: Array, lq: Array, delta: Array) -> Array:
    """``twice_kl`` by the unrolled substitution (small K only: the program grows as K³)."""
    strict, maha = solve_sq_sums_unrolled(lq, lp, lq, delta)
    if is_shared(lq, _batch(lp, lq, delta)):
        diag = event_sum(scale_ratio_term(diagonal(lp), diagonal(lq)))
    else:  # entry by entry, contiguous batch-shaped arrays as in the substitution (with the
        # event sums, K = 2 in kl_speed.py: 2.27 → 0.85 ms forward); with a shared Lq the
        # mask derivative of ``diagonal`` gave the faster gradient
        lp_e, lq_e = (jnp.moveaxis(x, (-2, -1), (0, 1)) for x in (lp, lq))
        diag = sum(scale_ratio_term(lp_e[i, i], lq_e[i, i]) for i in range(lq.shape[-1]))
    return diag + strict + maha


def _twice_kl_by_blocks(lp: Array, lq: Array, delta: Array, shared: bool) -> Array:
    """``twice_kl`` by matmuls: with a factor per element Lq⁻¹[D | δ] by halves
    (``solve_sq_sums``, 4K³/7 flops); with a shared factor Lq⁻¹ once (``tril_inverse``) and a
    dense or blocked product per element."""
    k = lq.shape[-1]
    a, b = diagonal(lp), diagonal(lq)
    diag = 2.0 * event_sum(x_minus_log1p((a - b) / b))
    diff = jnp.tril(lp - lq)
    if not shared:
        batch = _batch(lp, lq, delta)
        y_sq, z_sq = solve_sq_sums(
            jnp.broadcast_to(lq, (*batch, k, k)),
            jnp.broadcast_to(diff, (*batch, k, k)),
            jnp.broadcast_to(delta, (*batch, k)),
        )
        return y_sq + diag + z_sq
    lq_inv = tril_inverse(lq)
    y_sq = _sq_sum_coarse_derivative(lq_inv, diff)
    z = (lq_inv @ delta[..., None])[..., 0]
    return y_sq + diag + event_sum(jnp.square(z))


@highest_precision
def _sq_sum_coarse(lq_inv: Array, diff: Array) -> Array:
    """‖Lq⁻¹D‖²_F by blocks with dense leaves of ``_DENSE_MAX_K_SHARED`` (one dense product,
    formed transposed, up to that K: one GEMM for a shared Lq⁻¹)."""
    return sq_sum_of_product(lq_inv, diff, _DENSE_MAX_K_SHARED)


@jax.custom_jvp
def _sq_sum_coarse_derivative(lq_inv: Array, diff: Array) -> Array:
    """‖Lq⁻¹D‖²_F by the blocked product (leaves of 8, a third of the dense flops),
    differentiated through ``_sq_sum_coarse``: with a shared Lq⁻¹ the fine blocks give the
    faster forward, the coarse ones (GEMMs over the batch) the faster derivative."""
    return sq_sum_of_product(lq_inv, diff)


_sq_sum_coarse_derivative.defjvp(
    lambda primals, tangents: jax.jvp(_sq_sum_coarse, primals, tangents)
)


def _inner(weight: Array, tangent: Array | SymbolicZero, axes: tuple[int, ...]) -> Array | float:
    """⟨weight, tangent⟩ over ``axes``; 0 for a symbolic-zero tangent."""
    if isinstance(tangent, SymbolicZero):
        return 0.0
    return jnp.sum(weight * tangent, axes)


@highest_precision
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
        event_sum(scale_ratio_term(a, b))
        + jnp.sum(jnp.square(s), (-2, -1))
        + event_sum(jnp.square(z))
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
