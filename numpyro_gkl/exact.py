r"""Error-free transformations: sums and products kept to twice the working precision.

A Cholesky factor and a low-rank-plus-diagonal factor of two nearly equal covariances have no
exact small difference: Σp − Σq must be formed from products, and in float32 every product of
``LpLpᵀ`` carries a rounding error of u‖Σ‖ (u = 2⁻²⁴) while Σp − Σq may be 1e-4‖Σ‖ or smaller.
The functions here compute such residuals as if in exact arithmetic and round once at the end:

- ``two_sum`` (Knuth) and ``two_product`` (Dekker): a + b = s + e and a·b = p + e exactly;
- ``square_minus``: s² − d with one rounding (a variance from a scale against a variance);
- ``gram_residual``: A diag(c) Aᵀ + diag(d) for a K × n matrix A, through Ozaki's error-free
  splitting of the rows of A into slices whose pairwise products are exact in a floating-point
  matrix multiply (every partial sum is a multiple of a common power of two and fits in the
  mantissa), so the residual costs a handful of ordinary GEMMs.

Nothing here needs a wider floating-point type, fused multiply-add or a particular summation order
inside the matrix multiply; matmuls ask for ``Precision.HIGHEST`` so that no accelerator lowers
them to a shorter mantissa (TF32, bfloat16 passes).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import Array, lax


def _mantissa_bits(dtype: jnp.dtype) -> int:
    """Significand bits p of a floating dtype (24 for float32, 53 for float64)."""
    return jnp.finfo(dtype).nmant + 1


def two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """s = fl(a + b) and e with a + b = s + e exactly (Knuth). Six flops, any order of |a|, |b|."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a: Array) -> tuple[Array, Array]:
    """a = hi + lo with hi and lo of at most half the significand bits each (Dekker)."""
    c = (2.0 ** math.ceil(_mantissa_bits(a.dtype) / 2) + 1.0) * a
    hi = c - (c - a)
    return hi, a - hi


def two_product(a: Array, b: Array) -> tuple[Array, Array]:
    """p = fl(a·b) and e with a·b = p + e exactly (Dekker, no FMA needed). 17 flops."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def square_minus(s: Array, d: Array) -> Array:
    """s² − d rounded once: exact small differences of a squared scale and a variance. O(1)."""
    hi, lo = two_product(s, s)
    return (hi - d) + lo


def _row_slices(a: Array, count: int, bits: int) -> list[Array]:
    """Ozaki's split A = Σₜ Aₜ by rows: Aₜ's row i holds ``bits`` bits below 2^⌈log₂ μₜᵢ⌉.

    With σ = 2^(⌈log₂ μ⌉ + p − bits), μ the row's largest magnitude, fl((A + σ) − σ) rounds every
    entry of the row to a multiple of 2^(⌈log₂ μ⌉ − bits) exactly; the remainder A − Aₜ is exact too
    and is split again. The last slice is the remainder itself.
    """
    p = _mantissa_bits(a.dtype)
    slices = []
    rest = a
    for _ in range(count - 1):
        mu = lax.stop_gradient(jnp.max(jnp.abs(rest), axis=-1, keepdims=True))
        _, e = jnp.frexp(mu)  # μ < 2^e; σ is a constant of the split, not a function of A
        sigma = jnp.ldexp(jnp.ones_like(mu), e + (p - bits))
        head = (rest + sigma) - sigma
        slices.append(head)
        rest = rest - head
    slices.append(rest)
    return slices


def gram_residual(a: Array, signs: Array, d: Array, guard_bits: int = 8) -> Array:
    """R = A diag(signs) Aᵀ + diag(d), accurate to 2^-(p + guard_bits)·μᵢμⱼ before rounding.

    A is … × K × n, ``signs`` (n,) holds ±1, d is … × K, μᵢ the largest |Aᵢⱼ| of row i and p the
    significand bits (24 for float32). Each slice keeps b = p − ⌈(p + log₂ n)/2⌉ bits, so the
    products AₜSAᵤᵀ of two slices are exact; those with t + u < T (T slices,
    T·b ≥ p + guard_bits + log₂ n) are summed with ``two_sum`` into a head and a tail, so R is
    exact up to the dropped products and one final rounding. Cost: ⌊(T + 1)²/4⌋ matrix products
    of K × n × K, O(T² K² n) flops: in float32 6 at n ≤ 32, 9 at n ≤ 256, 12 at n = 516, 20 at
    n = 2052.
    """
    p = _mantissa_bits(a.dtype)
    n = a.shape[-1]
    bits = p - math.ceil((p + math.log2(max(n, 2))) / 2)
    count = max(2, math.ceil((p + guard_bits + math.log2(max(n, 2))) / bits))
    slices = _row_slices(a, count, bits)
    signed = [s * signs for s in slices]
    head = d[..., :, None] * jnp.eye(a.shape[-2], dtype=a.dtype)
    tail = jnp.zeros((), a.dtype)
    for order in range(count):
        for t in range(order // 2 + 1):
            u = order - t
            prod = jnp.matmul(
                signed[t], jnp.swapaxes(slices[u], -1, -2), precision=lax.Precision.HIGHEST
            )
            for term in (prod,) if t == u else (prod, jnp.swapaxes(prod, -1, -2)):
                head, err = two_sum(head, term)
                tail = tail + err
    return head + tail
