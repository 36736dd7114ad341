"""``site_marginal`` against the dense float64 covariance of the joint, selected in NumPy."""

import numpy as np
import numpyro.distributions as dist
import pytest

from numpyro_gkl.gaussian import as_gaussian
from numpyro_gkl.marginals import site_marginal


@pytest.mark.parametrize("index", [[2, 3, 4], [4, 0, 2]], ids=["contiguous", "gathered"])
@pytest.mark.parametrize("prior_form", ["diagonal", "full"])
def test_site_marginal_matches_the_selected_covariance(index, prior_form):
    rng = np.random.default_rng(0)
    loc = rng.normal(size=6)
    tril = np.tril(rng.normal(size=(6, 6)), -1) + np.diag(rng.uniform(0.5, 2.0, 6))
    joint = as_gaussian(dist.MultivariateNormal(loc, scale_tril=tril))
    if prior_form == "diagonal":
        prior = as_gaussian(dist.Normal(np.zeros(3), 1.0).to_event(1))
    else:
        prior = as_gaussian(dist.MultivariateNormal(np.zeros(3), np.eye(3)))
    index = np.asarray(index)
    marginal = site_marginal(joint, index, prior)
    cov = (tril @ tril.T)[np.ix_(index, index)]
    np.testing.assert_allclose(np.asarray(marginal.loc), loc[index], rtol=1e-12)
    if prior_form == "diagonal":
        np.testing.assert_allclose(np.asarray(marginal.scale) ** 2, np.diag(cov), rtol=1e-12)
    else:
        factor = np.asarray(marginal.scale_tril)
        np.testing.assert_allclose(factor @ factor.T, cov, rtol=1e-12)
