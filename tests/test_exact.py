"""Error-free transformations (numpyro_gkl.exact) and the exact-residual path of the mixed
full / low-rank pairs.

References: float64 NumPy on the same float32 inputs, where a product of two float32 numbers is
exact and a sum of a few of them nearly so; for the mixed pairs the dense textbook KL in float64.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, dense_cov, dense_kl, make_dist, random_params, rng_for
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads
from numpyro.distributions.kl import kl_divergence
from test_grads import kl_of_thetas, random_theta

import numpyro_gkl.kl
from numpyro_gkl.exact import gram_residual, square_minus, two_product, two_sum

finite32 = st.floats(
    min_value=-(2.0**50), max_value=2.0**50, allow_nan=False, allow_subnormal=False, width=32
)


@given(finite32, finite32)
def test_two_sum_is_exact(a, b):
    s, e = jax.jit(two_sum)(jnp.float32(a), jnp.float32(b))
    assert float(s) == np.float32(np.float32(a) + np.float32(b))
    assert float(s) + float(e) == float(np.float32(a)) + float(np.float32(b))


@given(
    st.floats(min_value=2.0**-30, max_value=2.0**30, width=32),
    st.floats(min_value=-(2.0**30), max_value=2.0**30, width=32),
)
def test_two_product_is_exact(a, b):
    p, e = jax.jit(two_product)(jnp.float32(a), jnp.float32(b))
    exact = float(np.float32(a)) * float(np.float32(b))  # 48 bits: exact in float64
    assert float(p) == float(np.float32(exact))
    assert float(p) + float(e) == exact


def test_square_minus_keeps_small_differences():
    rng = np.random.default_rng(0)
    s = rng.uniform(0.3, 3.0, 2000).astype(np.float32)
    d = (s.astype(np.float64) ** 2 * (1 + 1e-5 * rng.normal(size=2000))).astype(np.float32)
    got = np.asarray(jax.jit(square_minus)(s, d), np.float64)
    exact = s.astype(np.float64) ** 2 - d.astype(np.float64)
    # one rounding of the exact difference
    assert np.all(np.abs(got - exact) <= np.abs(exact) * 2.0**-24)
    naive = (s * s - d).astype(np.float64)
    assert np.median(np.abs(naive - exact) / np.abs(exact)) > 1e-4  # what it avoids


@pytest.mark.parametrize(("k", "r"), [(3, 1), (20, 4), (130, 8)])
def test_gram_residual_matches_float64(k, r):
    """R = [L | W] diag(1, −1) [L | W]ᵀ − D for nearly equal LLᵀ and D + WWᵀ, in float32."""
    rng = np.random.default_rng(k)
    d0 = np.exp(rng.uniform(-0.5, 0.5, k))
    w = 0.5 * rng.normal(size=(k, r)) * np.sqrt(d0)[:, None]
    tril = np.linalg.cholesky(np.diag(d0) + w @ w.T)
    tril = tril @ (np.eye(k) + 1e-5 * np.tril(rng.normal(size=(k, k))) / math.sqrt(k))
    a = np.concatenate([tril, w], -1).astype(np.float32)
    signs = np.concatenate([np.ones(k), -np.ones(r)]).astype(np.float32)
    d = d0.astype(np.float32)
    a64 = a.astype(np.float64)
    exact = (a64 * signs) @ a64.T - np.diag(d.astype(np.float64))
    got = np.asarray(jax.jit(gram_residual)(a, signs, -d), np.float64)
    scale = np.max(np.abs(a64), -1)
    err = np.abs(got - exact)
    # the target of gram_residual: 2^-(24+8) μᵢμⱼ, plus the final rounding of R
    assert np.all(err <= 2.0**-32 * np.outer(scale, scale) + 2.0**-24 * np.abs(exact))
    naive = ((a * signs) @ a.T - np.diag(d)).astype(np.float64)
    assert np.max(np.abs(naive - exact)) > 100 * np.max(err)  # float32 GEMM alone is far off


MIXED = [("scale_tril", "lowrank3"), ("lowrank3", "scale_tril"), ("lowrank1", "scale_tril")]


@pytest.fixture
def always_exact(monkeypatch):
    """Routes every mixed full / low-rank pair through the exact residual, in float64 too."""
    monkeypatch.setattr(numpyro_gkl.kl, "_EXACT_BELOW", math.inf)


@pytest.mark.parametrize(("sp", "sq"), MIXED)
def test_exact_path_float64_matches_dense(sp, sq, always_exact):
    rng = rng_for("exact path", sp, sq)
    k = 6
    pp = random_params(rng, sp, k, batch_shape=(3, 1))
    pq = random_params(rng, sq, k, batch_shape=(4,))
    got = jax.jit(lambda a, b: kl_divergence(make_dist(sp, a), make_dist(sq, b)))(pp, pq)
    ref = dense_kl(pp["loc"], dense_cov(sp, pp), pq["loc"], dense_cov(sq, pq))
    assert_close(got, ref, rtol=1e-10, what=f"{sp}-{sq}")


# second order on one of the two paths: through the Cholesky of Dq + WqWqᵀ it costs 30 s of
# compilation, and that Cholesky is jax's own
@pytest.mark.parametrize(("sp", "sq", "order"), [(*MIXED[0], 1), (*MIXED[1], 2)])
def test_exact_path_derivatives(sp, sq, order, always_exact):
    """Derivatives through the split, the two-sums and the gate (float64), and vmap of the
    gradient (the gate's predicate batched: both branches, same numbers)."""
    rng = rng_for("exact grads", sp, sq)
    args = (random_theta(rng, sp), random_theta(rng, sq))
    f = jax.jit(kl_of_thetas(sp, sq))
    check_grads(f, args, order=order, modes=["rev"])
    batched = jax.vmap(jax.grad(f), in_axes=(0, None))(np.stack([args[0], 2 * args[0]]), args[1])
    assert_close(batched[1], jax.grad(f)(2 * args[0], args[1]), rtol=1e-12)
