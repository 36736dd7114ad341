"""Unsupported pairs raise NotImplementedError, shape mismatches raise ValueError, and the
non-Gaussian rules NumPyro already had keep working."""

from __future__ import annotations

import itertools

import numpy as np
import numpyro.distributions as dist
import pytest
import scipy.special as sc
from conftest import STRUCTURES, assert_close, random_gaussian, rng_for
from numpyro.distributions.kl import kl_divergence

import numpyro_gkl

K = 3


class MyNormal(dist.Normal):
    pass


class MyMVN(dist.MultivariateNormal):
    pass


class MyLowRank(dist.LowRankMultivariateNormal):
    pass


def _mvn(k=K):
    return dist.MultivariateNormal(np.zeros(k), np.eye(k))


def _lowrank(k=K):
    return dist.LowRankMultivariateNormal(np.zeros(k), np.ones((k, 1)), np.ones(k))


def _diag(k=K):
    return dist.Normal(np.zeros(k), np.ones(k)).to_event(1)


def _beta_ind(k=K):
    return dist.Beta(np.full(k, 2.0), np.full(k, 3.0)).to_event(1)


def _matrix_normal():
    return dist.Normal(np.zeros((2, 3)), np.ones((2, 3))).to_event(2)


UNSUPPORTED = {
    "Independent(Beta)-MVN": (_beta_ind, _mvn),
    "Independent(Beta)-LowRank": (_beta_ind, _lowrank),
    "Independent(Beta)-Independent(Normal)": (_beta_ind, _diag),
    "Independent(Normal,2)-MVN(6)": (_matrix_normal, lambda: _mvn(6)),
    "Independent(Normal,2)-LowRank(6)": (_matrix_normal, lambda: _lowrank(6)),
    "Independent(MyNormal)-MVN": (lambda: MyNormal(np.zeros(K), 1.0).to_event(1), _mvn),
    "MyMVN-LowRank": (lambda: MyMVN(np.zeros(K), np.eye(K)), _lowrank),
    "MyLowRank-Independent(Normal)": (
        lambda: MyLowRank(np.zeros(K), np.ones((K, 1)), np.ones(K)),
        _diag,
    ),
    "Masked(Independent(Beta))-MVN": (lambda: _beta_ind().mask(False), _mvn),
    "Expanded(Independent(Beta))-MVN": (lambda: _beta_ind().expand([2]), _mvn),
}


@pytest.mark.parametrize("order", ["pq", "qp"])
@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_pairs_raise_not_implemented(name, order):
    a, b = (f() for f in UNSUPPORTED[name])
    p, q = (a, b) if order == "pq" else (b, a)
    with pytest.raises(NotImplementedError):
        kl_divergence(p, q)


@pytest.mark.parametrize(
    "pair",
    [
        (lambda: MyMVN(np.zeros(K), np.eye(K)), _mvn),
        (_mvn, lambda: MyMVN(np.zeros(K), np.eye(K))),
        (lambda: MyNormal(0.0, 1.0), lambda: dist.Normal(0.0, 2.0)),
        (lambda: MyLowRank(np.zeros(K), np.ones((K, 1)), np.ones(K)), _lowrank),
        (lambda: MyNormal(np.zeros(K), 1.0).to_event(1), _diag),
    ],
    ids=["MyMVN-MVN", "MVN-MyMVN", "MyNormal-Normal", "MyLowRank-LowRank", "Ind(MyNormal)-Ind"],
)
def test_subclass_keeps_numpyros_own_behaviour(pair):
    """A subclass may change the density, so it is not recognized as a Gaussian: the pair gets
    exactly what NumPyro alone gives (its rule for the base-class signature, or
    NotImplementedError where it has none)."""
    p, q = (f() for f in pair)
    numpyro_gkl.unregister()
    try:
        expected = kl_divergence(p, q)
    except NotImplementedError:
        expected = None
    finally:
        numpyro_gkl.register()
    if expected is None:
        with pytest.raises(NotImplementedError):
            kl_divergence(p, q)
    else:
        np.testing.assert_array_equal(np.asarray(kl_divergence(p, q)), np.asarray(expected))


# --------------------------------------------------------------------------------------------
# ValueError: event shapes, batch shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sp", "sq"), list(itertools.product(STRUCTURES, STRUCTURES)))
def test_different_event_shapes_raise_value_error(sp, sq):
    rng = rng_for("event", sp, sq)
    p = random_gaussian(rng, sp, 3).dist
    q = random_gaussian(rng, sq, 7).dist
    for a, b, ka, kb in ((p, q, 3, 7), (q, p, 7, 3)):
        with pytest.raises(ValueError) as info:
            kl_divergence(a, b)
        msg = str(info.value)
        assert type(a).__name__ in msg and type(b).__name__ in msg, msg
        assert str((ka,)) in msg and str((kb,)) in msg, msg


@pytest.mark.parametrize(
    ("p", "q", "shapes"),
    [
        (_matrix_normal(), _diag(6), ((2, 3), (6,))),
        (_diag(), _matrix_normal(), ((3,), (2, 3))),
        (dist.Normal(0.0, 1.0), _diag(), ((), (3,))),
        (_mvn().expand([2]), _diag(4).mask(False), ((3,), (4,))),
    ],
    ids=["matrix-vector", "vector-matrix", "scalar-vector", "wrapped"],
)
def test_different_event_shapes_diagonal_and_wrapped(p, q, shapes):
    with pytest.raises(ValueError) as info:
        kl_divergence(p, q)
    msg = str(info.value)
    assert type(p).__name__ in msg and type(q).__name__ in msg, msg
    assert str(shapes[0]) in msg and str(shapes[1]) in msg, msg


@pytest.mark.parametrize(("sp", "sq"), list(itertools.product(STRUCTURES, STRUCTURES)))
def test_non_broadcastable_batch_shapes_raise_value_error(sp, sq):
    rng = rng_for("batch", sp, sq)
    p = random_gaussian(rng, sp, K, (5,)).dist
    q = random_gaussian(rng, sq, K, (4,)).dist
    with pytest.raises(ValueError):
        kl_divergence(p, q)
    with pytest.raises(ValueError):
        kl_divergence(p.expand([2, 5]), q.expand([2, 4]))


# --------------------------------------------------------------------------------------------
# NumPyro's own non-Gaussian rules still apply
# --------------------------------------------------------------------------------------------


def beta_kl(a1, b1, a2, b2):
    return (
        sc.betaln(a2, b2)
        - sc.betaln(a1, b1)
        + (a1 - a2) * sc.digamma(a1)
        + (b1 - b2) * sc.digamma(b1)
        + (a2 - a1 + b2 - b1) * sc.digamma(a1 + b1)
    )


def gamma_kl(a1, r1, a2, r2):
    """KL(Gamma(a1, rate r1) ‖ Gamma(a2, rate r2))."""
    return (
        (a1 - a2) * sc.digamma(a1)
        - sc.gammaln(a1)
        + sc.gammaln(a2)
        + a2 * (np.log(r1) - np.log(r2))
        + a1 * (r2 - r1) / r1
    )


def _beta_params(seed, shape):
    rng = np.random.default_rng(seed)
    return np.exp(rng.uniform(-1, 1.5, size=(4, *shape)))


def test_independent_beta_pair_uses_numpyro_rule():
    a1, b1, a2, b2 = _beta_params(0, (2, 5))
    p = dist.Beta(a1, b1).to_event(1)
    q = dist.Beta(a2, b2).to_event(1)
    assert_close(kl_divergence(p, q), beta_kl(a1, b1, a2, b2).sum(-1), rtol=1e-10)


def test_masked_beta_pair_uses_numpyro_rule():
    a1, b1, a2, b2 = _beta_params(1, (4,))
    mask = np.array([True, False, True, True])
    p = dist.Beta(a1, b1).mask(mask)
    q = dist.Beta(a2, b2).mask(mask)
    assert_close(kl_divergence(p, q), np.where(mask, beta_kl(a1, b1, a2, b2), 0.0), rtol=1e-10)


def test_expanded_beta_pair_uses_numpyro_rule():
    a1, b1, a2, b2 = _beta_params(2, ())
    p = dist.Beta(a1, b1).expand([3])
    q = dist.Beta(a2, b2).expand([2, 3])
    assert_close(kl_divergence(p, q), np.full((2, 3), beta_kl(a1, b1, a2, b2)), rtol=1e-10)


def test_expanded_gamma_vs_gamma_uses_numpyro_rule():
    rng = np.random.default_rng(3)
    a1, r1 = np.exp(rng.uniform(-1, 1, size=2))
    a2, r2 = np.exp(rng.uniform(-1, 1, size=(2, 4)))
    kl = kl_divergence(dist.Gamma(a1, r1).expand([4]), dist.Gamma(a2, r2))
    assert_close(kl, gamma_kl(a1, r1, a2, r2), rtol=1e-10)
    kl = kl_divergence(dist.Gamma(a2, r2), dist.Gamma(a1, r1).expand([4]))
    assert_close(kl, gamma_kl(a2, r2, a1, r1), rtol=1e-10)


def test_reference_formulas_against_quadrature():
    """The Beta and Gamma reference formulas themselves, against numerical integration."""
    from scipy import integrate, stats

    def kl_by_quadrature(p, q, upper):
        return integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), 0, upper)[0]

    got = kl_by_quadrature(stats.beta(2.0, 3.0), stats.beta(1.5, 0.7), 1)
    np.testing.assert_allclose(got, beta_kl(2.0, 3.0, 1.5, 0.7), rtol=1e-7)
    p, q = stats.gamma(2.0, scale=1 / 1.5), stats.gamma(0.8, scale=1 / 0.5)
    np.testing.assert_allclose(
        kl_by_quadrature(p, q, np.inf), gamma_kl(2.0, 1.5, 0.8, 0.5), rtol=1e-7
    )
