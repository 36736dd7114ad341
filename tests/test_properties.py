"""Hypothesis properties of the closed-form KL, for every structure."""

from __future__ import annotations

import numpy as np
import numpyro.distributions as dist
import pytest
import scipy.linalg
from conftest import (
    FULL,
    LOWRANK,
    STRUCTURES,
    assert_close,
    build,
    built_kl,
    dense_cov,
    make_dist,
    random_params,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from numpyro.distributions.kl import kl_divergence

# A few event sizes only: every new shape costs JAX compilations of its own (eager op-by-op),
# so the properties draw from the shapes the rest of the suite uses.
seeds = st.integers(0, 2**32 - 1)
dims = st.sampled_from([1, 3, 7])
structures = st.sampled_from(STRUCTURES)
dtypes = st.sampled_from([np.float32, np.float64])


def _kl(p, q) -> np.ndarray:
    return np.asarray(kl_divergence(p, q))


# --------------------------------------------------------------------------------------------
# KL >= 0
# --------------------------------------------------------------------------------------------


@settings(max_examples=30)
@given(sp=structures, sq=structures, k=dims, seed=seeds)
def test_nonnegative_random_pairs(sp, sq, k, seed):
    """float64 (float32 non-negativity near p = q is checked below, where it is hardest)."""
    rng = np.random.default_rng(seed)
    p = build(sp, random_params(rng, sp, k))
    q = build(sq, random_params(rng, sq, k))
    kl = _kl(p.dist, q.dist)
    assert kl >= 0, kl
    assert_close(kl, built_kl(p, q), rtol=1e-9)


def _same_gaussian_forms(rng, k: int, kind: str) -> list[tuple[str, dict]]:
    """One Gaussian written in several structures (all forms have the same mean and covariance)."""
    loc = rng.normal(size=k)
    if kind == "diag":
        scale = np.exp(rng.uniform(-0.5, 0.5, size=k))
        cov = np.diag(scale**2)
        forms = [("diag", {"loc": loc, "scale": scale})]
        forms.append(
            ("lowrank1", {"loc": loc, "cov_factor": np.zeros((k, 1)), "cov_diag": scale**2})
        )
    else:
        w = 0.5 * rng.normal(size=(k, 2))
        d = np.exp(rng.uniform(-0.5, 0.5, size=k))
        cov = w @ w.T + np.diag(d)
        forms = [("lowrank3", {"loc": loc, "cov_factor": w, "cov_diag": d})]
    forms += [
        ("scale_tril", {"loc": loc, "scale_tril": np.linalg.cholesky(cov)}),
        ("covariance_matrix", {"loc": loc, "covariance_matrix": cov}),
        ("precision_matrix", {"loc": loc, "precision_matrix": np.linalg.inv(cov)}),
    ]
    return forms


def _same_gaussian_kls(k, seed, dtype, kind, pairs):
    forms = dict(_same_gaussian_forms(np.random.default_rng(seed), k, kind))
    out = {}
    for sp, sq in pairs:
        if sp in forms and sq in forms:
            p, q = build(sp, forms[sp], dtype).dist, build(sq, forms[sq], dtype).dist
            out[sp, sq] = float(kl_divergence(p, q))
    return out


_FORMS = ("diag", "lowrank1", "lowrank3", *FULL)
_FORM_PAIRS = [(a, b) for a in _FORMS for b in _FORMS]


@settings(max_examples=12)
@given(
    k=st.sampled_from([1, 3]), seed=seeds, dtype=dtypes, kind=st.sampled_from(["diag", "lowrank"])
)
def test_nonnegative_same_gaussian_in_other_structures(k, seed, dtype, kind):
    """KL between one Gaussian written two ways is rounding-sized, and still >= 0."""
    tol = k * (1e-12 if dtype == np.float64 else 1e-5)
    for pair, kl in _same_gaussian_kls(k, seed, dtype, kind, _FORM_PAIRS).items():
        assert 0.0 <= kl <= tol, (pair, kl)


# --------------------------------------------------------------------------------------------
# KL(p‖p) == 0 exactly
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("structure", STRUCTURES)
@settings(max_examples=8)
@given(k=st.sampled_from([1, 3]), seed=seeds)
def test_self_kl_is_exactly_zero(structure, dtype, k, seed):
    params = random_params(np.random.default_rng(seed), structure, k)
    p = build(structure, params, dtype).dist
    assert np.all(_kl(p, p) == 0.0)
    # a second, separately constructed copy
    assert np.all(_kl(p, build(structure, params, dtype).dist) == 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@given(seed=seeds)
def test_self_kl_is_exactly_zero_scalar_and_wrapped(dtype, seed):
    rng = np.random.default_rng(seed)
    loc = rng.normal(size=(3, 2)).astype(dtype)
    scale = np.exp(rng.uniform(-1, 1, size=(3, 2))).astype(dtype)
    for d in (
        dist.Normal(loc, scale),
        dist.Normal(loc, scale).to_event(2),
        dist.Normal(loc, scale).to_event(1).expand([4, 3]),
        dist.Normal(loc, scale).mask(np.array([True, False])).to_event(1),
    ):
        assert np.all(_kl(d, d) == 0.0), d


# --------------------------------------------------------------------------------------------
# invariance under a shared affine map x -> A x + b
# --------------------------------------------------------------------------------------------


def _random_map(rng, k: int, kind: str) -> np.ndarray:
    if kind == "diagonal":
        signs = rng.choice([-1.0, 1.0], size=k)
        return np.diag(signs * np.exp(rng.uniform(-1, 1, size=k)))
    if kind == "lower":
        return np.tril(0.5 * rng.normal(size=(k, k)), -1) + np.diag(
            np.exp(rng.uniform(-1, 1, size=k))
        )
    q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    return q @ np.diag(np.exp(rng.uniform(-1, 1, size=k))) + 0.2 * rng.normal(size=(k, k))


def transform(structure: str, params: dict, a: np.ndarray, b: np.ndarray) -> dict:
    """Parameters of the image of N(params) under x -> A x + b, in the same structure."""
    out = {"loc": params["loc"] @ a.T + b}
    is_diagonal = np.array_equal(a, np.diag(np.diag(a)))
    if structure == "diag":
        assert is_diagonal
        out["scale"] = np.abs(np.diag(a)) * params["scale"]
    elif structure == "scale_tril":
        lower_pos = np.array_equal(a, np.tril(a)) and np.all(np.diag(a) > 0)
        if lower_pos:  # A L is again lower triangular with a positive diagonal
            out["scale_tril"] = a @ params["scale_tril"]
        else:
            cov = a @ params["scale_tril"] @ params["scale_tril"].T @ a.T
            out["scale_tril"] = np.linalg.cholesky(0.5 * (cov + cov.T))
    elif structure == "covariance_matrix":
        cov = a @ params["covariance_matrix"] @ a.T
        out["covariance_matrix"] = 0.5 * (cov + cov.T)
    elif structure == "precision_matrix":
        a_inv = np.linalg.inv(a)
        prec = a_inv.T @ params["precision_matrix"] @ a_inv
        out["precision_matrix"] = 0.5 * (prec + prec.T)
    else:
        assert is_diagonal
        out["cov_factor"] = np.diag(a)[:, None] * params["cov_factor"]
        out["cov_diag"] = np.diag(a) ** 2 * params["cov_diag"]
    return out


@given(sp=structures, sq=structures, k=dims, seed=seeds, data=st.data())
def test_affine_invariance(sp, sq, k, seed, data):
    if sp in FULL and sq in FULL:
        kind = data.draw(st.sampled_from(["diagonal", "lower", "general"]), label="map")
    else:
        kind = "diagonal"  # A W and A D Aᵀ keep the diag / low-rank structure only then
    rng = np.random.default_rng(seed)
    pp = random_params(rng, sp, k)
    pq = random_params(rng, sq, k)
    a = _random_map(rng, k, kind)
    b = rng.normal(size=k)
    before = _kl(make_dist(sp, pp), make_dist(sq, pq))
    after = _kl(make_dist(sp, transform(sp, pp, a, b)), make_dist(sq, transform(sq, pq, a, b)))
    assert_close(after, before, rtol=1e-8, atol=1e-12)


def test_affine_transform_helper_is_right():
    """The test helper maps the dense moments as x -> A x + b should (checked in NumPy only)."""
    rng = np.random.default_rng(0)
    for s in STRUCTURES:
        for kind in ("diagonal", "lower", "general"):
            if kind != "diagonal" and s not in FULL:
                continue
            params = random_params(rng, s, 4)
            a, b = _random_map(rng, 4, kind), rng.normal(size=4)
            t = transform(s, params, a, b)
            np.testing.assert_allclose(t["loc"], a @ params["loc"] + b, rtol=1e-12)
            cov = dense_cov(s, params)
            np.testing.assert_allclose(dense_cov(s, t), a @ cov @ a.T, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# additivity over independent blocks
# --------------------------------------------------------------------------------------------


def block_join(structure: str, first: dict, second: dict) -> dict:
    """Parameters of the joint of two independent Gaussians of the same structure."""
    out = {"loc": np.concatenate([first["loc"], second["loc"]])}
    if structure == "diag":
        out["scale"] = np.concatenate([first["scale"], second["scale"]])
    elif structure in FULL:
        out[structure] = scipy.linalg.block_diag(first[structure], second[structure])
    else:
        out["cov_factor"] = scipy.linalg.block_diag(first["cov_factor"], second["cov_factor"])
        out["cov_diag"] = np.concatenate([first["cov_diag"], second["cov_diag"]])
    return out


@given(sp=structures, sq=structures, k1=st.sampled_from([1, 2]), seed=seeds)
def test_additivity_over_independent_blocks(sp, sq, k1, seed):
    k2 = 3 - k1  # blocks of 1 + 2 dimensions: the joint has the suite's usual K = 3
    rng = np.random.default_rng(seed)
    p1, p2 = random_params(rng, sp, k1), random_params(rng, sp, k2)
    q1, q2 = random_params(rng, sq, k1), random_params(rng, sq, k2)
    joint = _kl(make_dist(sp, block_join(sp, p1, p2)), make_dist(sq, block_join(sq, q1, q2)))
    parts = _kl(make_dist(sp, p1), make_dist(sq, q1)) + _kl(make_dist(sp, p2), make_dist(sq, q2))
    assert_close(joint, parts, rtol=1e-9, atol=1e-12)


def test_block_join_helper_is_block_diagonal():
    rng = np.random.default_rng(1)
    for s in STRUCTURES:
        a, b = random_params(rng, s, 2), random_params(rng, s, 3)
        joint = dense_cov(s, block_join(s, a, b))
        np.testing.assert_allclose(
            joint, scipy.linalg.block_diag(dense_cov(s, a), dense_cov(s, b)), atol=1e-12
        )
        if s in LOWRANK:
            assert block_join(s, a, b)["cov_factor"].shape[-1] == 2 * a["cov_factor"].shape[-1]
