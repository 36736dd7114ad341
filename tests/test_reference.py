"""Closed-form KL against dense float64 NumPy for every ordered pair of structures."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import (
    STRUCTURES,
    assert_close,
    build,
    built_kl,
    conditioned_tril,
    dense_kl,
    normal_kl,
    random_gaussian,
    rng_for,
)
from jax.test_util import check_grads
from numpyro.distributions.kl import kl_divergence

from numpyro_gkl.linalg import solve_by_halves, solve_sq_sums, tril_inverse

PAIRS = list(itertools.product(STRUCTURES, STRUCTURES))
RTOL = 1e-10


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize(("sp", "sq"), PAIRS)
def test_pair_matches_dense(sp, sq, k):
    rng = rng_for("pair", sp, sq, k)
    p = random_gaussian(rng, sp, k)
    q = random_gaussian(rng, sq, k)
    kl = kl_divergence(p.dist, q.dist)
    assert jnp.shape(kl) == ()
    assert jnp.asarray(kl).dtype == jnp.float64
    assert_close(kl, built_kl(p, q), rtol=RTOL)


def test_scalar_normal_normal():
    rng = rng_for("scalar")
    mp, mq = rng.normal(size=(2, 5))
    sp, sq = np.exp(rng.uniform(-1, 1, size=(2, 5)))
    kl = kl_divergence(dist.Normal(mp, sp), dist.Normal(mq, sq))
    assert_close(kl, normal_kl(mp, sp, mq, sq), rtol=RTOL)
    # and as 1x1 covariances through the dense formula
    dense = dense_kl(mp[:, None], sp[:, None, None] ** 2, mq[:, None], sq[:, None, None] ** 2)
    assert_close(kl, dense, rtol=RTOL)


def test_scalar_normal_normal_broadcast():
    kl = kl_divergence(dist.Normal(jnp.zeros((3, 1)), 1.0), dist.Normal(jnp.arange(4.0), 2.0))
    assert_close(kl, normal_kl(np.zeros((3, 1)), 1.0, np.arange(4.0), 2.0), rtol=RTOL)


@pytest.mark.parametrize("batch_shape", [(), (4,)])
def test_matrix_event_independent_normal(batch_shape):
    """Independent(Normal, 2) vs Independent(Normal, 2): a sum over the (2, 3) event."""
    rng = rng_for("matrix", batch_shape)
    shape = (*batch_shape, 2, 3)
    mp, mq = rng.normal(size=(2, *shape))
    sp, sq = np.exp(rng.uniform(-0.5, 0.5, size=(2, *shape)))
    p = dist.Normal(mp, sp).to_event(2)
    q = dist.Normal(mq, sq).to_event(2)
    expected = normal_kl(mp, sp, mq, sq).sum((-2, -1))
    assert_close(kl_divergence(p, q), expected, rtol=RTOL)
    # the same through the dense formula on the flattened event
    flat = (*batch_shape, 6)
    dense = dense_kl(
        mp.reshape(flat),
        (sp.reshape(flat) ** 2)[..., None] * np.eye(6),
        mq.reshape(flat),
        (sq.reshape(flat) ** 2)[..., None] * np.eye(6),
    )
    assert_close(kl_divergence(p, q), dense, rtol=RTOL)
    # nested Independent(Independent(Normal, 1), 1) is the same distribution
    nested = dist.Independent(dist.Normal(mq, sq).to_event(1), 1)
    assert_close(kl_divergence(p, nested), expected, rtol=RTOL)


# --------------------------------------------------------------------------------------------
# expanded forms
# --------------------------------------------------------------------------------------------

K_EXP = 3


def _scalar_expanded(m: float, s: float):
    """``Normal(m, s).expand([K]).to_event(1)`` and its dense reference."""
    d = dist.Normal(m, s).expand([K_EXP]).to_event(1)
    return d, np.full(K_EXP, m), s**2 * np.eye(K_EXP)


def _expand_params():
    for partner in (*STRUCTURES, "expanded"):
        for side in ("p", "q"):
            yield pytest.param(partner, side, id=f"{partner}-expanded_is_{side}")


@pytest.mark.parametrize(("partner", "side"), list(_expand_params()))
def test_scalar_expanded_to_event(partner, side):
    """``Normal(0., 1.).expand([K]).to_event(1)``: a common prior, against every structure."""
    e, em, ec = _scalar_expanded(0.0, 1.0)
    if partner == "expanded":
        o, om, oc = _scalar_expanded(0.5, 2.0)
    else:
        b = random_gaussian(rng_for("expand", partner), partner, K_EXP)
        o, om, oc = b.dist, b.loc, b.cov
    if side == "p":
        kl, expected = kl_divergence(e, o), dense_kl(em, ec, om, oc)
    else:
        kl, expected = kl_divergence(o, e), dense_kl(om, oc, em, ec)
    assert_close(kl, expected, rtol=RTOL)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_partially_broadcast_diag_parameters(structure):
    """Independent(Normal) with a vector loc and a scalar scale, or the reverse."""
    rng = rng_for("partial", structure)
    other = random_gaussian(rng, structure, K_EXP)
    loc = rng.normal(size=K_EXP)
    scale = np.exp(rng.uniform(-0.5, 0.5, size=K_EXP))
    forms = [
        (dist.Normal(jnp.asarray(loc), 1.7).to_event(1), loc, 1.7**2 * np.eye(K_EXP)),
        (dist.Normal(0.3, jnp.asarray(scale)).to_event(1), np.full(K_EXP, 0.3), np.diag(scale**2)),
    ]
    for d, m, c in forms:
        assert_close(kl_divergence(d, other.dist), dense_kl(m, c, other.loc, other.cov), RTOL)
        assert_close(kl_divergence(other.dist, d), dense_kl(other.loc, other.cov, m, c), RTOL)


@pytest.mark.parametrize(("sp", "sq"), PAIRS)
def test_expanded_batch(sp, sq):
    """``d.expand([5])`` (e.g. ``MultivariateNormal(...).expand([5])``) on either side."""
    rng = rng_for("expand_batch", sp, sq)
    p = random_gaussian(rng, sp, K_EXP)
    q = random_gaussian(rng, sq, K_EXP, (5,))
    kl = kl_divergence(p.dist.expand([5]), q.dist)
    assert_close(kl, built_kl(p, q), rtol=RTOL)
    kl = kl_divergence(q.dist, p.dist.expand([5]))
    assert_close(kl, dense_kl(q.loc, q.cov, p.loc, p.cov), rtol=RTOL)
    # both expanded: the result takes the broadcast batch shape
    kl = kl_divergence(p.dist.expand([5]), q.dist.expand([2, 5]))
    assert_close(kl, np.broadcast_to(built_kl(p, q), (2, 5)), rtol=RTOL)


@pytest.mark.parametrize("sq", STRUCTURES)
def test_independent_expanded_to_batch(sq):
    """``Normal(loc, scale).to_event(1).expand([2, 5])`` vs a batched q."""
    rng = rng_for("ind_expand", sq)
    p = random_gaussian(rng, "diag", K_EXP)
    q = random_gaussian(rng, sq, K_EXP, (5,))
    pe = p.dist.expand([2, 5])
    assert pe.batch_shape == (2, 5)
    kl = kl_divergence(pe, q.dist)
    assert_close(kl, np.broadcast_to(built_kl(p, q), (2, 5)), rtol=RTOL)
    kl = kl_divergence(q.dist, pe)
    expected = dense_kl(q.loc, q.cov, p.loc, p.cov)
    assert_close(kl, np.broadcast_to(expected, (2, 5)), rtol=RTOL)


# --------------------------------------------------------------------------------------------
# batch broadcasting
# --------------------------------------------------------------------------------------------

BATCHES = [((3, 1), (4,))]
# a shared q (batch ()) against batched p's and vice versa; every pair also meets an expanded,
# unbatched partner in test_expanded_batch above
SHARED = [((5,), ()), ((), (5,))]
SHARED_PAIRS = [
    (a, b)
    for a in ("diag", "scale_tril", "lowrank3")
    for b in ("diag", "precision_matrix", "lowrank1")
]
# more layouts (shared factors folded into a solve, extra leading axes) for a few pairs
MORE_CASES = [
    ("scale_tril", "scale_tril", (4,), (3, 1)),
    ("scale_tril", "scale_tril", (2, 1, 3), (4, 1)),
    ("diag", "scale_tril", (4,), (3, 1)),
    ("lowrank1", "lowrank3", (2, 3), (1, 3)),
]
BROADCAST_CASES = [
    *((*pair, *b) for pair in PAIRS for b in BATCHES),
    *((*pair, *b) for pair in SHARED_PAIRS for b in SHARED),
    *MORE_CASES,
]


@pytest.mark.parametrize(("sp", "sq", "bp", "bq"), BROADCAST_CASES, ids=str)
def test_batch_broadcasting(sp, sq, bp, bq):
    """p batch (3, 1) vs q batch (4,) gives (3, 4), each element equal to the dense reference."""
    rng = rng_for("broadcast", sp, sq, bp, bq)
    p = random_gaussian(rng, sp, K_EXP, bp)
    q = random_gaussian(rng, sq, K_EXP, bq)
    kl = np.asarray(kl_divergence(p.dist, q.dist))
    shape = np.broadcast_shapes(bp, bq)
    assert kl.shape == shape
    # element by element against the dense formula on unbatched slices
    pl, pc = np.broadcast_to(p.loc, (*shape, K_EXP)), np.broadcast_to(p.cov, (*shape, K_EXP, K_EXP))
    ql, qc = np.broadcast_to(q.loc, (*shape, K_EXP)), np.broadcast_to(q.cov, (*shape, K_EXP, K_EXP))
    for idx in np.ndindex(*shape):
        expected = dense_kl(pl[idx], pc[idx], ql[idx], qc[idx])
        assert_close(kl[idx], expected, rtol=RTOL, what=str(idx))


@pytest.mark.parametrize(
    ("k", "q_batch"),
    [(9, ()), (40, ()), (72, ()), (9, (3,)), (40, (3,)), (136, (3,))],
    ids=lambda v: str(v),
)
def test_full_pair_by_inverse(k, q_batch):
    """Full p's against full q's on every path above the unrolled sizes: a shared q by Lq⁻¹ by
    blocks (padded to the block grid at K = 9, 40, 72) and the dense or blocked product; a q per
    element by ``solve_sq_sums`` (one leaf at K = 9 and 40, two levels of halves at 136)."""
    rng = rng_for("full-by-inverse", k, len(q_batch))
    lp, lq = conditioned_tril(rng, k, (3,)), conditioned_tril(rng, k, q_batch)
    p = build("scale_tril", {"loc": rng.normal(size=(3, k)), "scale_tril": lp})
    cov_q = lq @ np.swapaxes(lq, -1, -2)
    mq = rng.normal(size=(*q_batch, k))
    q = build("covariance_matrix", {"loc": mq, "covariance_matrix": cov_q})
    kl = np.asarray(kl_divergence(p.dist, q.dist))
    for i in range(3):
        qi = (q.loc, q.cov) if not q_batch else (q.loc[i], q.cov[i])
        expected = dense_kl(p.loc[i], p.cov[i], *qi)
        assert_close(kl[i], expected, rtol=RTOL, what=f"element {i}")


@pytest.mark.parametrize(
    ("k", "q_batch"), [(40, ()), (40, (3,)), (136, ()), (136, (3,))], ids=lambda v: str(v)
)
def test_full_against_diagonal_with_gradients(k, q_batch):
    """A full p against a diagonal q with unequal scales, shared or one per element, on both
    paths of the triangle's sum of squares (the rows of Lp scaled by 1/σq inside the sum: a
    masked product at K = 40, blocks of rows at K = 136, whose last block is short). The value
    against the dense KL; the gradients against their closed forms, dKL/dLp = tril(Σq⁻¹Lp −
    Lp⁻ᵀ), dKL/dμp = Σq⁻¹δ, dKL/dσq = 1/σq − (diag Σp + δ²)/σq³ (summed over p's batch for a
    shared q)."""
    rng = rng_for("full-vs-diagonal", k, len(q_batch))
    b = 3
    lp = conditioned_tril(rng, k, (b,))
    mp, mq = rng.normal(size=(b, k)), rng.normal(size=(*q_batch, k))
    s = np.exp(rng.uniform(-0.7, 0.7, (*q_batch, k)))

    def kl(m, tril, scale):
        p = dist.MultivariateNormal(m, scale_tril=tril)
        return kl_divergence(p, dist.Normal(mq, scale).to_event(1))

    got = np.asarray(kl(mp, lp, s))
    s_b, mq_b = np.broadcast_to(s, (b, k)), np.broadcast_to(mq, (b, k))
    cov_p = lp @ np.swapaxes(lp, -1, -2)
    for i in range(b):
        want = dense_kl(mp[i], cov_p[i], mq_b[i], np.diag(s_b[i] ** 2))
        assert_close(got[i], want, rtol=RTOL, what=f"element {i}")
    g_m, g_l, g_s = jax.grad(lambda *a: jnp.sum(kl(*a)), (0, 1, 2))(mp, lp, s)
    delta = mp - mq_b
    want_l = np.tril(lp / s_b[:, :, None] ** 2 - np.swapaxes(np.linalg.inv(lp), -1, -2))
    want_s = 1.0 / s_b - (np.diagonal(cov_p, axis1=-2, axis2=-1) + delta**2) / s_b**3
    assert_close(g_l, want_l, rtol=1e-9, atol=1e-12, what="dKL/dLp")
    assert_close(g_m, delta / s_b**2, rtol=1e-9, atol=1e-12, what="dKL/dμp")
    want_s = want_s if q_batch else want_s.sum(0)
    assert_close(g_s, want_s, rtol=1e-9, atol=1e-12, what="dKL/dσq")


@pytest.mark.parametrize("k", [1, 7, 8, 9, 40, 136])
@pytest.mark.parametrize("batch", [(), (2, 3)], ids=str)
def test_tril_inverse_matches_numpy(k, batch):
    """``linalg.tril_inverse`` against ``np.linalg.inv``; the upper triangle of the input is
    ignored and that of the result is exactly zero."""
    rng = rng_for("tril-inverse", k, len(batch))
    a = rng.normal(size=(*batch, k, k))
    tril = np.tril(a, -1) / np.sqrt(k) + np.eye(k) * rng.uniform(0.5, 2.0, size=(*batch, 1, k))
    got = np.asarray(tril_inverse(jnp.asarray(tril + np.triu(a, 1))))
    assert got.shape == tril.shape
    assert np.all(np.triu(got, 1) == 0.0)
    assert_close(got, np.linalg.inv(tril), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [9, 40])
def test_tril_inverse_derivatives(k):
    """The pullback of ``tril_inverse``, X̄ ↦ −tril(L⁻ᵀX̄L⁻ᵀ), against dense NumPy (zero on the
    upper triangle, which the inverse ignores), and its first and second derivatives in both
    modes against finite differences (``check_grads``)."""
    rng = rng_for("tril-inverse-grad", k)
    a = rng.normal(size=(2, k, k))
    tril = np.tril(a, -1) / np.sqrt(k) + np.eye(k) * rng.uniform(0.5, 2.0, size=(2, 1, k))
    weight = rng.normal(size=(2, k, k))
    _, pullback = jax.vjp(tril_inverse, jnp.asarray(tril + np.triu(a, 1)))
    (got,) = pullback(jnp.asarray(weight))
    inv_t = np.swapaxes(np.linalg.inv(tril), -1, -2)
    assert_close(np.asarray(got), -np.tril(inv_t @ weight @ inv_t), rtol=1e-11, atol=1e-12)
    check_grads(
        lambda m: jnp.sum(jnp.sin(tril_inverse(m))),
        (jnp.asarray(tril[0]),),
        order=2,
        modes=["fwd", "rev"],
    )


@pytest.mark.parametrize("k", [5, 150])
def test_solve_by_halves_matches_numpy(k):
    """``linalg.solve_by_halves`` (one leaf at K = 5; at 150 unequal halves, 75 → 37 + 38) against
    ``np.linalg.solve``, with a factor broadcast against a batch of right-hand sides; and
    ``solve_sq_sums`` against the squared norms of the dense solves."""
    rng = rng_for("solve-by-halves", k)
    tril = np.tril(rng.normal(size=(2, 1, k, k)), -1) / np.sqrt(k) + np.eye(k) * rng.uniform(
        0.5, 2.0, size=(2, 1, 1, k)
    )
    rhs = rng.normal(size=(2, 3, k, 4))
    want = np.linalg.solve(np.broadcast_to(tril, (2, 3, k, k)), rhs)
    got = np.asarray(solve_by_halves(jnp.asarray(tril), jnp.asarray(rhs)))
    assert_close(got, want, rtol=1e-11, atol=1e-11)
    b = np.tril(rng.normal(size=(2, 3, k, k)))
    vec = rng.normal(size=(2, 3, k))
    full = np.broadcast_to(tril, (2, 3, k, k))
    sq_b, sq_v = solve_sq_sums(*(jnp.asarray(x) for x in (full, b, vec)))
    assert_close(np.asarray(sq_b), np.sum(np.linalg.solve(full, b) ** 2, (-2, -1)), rtol=1e-11)
    assert_close(
        np.asarray(sq_v), np.sum(np.linalg.solve(full, vec[..., None]) ** 2, (-2, -1)), rtol=1e-11
    )
    sq_only, zero = solve_sq_sums(jnp.asarray(full), jnp.asarray(b))
    assert_close(np.asarray(sq_only), np.asarray(sq_b), rtol=1e-13)
    assert np.all(np.asarray(zero) == 0.0)
