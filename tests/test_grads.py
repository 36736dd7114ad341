"""Derivatives of the closed-form KL: check_grads to second order, analytic gradients, and
behaviour under jit / vmap / grad (float64)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import (
    FULL,
    STRUCTURES,
    assert_close,
    conditioned_tril,
    dense_cov,
    dense_kl,
    make_dist,
    random_params,
    random_tril,
    rank_of,
    rng_for,
)
from jax.test_util import check_grads
from numpyro.distributions.kl import kl_divergence

K = 3
_TRIL = np.tril_indices(K)


# --------------------------------------------------------------------------------------------
# unconstrained vector θ -> parameters, so that finite differences stay valid
# --------------------------------------------------------------------------------------------


def theta_size(structure: str) -> int:
    if structure == "diag":
        return 2 * K
    if structure in FULL:
        return K + len(_TRIL[0])
    return K + K * rank_of(structure) + K


def unpack(structure: str, theta):
    """θ -> parameters: exp on scales / diagonals, a lower-triangular factor from its entries."""
    loc, rest = theta[:K], theta[K:]
    if structure == "diag":
        return {"loc": loc, "scale": jnp.exp(rest)}
    if structure in FULL:
        raw = jnp.zeros((K, K), theta.dtype).at[_TRIL].set(rest)
        tril = jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diag(raw)))
        if structure == "scale_tril":
            return {"loc": loc, "scale_tril": tril}
        return {"loc": loc, structure: tril @ tril.T}
    r = rank_of(structure)
    return {
        "loc": loc,
        "cov_factor": rest[: K * r].reshape(K, r),
        "cov_diag": jnp.exp(rest[K * r :]),
    }


def kl_of_thetas(sp: str, sq: str):
    def f(theta_p, theta_q):
        return kl_divergence(make_dist(sp, unpack(sp, theta_p)), make_dist(sq, unpack(sq, theta_q)))

    return f


def random_theta(rng, structure: str) -> np.ndarray:
    return 0.4 * rng.normal(size=theta_size(structure))


# What the package sees: Diagonal, Tril (every MVN parametrization becomes scale_tril) and
# LowRank; all their pairs. (Each new pair costs many first-time XLA compilations of the
# second-order derivatives, so the covariance / precision parametrizations and low ranks that
# differ between p and q, the same code at other shapes, get the first-order analytic gradient
# checks below instead.)
GRAD_STRUCTURES = ("diag", "scale_tril", "lowrank3")
GRAD_PAIRS = list(itertools.product(GRAD_STRUCTURES, GRAD_STRUCTURES))


# every combination of forward and reverse mode to second order on these; the others below
FOUR_MODE_PAIRS = (("diag", "diag"), ("scale_tril", "scale_tril"))


@pytest.mark.parametrize(("sp", "sq"), GRAD_PAIRS)
def test_check_grads_second_order(sp, sq):
    rng = rng_for("check_grads", sp, sq)
    args = (random_theta(rng, sp), random_theta(rng, sq))
    f = kl_of_thetas(sp, sq)
    assert np.isfinite(float(f(*args)))
    if (sp, sq) in FOUR_MODE_PAIRS:
        check_grads(f, args, order=2, modes=["rev", "fwd"])
    else:
        # reverse over reverse to second order and forward to first: the other three second-order
        # combinations cost as much again (scale_tril–lowrank3: 61 against 35 s, eager; jitted,
        # the compilation of the low-rank pairs costs more still). They are checked on the
        # FOUR_MODE_PAIRS, whose custom derivatives (x_minus_log1p's) every pair uses, and on the
        # hand-written full-pair rule (test_full_pair_check_grads_second_order)
        check_grads(f, args, order=2, modes=["rev"])
        check_grads(f, args, order=1, modes=["fwd"])


# --------------------------------------------------------------------------------------------
# analytic gradients (dense NumPy), for every ordered pair and every parameter
# --------------------------------------------------------------------------------------------


def dense_gradients(sp, pp, sq, pq):
    """dKL/dΣp = ½(Σq⁻¹ − Σp⁻¹), dKL/dΣq = ½(Σq⁻¹ − Σq⁻¹(Σp + δδᵀ)Σq⁻¹), dKL/dμp = Σq⁻¹δ,
    pushed through each parametrization by the chain rule (NumPy, float64)."""
    cp, cq = dense_cov(sp, pp), dense_cov(sq, pq)
    cq_inv, cp_inv = np.linalg.inv(cq), np.linalg.inv(cp)
    delta = pp["loc"] - pq["loc"]
    g_p = 0.5 * (cq_inv - cp_inv)
    g_q = 0.5 * (cq_inv - cq_inv @ (cp + np.outer(delta, delta)) @ cq_inv)
    grad_loc = cq_inv @ delta
    return (
        {"loc": grad_loc, **_through(sp, pp, g_p)},
        {"loc": -grad_loc, **_through(sq, pq, g_q)},
    )


def _through(structure, params, g):
    """Gradient w.r.t. the parameters, given G = dKL/dΣ (symmetric)."""
    if structure == "diag":
        return {"scale": 2.0 * params["scale"] * np.diag(g)}
    if structure == "scale_tril":
        return {"scale_tril": np.tril(2.0 * g @ params["scale_tril"])}
    if structure == "covariance_matrix":
        return {"covariance_matrix": g}
    if structure == "precision_matrix":
        cov = np.linalg.inv(params["precision_matrix"])
        return {"precision_matrix": -cov @ g @ cov}
    return {"cov_factor": 2.0 * g @ params["cov_factor"], "cov_diag": np.diag(g).copy()}


@pytest.mark.parametrize(("sp", "sq"), list(itertools.product(STRUCTURES, STRUCTURES)))
def test_gradients_match_analytic(sp, sq):
    rng = rng_for("analytic", sp, sq)
    pp, pq = random_params(rng, sp, K), random_params(rng, sq, K)

    def f(a, b):
        return kl_divergence(make_dist(sp, a), make_dist(sq, b))

    grads = jax.grad(f, argnums=(0, 1))(
        {k: jnp.asarray(v) for k, v in pp.items()}, {k: jnp.asarray(v) for k, v in pq.items()}
    )
    expected = dense_gradients(sp, pp, sq, pq)
    for side, got, want in zip("pq", grads, expected, strict=True):
        assert set(got) == set(want)
        for name in want:
            g = np.asarray(got[name])
            if name == "scale_tril":
                # only the lower triangle is a parameter; the upper one is structurally zero
                g = np.tril(g)
            assert_close(g, want[name], rtol=1e-8, atol=1e-10, what=f"{side}.{name}")


def _dense_kl_of(sp, pp, sq, pq):
    return dense_kl(pp["loc"], dense_cov(sp, pp), pq["loc"], dense_cov(sq, pq))


def test_analytic_gradient_helper_is_right():
    """dense_gradients agrees with central differences of the dense formula (NumPy only)."""
    rng = np.random.default_rng(5)
    h = 1e-6
    for sp, sq in [("diag", "lowrank1"), ("scale_tril", "lowrank3")]:
        pp, pq = random_params(rng, sp, K), random_params(rng, sq, K)
        want_p, want_q = dense_gradients(sp, pp, sq, pq)
        for side, params, grads in (("p", pp, want_p), ("q", pq, want_q)):
            for name, g in grads.items():
                idx = (g.shape[0] - 1,) + (0,) * (g.ndim - 1)  # a lower-triangle entry
                hi = {**params, name: params[name].copy()}
                lo = {**params, name: params[name].copy()}
                hi[name][idx] += h
                lo[name][idx] -= h
                if side == "p":
                    fd = (_dense_kl_of(sp, hi, sq, pq) - _dense_kl_of(sp, lo, sq, pq)) / (2 * h)
                else:
                    fd = (_dense_kl_of(sp, pp, sq, hi) - _dense_kl_of(sp, pp, sq, lo)) / (2 * h)
                np.testing.assert_allclose(g[idx], fd, rtol=1e-5, atol=1e-8, err_msg=name)


# --------------------------------------------------------------------------------------------
# p == q: gradients are finite and zero (the minimum of KL)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTURES)
def test_gradient_vanishes_at_p_equal_q(structure):
    theta = random_theta(np.random.default_rng(11), structure)
    gp, gq = jax.grad(kl_of_thetas(structure, structure), argnums=(0, 1))(theta, theta)
    assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gq))
    np.testing.assert_allclose(gp, 0.0, atol=1e-10)
    np.testing.assert_allclose(gq, 0.0, atol=1e-10)


def test_gradient_finite_for_zero_low_rank_factor():
    """A low-rank guide initialised with W = 0 against the equal diagonal prior."""
    loc = jnp.asarray([0.1, -0.2, 0.3])
    d = jnp.asarray([0.5, 1.0, 2.0])

    def f(w, cov_diag):
        return kl_divergence(
            make_dist("lowrank3", {"loc": loc, "cov_factor": w, "cov_diag": cov_diag}),
            make_dist("diag", {"loc": loc, "scale": jnp.sqrt(d)}),
        )

    gw, gd = jax.grad(f, argnums=(0, 1))(jnp.zeros((K, 3)), d)
    np.testing.assert_allclose(gw, 0.0, atol=1e-12)
    np.testing.assert_allclose(gd, 0.0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# jit, vmap, grad
# --------------------------------------------------------------------------------------------

# every structure on each side at least once, each package code path (p form × q form) once
SOME_PAIRS = [
    ("diag", "diag"),
    ("diag", "scale_tril"),
    ("diag", "lowrank3"),
    ("covariance_matrix", "diag"),
    ("scale_tril", "precision_matrix"),
    ("precision_matrix", "lowrank1"),
    ("lowrank1", "diag"),
    ("lowrank3", "covariance_matrix"),
    ("lowrank3", "lowrank1"),
]


def _all_kls(thetas_p, thetas_q, pairs):
    return jnp.stack([kl_of_thetas(sp, sq)(thetas_p[sp], thetas_q[sq]) for sp, sq in pairs])


def _dense_all(thetas_p, thetas_q, pairs):
    out = []
    for sp, sq in pairs:
        pp = {k: np.asarray(v) for k, v in unpack(sp, jnp.asarray(thetas_p[sp])).items()}
        pq = {k: np.asarray(v) for k, v in unpack(sq, jnp.asarray(thetas_q[sq])).items()}
        out.append(dense_kl(pp["loc"], dense_cov(sp, pp), pq["loc"], dense_cov(sq, pq)))
    return np.stack(out)


def test_under_jit():
    rng = np.random.default_rng(21)
    tp = {s: random_theta(rng, s) for s in STRUCTURES}
    tq = {s: random_theta(rng, s) for s in STRUCTURES}
    got = jax.jit(functools.partial(_all_kls, pairs=SOME_PAIRS))(tp, tq)
    assert_close(got, _dense_all(tp, tq, SOME_PAIRS), rtol=1e-10)


def test_under_vmap():
    rng = np.random.default_rng(22)
    batch = 4
    tp = {s: 0.4 * rng.normal(size=(batch, theta_size(s))) for s in STRUCTURES}
    tq = {s: random_theta(rng, s) for s in STRUCTURES}
    got = jax.jit(jax.vmap(functools.partial(_all_kls, pairs=SOME_PAIRS), in_axes=(0, None)))(
        tp, tq
    )
    want = np.stack(
        [_dense_all({s: t[i] for s, t in tp.items()}, tq, SOME_PAIRS) for i in range(batch)]
    )
    assert_close(got, want, rtol=1e-10)


def test_grad_under_jit_and_vmap():
    """jit(vmap(grad)) of the KL w.r.t. p's mean equals Σ_q Σq⁻¹(μp − μq) (q over p's partners)."""
    rng = np.random.default_rng(23)
    batch = 3
    tp = {s: 0.4 * rng.normal(size=(batch, theta_size(s))) for s in STRUCTURES}
    tq = {s: random_theta(rng, s) for s in STRUCTURES}

    def total(thetas_p, thetas_q):
        return jnp.sum(_all_kls(thetas_p, thetas_q, SOME_PAIRS))

    grads = jax.jit(jax.vmap(jax.grad(total), in_axes=(0, None)))(tp, tq)
    for s in STRUCTURES:
        want = np.zeros((batch, K))
        for i in range(batch):
            mp = np.asarray(tp[s][i, :K])
            for sq in (b for a, b in SOME_PAIRS if a == s):
                pq = {k: np.asarray(v) for k, v in unpack(sq, jnp.asarray(tq[sq])).items()}
                want[i] += np.linalg.solve(dense_cov(sq, pq), mp - pq["loc"])
        assert_close(grads[s][:, :K], want, rtol=1e-9, what=s)


def test_hessian_finite_for_zero_low_rank_factor():
    loc = jnp.asarray([0.1, -0.2, 0.3])
    d = jnp.asarray([0.5, 1.0, 2.0])

    def f(w):
        return kl_divergence(
            make_dist("lowrank3", {"loc": loc, "cov_factor": w, "cov_diag": d}),
            make_dist("diag", {"loc": loc, "scale": jnp.sqrt(d)}),
        )

    assert np.all(np.isfinite(jax.hessian(f)(jnp.zeros((K, 2)))))


# --------------------------------------------------------------------------------------------
# full vs full above K = 4: the hand-written derivative and autodiff through Lq⁻¹ by blocks
# --------------------------------------------------------------------------------------------

FULL_PAIR_B = 3


# K = 6: the rule (q per p), the blocked product differentiated through the dense one (shared);
# 12: one leaf of solve_sq_sums (per p), blocked/dense (shared); 72 and 136: one and two levels of
# halves (per p), blocked (shared) with Lq⁻¹ padded to the block grid
@pytest.mark.parametrize("k", [6, 12, 72, 136])
@pytest.mark.parametrize("q_batch", [(), (FULL_PAIR_B,)], ids=["q shared", "q per p"])
def test_full_pair_gradients_match_analytic(k, q_batch):
    """Every batch element's gradient w.r.t. all four parameters equals the dense NumPy one;
    a shared q's gradient is the sum over the batch."""
    rng = rng_for("full_pair", k, len(q_batch))
    pp = random_params(rng, "scale_tril", k, (FULL_PAIR_B,))
    pq = random_params(rng, "scale_tril", k, q_batch)
    pp["scale_tril"] = conditioned_tril(rng, k, (FULL_PAIR_B,))
    pq["scale_tril"] = conditioned_tril(rng, k, q_batch)

    def f(a, b):
        return jnp.sum(kl_divergence(make_dist("scale_tril", a), make_dist("scale_tril", b)))

    jp, jq = {n: jnp.asarray(v) for n, v in pp.items()}, {n: jnp.asarray(v) for n, v in pq.items()}
    got_p, got_q = jax.jit(jax.grad(f, argnums=(0, 1)))(jp, jq)
    only_p = jax.jit(jax.grad(f))(jp, jq)  # a fixed prior: its tangents are symbolic zeros
    want_p = {n: np.zeros_like(v) for n, v in pp.items()}
    want_q = {n: np.zeros_like(v) for n, v in pq.items()}
    for i in range(FULL_PAIR_B):
        qi = pq if not q_batch else {n: v[i] for n, v in pq.items()}
        gp, gq = dense_gradients("scale_tril", {n: v[i] for n, v in pp.items()}, "scale_tril", qi)
        for n in pp:
            want_p[n][i] = gp[n]
            if q_batch:
                want_q[n][i] = gq[n]
            else:
                want_q[n] += gq[n]
    for side, got, want in (("p", got_p, want_p), ("q", got_q, want_q), ("p only", only_p, want_p)):
        for n in want:
            g = np.asarray(got[n])
            g = np.tril(g) if n == "scale_tril" else g
            # the dense reference inverts K × K covariances: its own error grows with K
            assert_close(g, want[n], rtol=1e-9 * k, atol=1e-11 * k, what=f"{side}.{n} K={k}")


@pytest.mark.parametrize("q_batch", [(), (2,)], ids=["q shared", "q per p"])
def test_full_pair_check_grads_second_order(q_batch):
    """Forward and reverse mode to second order at K = 6: through the hand-written rule (q per p)
    and through Lq⁻¹ by blocks and the dense product (q shared)."""
    k = 6
    rng = rng_for("full_pair_check_grads", len(q_batch))
    lp, lq = random_tril(rng, k, (2,)), random_tril(rng, k, q_batch)
    mp, mq = rng.normal(size=(2, k)), rng.normal(size=(*q_batch, k))

    def f(mp, lp, mq, lq):
        p = dist.MultivariateNormal(mp, scale_tril=jnp.tril(lp))
        return kl_divergence(p, dist.MultivariateNormal(mq, scale_tril=jnp.tril(lq)))

    check_grads(jax.jit(f), (mp, lp, mq, lq), order=2, modes=["rev", "fwd"])
