"""Numerical building blocks shared by the KL rules.

Everything here is elementwise, a matmul or a triangular solve or inverse; nothing forms a
covariance inverse Σ⁻¹.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial, wraps
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.custom_derivatives import SymbolicZero
from jax.scipy.linalg import solve_triangular

F = TypeVar("F", bound=Callable[..., Any])


def highest_precision(fn: F) -> F:
    """``fn`` traced under ``jax.default_matmul_precision("highest")``: every matmul in it keeps
    its dtype's full mantissa.

    JAX's default precision lets an accelerator round float32 operands of a matmul (TF32 on
    recent NVIDIA GPUs, bfloat16 passes on TPUs), which would cost the closed forms their
    relative accuracy near p = q; on CPU nothing changes. Applied to the public entry points and
    to the hand-written derivatives, which JAX may trace later, outside them. Cost: none at run
    time.
    """

    @wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


# Below this |x| the closed form of h cancels in float32; its Taylor series does not.
_SERIES_CUTOFF = 0.1
# x^n/n for n = 2, 3, ...; enough terms that the remainder is < 1e-17 at |x| = 0.1.
_LOG1P_COEFFS = tuple((-1.0) ** n / n for n in range(2, 18))


def _series_terms(dtype: Any) -> int:
    """Terms of the series that reach ``dtype``'s precision at |x| = 0.1: with the powers
    2 … N the remainder relative to the leading x²/2 is about 2·0.1ᴺ⁻¹/(N + 1), kept below an
    eighth of half of ε (N = 9, 8 terms, in float32; N = 17, 16 terms, in float64; the
    evaluation cost follows)."""
    eps = float(jnp.finfo(dtype).eps) / 2
    n = 2
    while 2.0 * _SERIES_CUTOFF ** (n - 1) / (n + 1) >= eps / 8:
        n += 1
    return n - 1


def _small_series(x: Array, coeffs: tuple[float, ...], direct: Array) -> Array:
    """``x² Σ_m coeffs[m] xᵐ`` where ``|x| < 0.1``, else ``direct`` (both branches finite),
    summed to ``x``'s precision (``_series_terms``)."""
    small = jnp.abs(x) < _SERIES_CUTOFF
    xs = jnp.where(small, x, 0.0)
    acc = jnp.zeros_like(xs)
    for c in reversed(coeffs[: _series_terms(xs.dtype)]):
        acc = acc * xs + c
    return jnp.where(small, acc * xs * xs, direct)


@jax.custom_jvp
def x_minus_log1p(x: Array) -> Array:
    """``h(x) = x - log1p(x) ≥ 0`` for ``x > -1`` without cancellation.

    ``|x| < 0.1`` uses the series ``Σ_{n≥2} (-1)ⁿ xⁿ / n``; elsewhere the direct form. The
    derivative is the rational ``h'(x) = x / (1 + x)``, exact near 0 and free of transcendental
    calls (differentiating the series and the ``where`` costs several passes). Cost: O(1).
    """
    return _small_series(x, _LOG1P_COEFFS, x - jnp.log1p(x))


x_minus_log1p.defjvp(
    lambda primals, tangents: (
        x_minus_log1p(primals[0]),
        primals[0] / (1.0 + primals[0]) * tangents[0],
    )
)


def scale_ratio_term(a: Array, b: Array) -> Array:
    """``g(2 log(a/b)) = (a/b)² − 1 − 2 log(a/b) ≥ 0`` for positive scales ``a``, ``b``.

    The per-dimension variance term of the Gaussian KL, written with u = (a − b)/b as
    ``u² + 2 h(u)`` (``x_minus_log1p``): two non-negative terms, so nothing cancels, and
    ``a − b`` is exact when ``a ≈ b`` (Sterbenz), so a tiny result keeps its relative accuracy.
    One ``log1p`` (or its series), no ``exp``. Cost: O(1).
    """
    u = (a - b) / b
    return jnp.square(u) + 2.0 * x_minus_log1p(u)


def trace_minus_log_det_1p(x: Array) -> Array:
    """Σₖ h(λₖ) = tr X − log|I + X| ≥ 0 for symmetric X (r × r) with I + X positive definite.

    For ‖X‖_F < 0.1 the series Σ_{k≥2} (−1)ᵏ tr(Xᵏ)/k (16 terms in float64, 8 in float32:
    ``_series_terms``), which keeps the relative accuracy of a tiny X; elsewhere the triangular
    form of I + X = L Lᵀ, Σᵢ g(2 log Lᵢᵢ) + Σ_{i>j} Lᵢⱼ². Both are smooth in X to every order
    (unlike an eigenvalue decomposition at repeated eigenvalues). Cost: O(r³) × 16 (× 8 in float32).
    """
    x = 0.5 * (x + jnp.swapaxes(x, -1, -2))
    small = jnp.sum(jnp.square(x), axis=(-2, -1)) < _SERIES_CUTOFF**2
    mask = small[..., None, None]
    xs = jnp.where(mask, x, 0.0)
    power, series = xs, jnp.zeros(x.shape[:-2], x.dtype)
    for c in _LOG1P_COEFFS[: _series_terms(x.dtype)]:
        power = power @ xs
        series = series + c * jnp.trace(power, axis1=-2, axis2=-1)
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    lower = jnp.linalg.cholesky(eye + jnp.where(mask, 0.0, x))
    diag = jnp.diagonal(lower, axis1=-2, axis2=-1)
    # a Cholesky factor's upper triangle is exactly zero (NaN or not): the plain masked sum
    direct = jnp.sum(scale_ratio_term(diag, 1.0), -1) + _masked_sq_sum(lower)
    return jnp.where(small, series, direct)


def event_sum(x: Array, n: int = 1) -> Array:
    """The sum of ``x`` over its last ``n`` axes, as a product with a vector of ones.

    XLA's CPU reduction over a short minor axis runs a loop per row, the matrix-vector product
    does not (full–full at K = 2 with a shared q, ``benchmarks/kl_speed.py``: 2.28 → 0.73 ms
    forward). ``Precision.HIGHEST``, so that no accelerator rounds the addends to a shorter
    mantissa. Cost: O(size of x).
    """
    size = math.prod(x.shape[x.ndim - n :])
    flat = jnp.reshape(x, (*x.shape[: x.ndim - n], size))
    return jnp.matmul(flat, jnp.ones(size, x.dtype), precision=lax.Precision.HIGHEST)


def _masked_sq_sum(m: Array, row_scale: Array | float = 1.0) -> Array:
    """``Σ_{i>j} (rᵢ m_ij)²`` as the squares of ``m`` times the matrix [i > j]·rᵢ: right wherever
    the upper triangle is finite (0 · inf and 0 · NaN are NaN). Cost: O(K²).

    The row scale goes into that K × K matrix (… × K × K for a scale per batch element), not
    into a broadcast of r over ``m``'s shape: in a gradient XLA merges such a broadcast with the
    derivative's and writes it out whole for the reduction (6.5 MB at K = 128, B = 100)."""
    k = m.shape[-1]
    rows = lax.broadcasted_iota(jnp.int32, (k, k), 0)
    cols = lax.broadcasted_iota(jnp.int32, (k, k), 1)
    weight = (rows > cols).astype(m.dtype) * _per_row(row_scale)
    return jnp.sum(jnp.square(m * weight), axis=(-2, -1))


def _per_row(row_scale: Array | float) -> Array | float:
    """``rᵢ`` (… × K, or a number) broadcast against the rows of a … × K × K array."""
    return row_scale if jnp.ndim(row_scale) == 0 else row_scale[..., :, None]


def _tril_sq_sum(m: Array, row_scale: Array | float = 1.0) -> Array:
    return jnp.sum(jnp.square(jnp.tril(m, -1) * _per_row(row_scale)), axis=(-2, -1))


# Up to this K ``strict_lower_sq_sum`` is a masked product, above it a sum by row blocks.
_MASKED_MAX_K = 128
_ROW_BLOCKS = 16


def _row_block_sq_sum(m: Array, row_scale: Array | float = 1.0) -> Array:
    """``Σ_{i>j} (rᵢ m_ij)²`` by ``_ROW_BLOCKS`` blocks of rows: the part of a block left of its
    diagonal block is summed whole, and only the diagonal block goes through ``jnp.tril``, so
    only the lower triangle is read and the upper one never reaches the sum. Cost: O(K²)."""
    k = m.shape[-1]
    rows = -(-k // _ROW_BLOCKS)

    def scale(lo: int, hi: int) -> Array | float:
        return row_scale if jnp.ndim(row_scale) == 0 else row_scale[..., lo:hi]

    total = _tril_sq_sum(m[..., :rows, :rows], scale(0, rows))
    for lo in range(rows, k, rows):
        hi = min(lo + rows, k)
        block = m[..., lo:hi, :lo] * _per_row(scale(lo, hi))
        total = total + jnp.sum(jnp.square(block), axis=(-2, -1))
        total = total + _tril_sq_sum(m[..., lo:hi, lo:hi], scale(lo, hi))
    return total


def strict_lower_sq_sum(m: Array, row_scale: Array | None = None) -> Array:
    """``Σ_{i>j} (rᵢ m_ij)²`` over the last two axes (rᵢ = 1 without ``row_scale``, which is
    … × K; batch shapes broadcast), whatever the upper triangle holds. Cost: O(K²).

    A row scale, not a scaled copy of ``m``: for a full p against a diagonal q the rule sums
    the squares of Lp,ᵢⱼ/σq,ᵢ, and a scaled copy passed here was written out whole (it is the
    operand of the fallback below) and read again, an extra pass over p's factor wherever σq
    is not a constant of the program (``kl_speed.py``'s ``full vs diag``, K = 128, B = 100:
    1.5–1.6 → 0.7–0.8 ms forward, docs/performance.md).

    ``jnp.tril`` lowers to a select, which XLA's CPU loops do not vectorize; instead
    (``benchmarks/triangle_sums.py``, float32, against ``jnp.tril``, the table in
    docs/performance.md):

    - up to K = 128, the squares of ``m`` times a 0/1 mask (``_masked_sq_sum``): 2.3× faster at
      K = 8, 3.4× at K = 32, 2.2× at K = 128 with B = 100 (full against N(0, I) in
      ``benchmarks/kl_speed.py``: 0.96 → 0.50 ms forward). The product lets 0 · inf or 0 · NaN
      from the upper triangle into the sum, so where the sum of some batch element is not
      finite it is recomputed by row blocks (below), which read only the lower triangle: a
      ``lax.cond`` on one boolean for the whole batch (the second pass runs only then, or always
      under a ``vmap`` that batches ``m``; a batch sharded across devices all-reduces that
      boolean). XLA reserves the branch's temporaries on every call, and ``jnp.tril`` there
      was a select written out whole: the row blocks halve them (full against a diagonal q,
      K = 128, B = 100: temporaries 6.6 → 3.5 MB, ``memory_analysis`` of the compiled call);
    - above, where the masked product loses its lead (K = 256: 1.05×; K = 2048, B = 1: 1.08×),
      by row blocks (``_row_block_sq_sum``): 1.15× at K = 256, 4.3× at K = 512 with B = 32,
      1.7× at K = 2048.

    The derivative, 2 Σ_{i>j} rᵢ m_ij (rᵢ dm_ij + m_ij drᵢ), is one pass through ``jnp.tril``
    (a ``lax.cond`` there as well made the gradient slower: full against N(0, I), K = 128,
    0.78 → 1.3 ms); a row scale with a zero tangent (a prior with fixed parameters) adds nothing.
    """
    return _scaled_strict_lower_sq_sum(m, 1.0 if row_scale is None else row_scale)


@jax.custom_jvp
def _scaled_strict_lower_sq_sum(m: Array, row_scale: Array | float) -> Array:
    if m.shape[-1] > _MASKED_MAX_K:
        return _row_block_sq_sum(m, row_scale)
    fast = _masked_sq_sum(m, row_scale)
    return lax.cond(
        jnp.all(jnp.isfinite(fast)), lambda *_: fast, _row_block_sq_sum, m, jnp.asarray(row_scale)
    )


@partial(_scaled_strict_lower_sq_sum.defjvp, symbolic_zeros=True)
def _scaled_strict_lower_sq_sum_jvp(
    primals: tuple[Array, Array | float], tangents: tuple[Array | SymbolicZero, ...]
) -> tuple[Array, Array]:
    (m, row_scale), (dm, d_scale) = primals, tangents
    value = _scaled_strict_lower_sq_sum(m, row_scale)
    scaled = 2.0 * jnp.tril(m, -1) * _per_row(row_scale)
    tangent = jnp.zeros_like(value)
    if not isinstance(dm, SymbolicZero):
        tangent = tangent + jnp.sum(scaled * _per_row(row_scale) * dm, axis=(-2, -1))
    if not isinstance(d_scale, SymbolicZero):
        tangent = tangent + jnp.sum(scaled * m * _per_row(d_scale), axis=(-2, -1))
    return value, tangent


# Blocks of at most this size are multiplied densely by ``sq_sum_of_product``
# (leaves 8, 16 and 32 measured within noise of each other in the kl_speed.py grid).
_PRODUCT_LEAF = 8


def product_transposed(a: Array, b: Array) -> Array:
    """(AB)ᵀ = BᵀAᵀ, contracting B's rows: with A shared by B's batch this is one GEMM over the
    batch rows, where ``a @ b`` lowers to a (K, batch·K) product and a transposed copy of it
    (1.1–1.3× faster at K = 32 in ``kl_speed.py``'s cell)."""
    return jnp.einsum("...ji,...kj->...ik", b, a)


def sq_sum_of_product(a: Array, b: Array, leaf: int = _PRODUCT_LEAF) -> Array:
    """``‖AB‖²_F`` for lower-triangular A and B (… × K × K, batch shapes broadcast) whose upper
    triangles are zero.

    With h = K/2, AB = [[A₁₁B₁₁, 0], [A₂₁B₁₁ + A₂₂B₂₁, A₂₂B₂₂]]: the off-diagonal block is the
    single dense product A[h:, :] B[:, :h] (a quarter of the dense flops) and the diagonal blocks
    recurse, so the product costs about a third of the dense 2K³ flops per batch element, forward
    and backward, and AB is never assembled. A shared A (smaller batch shape) is not copied; the
    blocks are formed transposed (``product_transposed``), which leaves the sums unchanged.
    """
    k = a.shape[-1]
    if k <= leaf:
        return jnp.sum(jnp.square(product_transposed(a, b)), axis=(-2, -1))
    h = k // 2
    off = product_transposed(a[..., h:, :], b[..., :, :h])
    return (
        sq_sum_of_product(a[..., :h, :h], b[..., :h, :h], leaf)
        + sq_sum_of_product(a[..., h:, h:], b[..., h:, h:], leaf)
        + jnp.sum(jnp.square(off), axis=(-2, -1))
    )


@jax.custom_jvp
def diagonal(m: Array) -> Array:
    """The diagonal of ``m`` (… × K × K → … × K), whose derivative is an elementwise mask.

    The tangent is Σⱼ dMᵢⱼ Iᵢⱼ, so reverse mode returns ``ct[..., None] * I``: an elementwise
    product that XLA fuses with the other contributions to M's cotangent, where
    ``jnp.diagonal``'s transpose is a scatter, one more pass over the … × K × K array (a 1.4×
    slower full-against-full gradient at K = 8, ``benchmarks/full_pair_forms.py``). Cost: O(K).
    """
    return jnp.diagonal(m, axis1=-2, axis2=-1)


@diagonal.defjvp
def _diagonal_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (m,), (dm,) = primals, tangents
    return diagonal(m), jnp.sum(dm * jnp.eye(m.shape[-1], dtype=dm.dtype), -1)


# Diagonal blocks of at most this size are inverted by substitution written out entry by entry.
_INVERSE_LEAF = 8


def _diagonal_blocks(m: Array, size: int) -> Array:
    """The K/size diagonal blocks of ``m`` (… × K × K) as … × (K/size) × size × size."""
    n = m.shape[-1] // size
    blocks = jnp.diagonal(m.reshape(*m.shape[:-2], n, size, n, size), axis1=-4, axis2=-2)
    return jnp.moveaxis(blocks, -1, -3)


def _leaf_inverse(tril: Array) -> Array:
    """L⁻¹ of small lower-triangular blocks by substitution, elementwise over the batch:
    Xⱼⱼ = 1/Lⱼⱼ, Xᵢⱼ = −(Σ_{j≤m<i} Lᵢₘ Xₘⱼ)/Lᵢᵢ. The event axes go in front first, so that
    every entry is a contiguous batch-shaped array. Cost: s³/6 multiply-adds per block."""
    s = tril.shape[-1]
    e = jnp.moveaxis(tril, (-2, -1), (0, 1))
    x: dict[tuple[int, int], Array] = {}
    for j in range(s):
        x[j, j] = 1.0 / e[j, j]
        for i in range(j + 1, s):
            acc = e[i, j] * x[j, j]
            for m in range(j + 1, i):
                acc = acc + e[i, m] * x[m, j]
            x[i, j] = -acc / e[i, i]
    zero = jnp.zeros_like(e[0, 0])
    rows = [jnp.stack([x.get((i, j), zero) for j in range(s)], -1) for i in range(s)]
    return jnp.stack(rows, -2)


@jax.custom_jvp
def tril_inverse(tril: Array) -> Array:
    """L⁻¹ for lower-triangular L (… × K × K; the upper triangle is ignored), by blocks.

    [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹CA⁻¹, D⁻¹]], applied bottom up: L is padded with an
    identity block to s·2ᵐ (s ≤ 8, padding < 2ᵐ), its s × s diagonal blocks are inverted by
    substitution (``_leaf_inverse``, elementwise over the batch and the blocks), then each level
    joins pairs of inverted blocks with two batched matmuls over all pairs at once. The upper
    triangle of the result is exactly zero. K³/3 flops, all in matmuls: XLA's batched triangular
    solve calls LAPACK once per matrix, single-threaded, which at K = 32 took 1.6× longer for a
    batch of 1000 (``benchmarks/full_pair_forms.py``), and the inverse needs no LAPACK call, so
    no deadlock.
    """
    k = tril.shape[-1]
    levels = max(0, math.ceil(math.log2(k / _INVERSE_LEAF)))
    leaf = math.ceil(k / 2**levels)
    size = leaf * 2**levels
    if size > k:
        pad = [(0, 0)] * (tril.ndim - 2) + [(0, size - k), (0, size - k)]
        tril = jnp.pad(tril, pad) + jnp.diag((jnp.arange(size) >= k).astype(tril.dtype))
    inv = _leaf_inverse(_diagonal_blocks(tril, leaf))
    s = leaf
    while s < size:
        pairs = inv.reshape(*inv.shape[:-3], size // (2 * s), 2, s, s)
        a_inv, d_inv = pairs[..., 0, :, :], pairs[..., 1, :, :]
        c = _diagonal_blocks(tril, 2 * s)[..., s:, :s]
        low = -(d_inv @ (c @ a_inv))
        inv = jnp.concatenate(
            [
                jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], -1),
                jnp.concatenate([low, d_inv], -1),
            ],
            -2,
        )
        s *= 2
    return inv[..., 0, :k, :k]


@tril_inverse.defjvp
@highest_precision
def _tril_inverse_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    """d(L⁻¹) = −L⁻¹ tril(dL) L⁻¹: two matmuls, linear in dL, so reverse mode is two more,
    X̄ ↦ −tril(L⁻ᵀ X̄ L⁻ᵀ), and every order of derivative goes through this rule again.
    Autodiff through the blocks transposed the unrolled leaf inverses into many small
    operations (full–full with a q per guide, K = 32, a batch of 1000, gradient with respect to
    both factors: 34 → 10 ms, ``benchmarks/kl_speed.py --grad-q``, docs/performance.md)."""
    (tril,), (d_tril,) = primals, tangents
    inv = tril_inverse(tril)
    return inv, -(inv @ (jnp.tril(d_tril) @ inv))


# Triangles of at most this size are solved by ``tril_inverse`` and one product.
_SOLVE_LEAF = 64


def solve_by_halves(tril: Array, rhs: Array) -> Array:
    """L⁻¹R for lower-triangular L (… × n × n) and a dense R (… × n × m), by halves.

    X₁ = L₁₁⁻¹R₁, X₂ = L₂₂⁻¹(R₂ − L₂₁X₁), recursively, down to blocks of ``_SOLVE_LEAF`` that
    are inverted (``tril_inverse``) and applied by a product: n²m flops, all in matmuls (XLA's
    batched triangular solve calls LAPACK once per matrix, single-threaded). Batch shapes
    broadcast. Cost: O(n² m).
    """
    n = tril.shape[-1]
    if n <= _SOLVE_LEAF:
        return tril_inverse(tril) @ rhs
    h = n // 2
    x1 = solve_by_halves(tril[..., :h, :h], rhs[..., :h, :])
    x2 = solve_by_halves(tril[..., h:, h:], rhs[..., h:, :] - tril[..., h:, :h] @ x1)
    return jnp.concatenate([x1, x2], -2)


def solve_sq_sums(tril: Array, b: Array, vec: Array | None = None) -> tuple[Array, Array]:
    """‖L⁻¹B‖²_F and ‖L⁻¹v‖² (0 without ``vec``) for lower-triangular L and B (… × n × n,
    upper triangles zero) of one batch shape, and v (… × n); L⁻¹B is never assembled.

    With L⁻¹B = [[X₁₁, 0], [X₂₁, X₂₂]]: X₁₁ = L₁₁⁻¹B₁₁ and X₂₁ = L₂₂⁻¹(B₂₁ − L₂₁X₁₁) by
    ``solve_by_halves`` (v rides along as one more column), X₂₂ = L₂₂⁻¹B₂₂ recursively:
    4n³/7 flops against n³ for L⁻¹ and the product of two triangles, in larger matmuls (the
    full–full KL at K = 2048: 36 against 83 ms forward, 80 against 119 ms with gradients,
    ``benchmarks/full_pair_forms.py``). Cost: O(4n³/7).
    """
    n = tril.shape[-1]
    # v as one column, or none (an n × 0 block: its sums are empty, 0)
    v_col = b[..., :, :0] if vec is None else vec[..., None]
    if n <= _SOLVE_LEAF:
        inv = tril_inverse(tril)
        return _sq_sum(inv @ b), _sq_sum(inv @ v_col)
    h = n // 2
    rhs = jnp.concatenate([b[..., :, :h], v_col], -1)
    top = solve_by_halves(tril[..., :h, :h], rhs[..., :h, :])
    bottom = solve_by_halves(tril[..., h:, h:], rhs[..., h:, :] - tril[..., h:, :h] @ top)
    sq_22, _ = solve_sq_sums(tril[..., h:, h:], b[..., h:, h:])
    return (
        _sq_sum(top[..., :h]) + _sq_sum(bottom[..., :h]) + sq_22,
        _sq_sum(top[..., h:]) + _sq_sum(bottom[..., h:]),
    )


def _sq_sum(x: Array) -> Array:
    """Σ x² over the last two axes (0 where they are empty)."""
    return jnp.sum(jnp.square(x), (-2, -1))


# Up to these K a substitution written out row by row (elementwise over the batch, fused by XLA)
# beats XLA's batched triangular solve on CPU, forward and backward. In the kl_speed.py grid it
# wins at K = 2 in both layouts and at K = 8 only without a shared factor, where one inverse and a
# matmul win; the thresholds sit between those measured sizes.
UNROLL_MAX_K = 8
# Above this K a factor shared by a batch is inverted once and applied by matmul.
SHARED_SOLVE_MIN_K = 4


def solve_unrolled(tril: Array, rhs: Array, transpose: bool) -> Array:
    """Forward (or, for ``tril⁻ᵀ``, backward) substitution unrolled over the K rows.

    yᵢ = (xᵢ − Σⱼ Lᵢⱼ yⱼ) / Lᵢᵢ over j < i (over j > i with Lⱼᵢ for the transpose); every
    operation is elementwise over the batch and the n columns, so shapes broadcast for free.
    Cost: K²/2 fused multiply-adds per column.
    """
    k = rhs.shape[-2]
    order = range(k - 1, -1, -1) if transpose else range(k)
    y: dict[int, Array] = {}
    for i in order:
        acc = rhs[..., i, :]
        for j in y:
            coeff = tril[..., j, i] if transpose else tril[..., i, j]
            acc = acc - coeff[..., None] * y[j]
        y[i] = acc / tril[..., i, i][..., None]
    return jnp.stack([y[i] for i in range(k)], axis=-2)


def solve_sq_sums_unrolled(tril: Array, a: Array, b: Array, vec: Array) -> tuple[Array, Array]:
    """``Σ_{i>j} (L⁻¹(A − B))ᵢⱼ²`` and ``‖L⁻¹v‖²`` for lower-triangular L, A, B, unrolled.

    Column j of L⁻¹(A − B) is zero above row j, so its substitution starts at row j: K³/6
    multiply-adds for the matrix and K²/2 for v, each elementwise over the batch (shapes
    broadcast) on the entries of the lower triangles. The event axes are moved in front first,
    so that every entry is a contiguous batch-shaped array (strided entries of … × K × K made
    XLA copy each one out, 2–4× slower at K = 2 … 4); neither the difference, nor L⁻¹(A − B),
    nor a stacked right-hand side is assembled. For small K only: the program grows as K³.
    """
    k = tril.shape[-1]
    tril_e, a_e, b_e = (jnp.moveaxis(x, (-2, -1), (0, 1)) for x in (tril, a, b))
    vec_e = jnp.moveaxis(vec, -1, 0)

    def substitute(entry: Callable[[int], Array], start: int) -> dict[int, Array]:
        y: dict[int, Array] = {}
        for i in range(start, k):
            acc = entry(i)
            for m, y_m in y.items():
                acc = acc - tril_e[i, m] * y_m
            y[i] = acc / tril_e[i, i]
        return y

    strict: Array | float = 0.0
    for j in range(k - 1):  # the last column has no strictly lower part
        y = substitute(lambda i, j=j: a_e[i, j] - b_e[i, j], j)
        strict = strict + sum(jnp.square(y[i]) for i in range(j + 1, k))
    y = substitute(lambda i: vec_e[i], 0)
    return jnp.asarray(strict), sum(jnp.square(v) for v in y.values())


def is_shared(tril: Array, batch: tuple[int, ...]) -> bool:
    """Whether the factor ``tril`` (… × K × K) serves several elements of ``batch``: its batch
    shape is smaller, so it is inverted once and applied by matmul. Static shapes only."""
    return math.prod(tril.shape[:-2]) < math.prod(batch)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def triangular_solve(tril: Array, rhs: Array, transpose: bool) -> Array:
    """``L⁻¹ R`` (``L⁻ᵀ R`` if ``transpose``) for lower-triangular L and R of equal batch shape.

    ``jax.scipy.linalg.solve_triangular`` with a derivative that costs one solve, not two: the
    tangent is the single solve dY = L⁻¹(dR − tril(dL) Y) (L⁻ᵀ(dR − tril(dL)ᵀ Y)), so reverse
    mode transposes it into one backward solve and a matmul. JAX's own rule solves for dR and for
    dL separately; in one program those are two independent batched LAPACK calls, twice the work,
    and with jaxlib 0.10 on a 2-thread CPU pool they can deadlock. Cost: O(K² n) forward, the
    same again per derivative.
    """
    return solve_triangular(tril, rhs, lower=True, trans=int(transpose))


@highest_precision
def _triangular_solve_jvp(
    transpose: bool, primals: tuple[Array, Array], tangents: tuple[Array, Array]
) -> tuple[Array, Array]:
    tril, rhs = primals
    d_tril, d_rhs = tangents
    y = triangular_solve(tril, rhs, transpose)
    if isinstance(d_tril, SymbolicZero) and isinstance(d_rhs, SymbolicZero):
        return y, jnp.zeros_like(y)
    tangent = 0.0 if isinstance(d_rhs, SymbolicZero) else d_rhs
    if not isinstance(d_tril, SymbolicZero):
        d_tril = jnp.tril(d_tril)
        tangent = tangent - (jnp.swapaxes(d_tril, -1, -2) if transpose else d_tril) @ y
    return y, triangular_solve(tril, jnp.broadcast_to(tangent, y.shape), transpose)


triangular_solve.defjvp(_triangular_solve_jvp, symbolic_zeros=True)


def solve_lower(tril: Array, rhs: Array, transpose: bool = False) -> Array:
    """``tril⁻¹ rhs`` (``tril⁻ᵀ rhs`` if ``transpose``) for lower-triangular ``tril`` (… × K × K).

    ``rhs`` is … × K × n.

    Batch shapes broadcast like NumPy's. A factor shared by a batch of right-hand sides (its batch
    shape smaller than the broadcast one) is inverted once (``tril_inverse``,
    O(K³/3)) and applied by a broadcasting matmul, never copied per batch element. Small K is
    solved by unrolled substitution. Cost: O(K² n) per right-hand side.
    """
    batch = lax.broadcast_shapes(tril.shape[:-2], rhs.shape[:-2])
    k = rhs.shape[-2]
    shared = is_shared(tril, batch)
    if k <= SHARED_SOLVE_MIN_K or (k <= UNROLL_MAX_K and not shared):
        return solve_unrolled(tril, rhs, transpose)
    if not shared:
        tril = jnp.broadcast_to(tril, (*batch, k, k))
        rhs = jnp.broadcast_to(rhs, (*batch, *rhs.shape[-2:]))
        return triangular_solve(tril, rhs, transpose)
    # A factor shared along some batch axes: invert it once (``tril_inverse``) and apply it
    # with a broadcasting matmul, which neither copies the factor nor the right-hand sides.
    inv = tril_inverse(tril)
    return jnp.matmul(jnp.swapaxes(inv, -1, -2) if transpose else inv, rhs)
