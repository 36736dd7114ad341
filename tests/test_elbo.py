"""Stock ``TraceMeanField_ELBO`` picks the closed form up through ``kl_divergence``.

Latent-only model (one sample site, no data): the loss is exactly KL(guide ‖ prior), with no
Monte Carlo noise, so it equals the dense reference and does not depend on the random key.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from conftest import (
    STRUCTURES,
    assert_close,
    build,
    dense_entropy,
    dense_kl,
    make_dist,
    random_params,
    rng_for,
)
from numpyro.infer import TraceMeanField_ELBO

K = 3
KEYS = [jax.random.PRNGKey(i) for i in (0, 1, 12345)]


def _guide_for(structure: str, params: dict):
    def guide():
        values = {name: numpyro.param(f"q_{name}", jnp.asarray(v)) for name, v in params.items()}
        numpyro.sample("z", make_dist(structure, values))

    return guide


def _model_for(prior):
    def model():
        numpyro.sample("z", prior)

    return model


def _losses(model, guide):
    elbo = TraceMeanField_ELBO()
    return [float(elbo.loss(key, {}, model, guide)) for key in KEYS]


@pytest.mark.parametrize(("s_guide", "s_prior"), list(itertools.product(STRUCTURES, STRUCTURES)))
def test_mean_field_elbo_is_closed_form_kl(s_guide, s_prior):
    rng = rng_for("elbo", s_guide, s_prior)
    guide_params = random_params(rng, s_guide, K)
    prior = build(s_prior, random_params(rng, s_prior, K))
    g = build(s_guide, guide_params)
    losses = _losses(_model_for(prior.dist), _guide_for(s_guide, guide_params))
    assert losses[0] == losses[1] == losses[2], losses  # no sampling involved
    assert_close(losses[0], dense_kl(g.loc, g.cov, prior.loc, prior.cov), rtol=1e-9)


@pytest.mark.parametrize("s_guide", STRUCTURES)
def test_standard_normal_prior_written_with_expand(s_guide):
    """The usual ``dist.Normal(0, 1).expand([K]).to_event(1)`` prior."""
    rng = rng_for("elbo-expand", s_guide)
    guide_params = random_params(rng, s_guide, K)
    g = build(s_guide, guide_params)
    prior = dist.Normal(0.0, 1.0).expand([K]).to_event(1)
    losses = _losses(_model_for(prior), _guide_for(s_guide, guide_params))
    assert losses[0] == losses[1] == losses[2], losses
    # ½ (μᵀμ + tr Σ − K − log|Σ|)
    expected = 0.5 * (g.loc @ g.loc + np.trace(g.cov) - K - np.linalg.slogdet(g.cov)[1])
    assert_close(losses[0], expected, rtol=1e-9)


MASK = np.array([True, False, True])


def _masked_prior_loss_reference(g, prior_loc, prior_scale):
    """E_q[log q] − Σ_{i: m_i} E_q[log p_i(z_i)] = −H(q) + Σ_{i: m_i} CE_i (dense NumPy)."""
    var_q = np.diag(g.cov)
    ce = (
        0.5 * np.log(2 * np.pi * prior_scale**2)
        + 0.5 * ((g.loc - prior_loc) ** 2 + var_q) / prior_scale**2
    )
    return -dense_entropy(g.cov) + np.sum(np.where(MASK, ce, 0.0))


@pytest.mark.parametrize("form", ["expanded", "vector"])
@pytest.mark.parametrize("s_guide", STRUCTURES)
def test_masked_prior_site(s_guide, form):
    """A model site masked inside Independent: ``dist.Normal(...).expand([K]).mask(m).to_event(1)``
    (TraceMeanField_ELBO passes the masked distribution to kl_divergence)."""
    rng = rng_for("elbo-mask", s_guide, form)
    guide_params = random_params(rng, s_guide, K)
    g = build(s_guide, guide_params)
    loc, scale = 0.4, 1.3
    if form == "expanded":
        prior = dist.Normal(loc, scale).expand([K]).mask(MASK).to_event(1)
    else:
        prior = dist.Normal(np.full(K, loc), np.full(K, scale)).mask(MASK).to_event(1)
    losses = _losses(_model_for(prior), _guide_for(s_guide, guide_params))
    assert losses[0] == losses[1] == losses[2], losses
    expected = _masked_prior_loss_reference(g, loc, scale)
    assert_close(losses[0], expected, rtol=1e-9)
