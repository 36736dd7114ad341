"""``site_marginal`` against the dense float64 covariance of the joint, selected in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import dot_precisions

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


def test_full_marginal_matmul_asks_for_the_highest_precision():
    """L[idx] L[idx]ᵀ, the block the closed form sees, keeps float32's full mantissa on an
    accelerator too (JAX's default would allow TF32)."""
    prior = as_gaussian(dist.MultivariateNormal(jnp.zeros(3), jnp.eye(3)))

    def block(loc, tril):
        joint = as_gaussian(dist.MultivariateNormal(loc, scale_tril=tril))
        return site_marginal(joint, np.asarray([2, 3, 4]), prior).scale_tril

    text = jax.jit(block).lower(jnp.zeros(6, jnp.float32), jnp.eye(6, dtype=jnp.float32))
    precisions = dot_precisions(text.as_text())
    assert precisions, "no matmul found: the pattern no longer matches the StableHLO text"
    assert all(p == ("HIGHEST", "HIGHEST") for p in precisions), sorted(set(precisions))
