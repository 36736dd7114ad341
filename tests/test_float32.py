"""float32 accuracy on nearly identical pairs (KL from ~1e-7 to ~1), every structure pair.

The reference is float64 on the very same float32 inputs, computed without cancellation and
without numpyro_gkl: the products of float32 numbers are exact in float64, so

    E = Lq⁻¹ (Σp − Σq) Lq⁻ᵀ  (Σp − Σq formed from the float32 parameters in float64),
    KL = ½ (Σ (e − log1p e) + ‖Lq⁻¹ δ‖²)  over the eigenvalues e of E.

(Σq⁻¹Σp = Lq⁻ᵀ(I + E)Lqᵀ, so tr − K − log det = Σ e − log(1 + e).)
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
import scipy.linalg
from conftest import (
    STRUCTURES,
    built_kl,
    dot_precisions,
    make_dist,
    random_gaussian,
    random_params,
)
from numpyro.distributions.kl import kl_divergence

import numpyro_gkl

KINDS = ("diag", "full", "lowrank")
PAIRS = list(itertools.product(KINDS, KINDS))
KS = (1, 5, 16, 64)
EPSILONS = np.logspace(-4.2, -0.7, 8)


def _x_minus_log1p(e: np.ndarray) -> np.ndarray:
    """e − log1p(e) in float64; the series below |e| < 1e-3 avoids the last bit of cancellation."""
    series = e * e * (0.5 - e / 3.0 + e * e / 4.0 - e**3 / 5.0)
    return np.where(np.abs(e) < 1e-3, series, e - np.log1p(e))


def covariance(kind: str, params: tuple) -> np.ndarray:
    """Σ in float64 from float32 parameters (every product exact, sums to 1e-16 relative)."""
    p = [np.asarray(x, dtype=np.float64) for x in params]
    if kind == "diag":
        return np.diag(np.square(p[0]))
    if kind == "full":
        return p[0] @ p[0].T
    return np.diag(p[1]) + p[0] @ p[0].T


def stable_reference(mp, sp, mq, sq) -> float:
    """KL(N(mp, Sp) ‖ N(mq, Sq)) in float64 through the eigenvalues of Lq⁻¹(Sp − Sq)Lq⁻ᵀ."""
    lq = np.linalg.cholesky(sq)
    half = scipy.linalg.solve_triangular(lq, sp - sq, lower=True)
    e_mat = scipy.linalg.solve_triangular(lq, half.T, lower=True)
    e = np.linalg.eigvalsh(0.5 * (e_mat + e_mat.T))
    z = scipy.linalg.solve_triangular(lq, np.float64(mp) - np.float64(mq), lower=True)
    return 0.5 * (np.sum(_x_minus_log1p(e)) + z @ z)


def _side(rng, kind: str, d0, w0, l0, eps: float) -> tuple:
    """One side: the base (D0 + W0W0ᵀ = L0L0ᵀ) perturbed by a relative ``eps``, as float32."""
    k = d0.shape[0]
    if kind == "diag":
        params = (np.sqrt(d0) * np.exp(eps * rng.normal(size=k)),)
    elif kind == "lowrank":
        dw = eps * rng.normal(size=w0.shape) * np.sqrt(d0)[:, None]
        params = (w0 + dw, d0 * np.exp(eps * rng.normal(size=k)))
    else:
        z = rng.normal(size=(k, k))
        pert = eps * np.tril(z, -1) / np.sqrt(k) + np.diag(np.expm1(eps * np.diag(z)))
        params = (l0 @ (np.eye(k) + pert),)
    return tuple(np.asarray(x, dtype=np.float32) for x in params)


def _to_dist(kind: str, loc: np.ndarray, params: tuple):
    if kind == "diag":
        return dist.Normal(loc, params[0]).to_event(1)
    if kind == "full":
        return dist.MultivariateNormal(loc, scale_tril=params[0])
    return dist.LowRankMultivariateNormal(loc, *params)


def make_case(sp: str, sq: str, k: int, eps: float, seed: int):
    """Nearly identical float32 p (structure sp) and q (structure sq), both perturbations of size
    ``eps`` of one base D0 + W0W0ᵀ (rank ≤ 2). With a diagonal side W0 is O(√ε), so that
    Σp − Σq stays O(ε)."""
    rng = np.random.default_rng(seed)
    d0 = np.exp(rng.uniform(-0.5, 0.5, size=k))
    w_scale = np.sqrt(eps) if "diag" in (sp, sq) else 1.0
    w0 = w_scale * 0.5 * rng.normal(size=(k, min(2, k))) * np.sqrt(d0)[:, None]
    l0 = np.linalg.cholesky(np.diag(d0) + w0 @ w0.T)
    pp, qp = _side(rng, sp, d0, w0, l0, eps), _side(rng, sq, d0, w0, l0, eps)
    mq = rng.normal(size=k).astype(np.float32)
    mp = (mq + eps * rng.normal(size=k) * np.sqrt(d0)).astype(np.float32)
    ref = stable_reference(mp, covariance(sp, pp), mq, covariance(sq, qp))
    return ref, _to_dist(sp, mp, pp), _to_dist(sq, mq, qp)


def _errors(sp, sq):
    rows = []
    for seed, (k, eps) in enumerate(itertools.product(KS, EPSILONS)):
        ref, p, q = make_case(sp, sq, k, eps, seed)
        kl = kl_divergence(p, q)
        rows.append((k, eps, ref, float(kl), p, q))
    return rows


@pytest.mark.parametrize(("sp", "sq"), PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_float32_nearly_identical(sp, sq):
    rows = _errors(sp, sq)
    refs = np.array([r[2] for r in rows])
    kls = np.array([r[3] for r in rows])
    # the cases really span ~1e-7 .. ~1
    assert refs.min() < 3e-7
    assert refs.max() > 0.1
    rel = np.abs(kls - refs) / refs
    worst = int(np.argmax(rel))
    print(
        f"\n{sp}-{sq}: numpyro_gkl float32 rel. error median {np.median(rel):.2e}, "
        f"worst {rel.max():.2e} (K={rows[worst][0]}, KL={refs[worst]:.2e})"
    )
    _print_upstream(sp, sq, rows, refs)
    assert np.all(kls >= 0)
    assert np.median(rel) <= 1e-5
    assert rel.max() <= 1e-4


def _print_upstream(sp, sq, rows, refs):
    """For comparison only: NumPyro's own rule on the same pairs (where it has one)."""
    if (sp, sq) not in (("diag", "diag"), ("full", "full")):
        return
    numpyro_gkl.unregister()
    try:
        up = np.array([float(kl_divergence(r[4], r[5])) for r in rows])
    finally:
        numpyro_gkl.register()
    rel = np.abs(up - refs) / refs
    print(
        f"{sp}-{sq}: upstream NumPyro float32 rel. error median {np.median(rel):.2e}, "
        f"worst {rel.max():.2e}"
    )


def test_reference_is_stable():
    """The float64 reference agrees with the textbook formula where that one is accurate
    (KL ~ 1, well-conditioned), so the stable rewrite is the same quantity."""
    rng = np.random.default_rng(7)
    k = 4
    lp = np.tril(0.3 * rng.normal(size=(k, k)), -1) + np.diag(np.exp(rng.uniform(-0.5, 0.5, k)))
    lq = np.tril(0.3 * rng.normal(size=(k, k)), -1) + np.diag(np.exp(rng.uniform(-0.5, 0.5, k)))
    mp, mq = rng.normal(size=(2, k))
    sp, sq = lp @ lp.T, lq @ lq.T
    si = np.linalg.inv(sq)
    d = mp - mq
    textbook = 0.5 * (
        np.trace(si @ sp) + d @ si @ d - k + np.linalg.slogdet(sq)[1] - np.linalg.slogdet(sp)[1]
    )
    np.testing.assert_allclose(stable_reference(mp, sp, mq, sq), textbook, rtol=1e-12)


# every structure on each side, against a full and a diagonal partner
DTYPE_PAIRS = sorted(
    {(s, t) for s in STRUCTURES for t in ("scale_tril", "lowrank1")}
    | {(t, s) for s in STRUCTURES for t in ("diag", "lowrank3")}
)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(("sp", "sq"), DTYPE_PAIRS)
def test_float32_in_float32_out(sp, sq, k):
    """float32 parameters give a float32 KL even with jax_enable_x64 on (as in this session).

    NumPyro itself turns a float32 ``precision_matrix`` into a float64 ``scale_tril`` under x64,
    so the expected dtype is that of the arrays the distributions actually hold."""
    rng = np.random.default_rng(3)
    p = random_gaussian(rng, sp, k, dtype=np.float32)
    q = random_gaussian(rng, sq, k, dtype=np.float32)
    expected = jnp.result_type(*jax.tree.leaves(p.dist), *jax.tree.leaves(q.dist))
    assert jnp.result_type(*jax.tree.leaves(p.dist)) in (np.float32, np.float64)
    kl = kl_divergence(p.dist, q.dist)
    assert kl.dtype == expected
    np.testing.assert_allclose(float(kl), built_kl(p, q), rtol=2e-3)


# --------------------------------------------------------------------------------------------
# no matmul left to the backend's default precision (TF32 / bfloat16 passes on accelerators)
# --------------------------------------------------------------------------------------------


def _dot_precisions(sp: str, sq: str, k: int, q_batch: tuple[int, ...]) -> list[tuple[str, str]]:
    """The precision of every ``dot_general`` in the StableHLO of the float32 KL's gradient
    with respect to both sides' parameters, the KL jitted inside ``grad`` (so that the
    hand-written derivatives are traced after the rule has returned) and the gradient jitted."""
    rng = np.random.default_rng(k)
    pp = {n: jnp.asarray(v, jnp.float32) for n, v in random_params(rng, sp, k, (3,)).items()}
    pq = {n: jnp.asarray(v, jnp.float32) for n, v in random_params(rng, sq, k, q_batch).items()}

    def f(a, b):
        return jnp.sum(kl_divergence(make_dist(sp, a), make_dist(sq, b)))

    return dot_precisions(jax.jit(jax.grad(jax.jit(f), argnums=(0, 1))).lower(pp, pq).as_text())


# every pair of the three forms at K = 6 (covariance and precision matrices become scale_tril
# in NumPyro's constructors), full against full with the hand-written rule (K = 6, a q per p)
# and by halves and blocks (K = 72); the unrolled substitution (K ≤ 4) has no matmul
PRECISION_CASES = [
    *(
        (sp, sq, 6, ())
        for sp, sq in itertools.product(("diag", "scale_tril", "lowrank3"), repeat=2)
    ),
    ("scale_tril", "scale_tril", 6, (3,)),
    ("scale_tril", "scale_tril", 72, (3,)),
    ("scale_tril", "scale_tril", 72, ()),
]


@pytest.mark.parametrize(("sp", "sq", "k", "q_batch"), PRECISION_CASES)
def test_every_matmul_asks_for_the_highest_precision(sp, sq, k, q_batch):
    precisions = _dot_precisions(sp, sq, k, q_batch)
    assert precisions, "no matmul found: the pattern no longer matches the StableHLO text"
    assert all(p == ("HIGHEST", "HIGHEST") for p in precisions), sorted(set(precisions))
