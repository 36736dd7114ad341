"""Numerical building blocks shared by the KL rules.

Everything here is elementwise or a triangular solve; nothing forms a covariance inverse Σ⁻¹.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.scipy.linalg import solve_triangular

# Below this |x| the closed forms of g and h cancel in float32; their Taylor series do not.
_SERIES_CUTOFF = 0.1
# x^n/n! and x^n/n for n = 2, 3, ...; enough terms that the remainder is < 1e-17 at |x| = 0.1.
_EXPM1_COEFFS = tuple(1.0 / math.factorial(n) for n in range(2, 12))
_LOG1P_COEFFS = tuple((-1.0) ** n / n for n in range(2, 18))


def _small_series(x: Array, coeffs: tuple[float, ...], direct: Array) -> Array:
    """``x² Σ_m coeffs[m] xᵐ`` where ``|x| < 0.1``, else ``direct`` (both branches finite)."""
    small = jnp.abs(x) < _SERIES_CUTOFF
    xs = jnp.where(small, x, 0.0)
    acc = jnp.zeros_like(xs)
    for c in reversed(coeffs):
        acc = acc * xs + c
    return jnp.where(small, acc * xs * xs, direct)


def log_ratio(a: Array, b: Array) -> Array:
    """``log(a / b)`` for positive ``a``, ``b``, accurate to a few ulps even when ``a ≈ b``.

    Computed as ``log1p((a - b) / b)``: ``a - b`` is exact when ``a ≈ b`` (Sterbenz), so the
    small result keeps its relative accuracy. Cost: O(1) per element.
    """
    return jnp.log1p((a - b) / b)


def expm1_minus_x(x: Array) -> Array:
    """``g(x) = exp(x) - 1 - x ≥ 0`` without cancellation.

    For a whitened variance ratio λ = exp(x), ``g`` is ``λ - 1 - log λ``, the per-dimension
    covariance term of the Gaussian KL. ``|x| < 0.1`` uses the Taylor series ``Σ_{n≥2} xⁿ/n!``;
    elsewhere ``expm1(x) - x``. Cost: O(1).
    """
    return _small_series(x, _EXPM1_COEFFS, jnp.expm1(x) - x)


def x_minus_log1p(x: Array) -> Array:
    """``h(x) = x - log1p(x) ≥ 0`` for ``x > -1`` without cancellation.

    ``|x| < 0.1`` uses the series ``Σ_{n≥2} (-1)ⁿ xⁿ / n``; elsewhere the direct form. Cost: O(1).
    """
    return _small_series(x, _LOG1P_COEFFS, x - jnp.log1p(x))


def strict_lower_sq_sum(m: Array) -> Array:
    """``Σ_{i>j} m_ij²`` over the last two axes. Cost: O(K²)."""
    return jnp.sum(jnp.square(jnp.tril(m, -1)), axis=(-2, -1))


def solve_lower(tril: Array, rhs: Array, transpose: bool = False) -> Array:
    """``tril⁻¹ rhs`` (``tril⁻ᵀ rhs`` if ``transpose``) for lower-triangular ``tril`` (… × K × K).

    ``rhs`` is … × K × n.

    Batch shapes broadcast like NumPy's. Batch axes along which ``tril`` is broadcast (a factor
    shared by many right-hand sides) are folded into the columns of ``rhs``, so the shared factor
    is used by one triangular solve (BLAS ``trsm``) and never copied per batch element.
    Cost: O(K² n) per right-hand-side block, O(K² n B) in all.
    """
    batch = lax.broadcast_shapes(tril.shape[:-2], rhs.shape[:-2])
    nb = len(batch)
    k, n = rhs.shape[-2:]
    l_batch = (1,) * (nb - (tril.ndim - 2)) + tril.shape[:-2]
    fold = [i for i in range(nb) if l_batch[i] == 1 and batch[i] != 1]
    keep = [i for i in range(nb) if i not in fold]
    rhs = jnp.broadcast_to(rhs, (*batch, k, n))
    if not fold:
        tril = jnp.broadcast_to(tril, (*batch, k, k))
        return solve_triangular(tril, rhs, lower=True, trans=int(transpose))
    keep_shape = tuple(batch[i] for i in keep)
    fold_shape = tuple(batch[i] for i in fold)
    # rhs: keep…, K, fold…, n  ->  keep…, K, (fold… n)
    perm = [*keep, nb, *fold, nb + 1]
    x = jnp.transpose(rhs, perm).reshape((*keep_shape, k, -1))
    lt = jnp.reshape(tril, (*tuple(l_batch[i] for i in keep), k, k))
    lt = jnp.broadcast_to(lt, (*keep_shape, k, k))
    y = solve_triangular(lt, x, lower=True, trans=int(transpose))
    y = y.reshape((*keep_shape, k, *fold_shape, n))
    return jnp.transpose(y, np.argsort(perm))
