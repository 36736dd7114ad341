"""``cross_entropy`` against H(p) + KL(p‖q) from dense float64 NumPy covariances."""

import numpy as np
import numpyro.distributions as dist
import pytest

from numpyro_gkl.gaussian import Diagonal, as_gaussian, entropy
from numpyro_gkl.kl import cross_entropy


def dense_cross_entropy(mp, sp, mq, sq):
    """E_p[−log q] = ½ (k log 2π + log|Σq| + tr(Σq⁻¹Σp) + δᵀΣq⁻¹δ), written out."""
    k = len(mp)
    delta = mp - mq
    solve = np.linalg.solve(sq, np.column_stack([sp, delta]))
    return 0.5 * (
        k * np.log(2 * np.pi)
        + np.linalg.slogdet(sq)[1]
        + np.trace(solve[:, :k])
        + delta @ solve[:, k]
    )


@pytest.mark.parametrize("form", ["diagonal", "full"])
def test_cross_entropy_matches_dense(form):
    rng = np.random.default_rng(4)
    mp, mq = rng.normal(size=(2, 3, 5))
    sp, sq = rng.uniform(0.3, 2.0, size=(2, 3, 5))
    if form == "diagonal":
        p = dist.Normal(mp, sp).to_event(1)
        q = dist.Normal(mq, sq).to_event(1)
        cov_p = [np.diag(s**2) for s in sp]
    else:
        tril = np.tril(rng.normal(size=(3, 5, 5)), -1) * 0.3 + np.eye(5) * sp[..., None]
        p = dist.MultivariateNormal(mp, scale_tril=tril)
        q = dist.Normal(mq, sq).to_event(1)
        cov_p = [t @ t.T for t in tril]
    got = np.asarray(cross_entropy(as_gaussian(p), as_gaussian(q)))
    expected = [dense_cross_entropy(mp[i], cov_p[i], mq[i], np.diag(sq[i] ** 2)) for i in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_cross_entropy_is_nan_where_a_scale_is_not_positive():
    scale = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    p = Diagonal(np.zeros((2, 3)), (2,), (3,), None, scale)  # NumPyro would refuse scale 0
    q = as_gaussian(dist.Normal(np.zeros(3), 1.0).to_event(1))
    out = np.asarray(cross_entropy(p, q))
    assert np.isfinite(out[0]) and np.isnan(out[1])


FULL_COV = np.array([[0.5, 0.1], [0.1, 0.4]])


@pytest.mark.parametrize(
    ("d", "cov"),
    [
        (dist.Normal(0.3, 0.8).expand([6]), np.array([[0.64]])),
        (dist.MultivariateNormal(np.zeros(2), FULL_COV).expand([6]), FULL_COV),
    ],
    ids=["scalar normal", "full"],
)
def test_entropy_has_the_batch_shape_when_parameters_are_broadcast(d, cov):
    """One entropy per batch element, as NumPyro's ``entropy()`` gives, when the parameters are
    smaller than the batch (a plate broadcasting them): ½ log|2πeΣ| each, dense."""
    got = np.asarray(entropy(as_gaussian(d)))
    assert got.shape == (6,)
    np.testing.assert_allclose(got, 0.5 * np.linalg.slogdet(2 * np.pi * np.e * cov)[1], rtol=1e-12)
