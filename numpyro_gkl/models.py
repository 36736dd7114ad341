"""Built-in models and data used by the benchmarks, examples and the report.

Each model is a plain NumPyro model; ``make_data`` functions return JAX arrays built from a seed
(no download), and ``linear_regression_posterior`` gives the exact conjugate posterior that SVI
results are checked against.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import Array

EIGHT_SCHOOLS_Y = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools_centered(y: Array = EIGHT_SCHOOLS_Y, sigma: Array = EIGHT_SCHOOLS_SIGMA) -> None:
    """Rubin's eight schools, centered: θⱼ ~ N(μ, τ), yⱼ ~ N(θⱼ, σⱼ)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(
    y: Array = EIGHT_SCHOOLS_Y, sigma: Array = EIGHT_SCHOOLS_SIGMA
) -> None:
    """Eight schools, non-centered: ηⱼ ~ N(0, 1), θⱼ = μ + τ ηⱼ."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", y.shape[0]):
        eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


def make_regression_data(n: int, k: int, noise: float = 0.5, seed: int = 0) -> tuple[Array, Array]:
    """Design x ~ N(0, 1) (n × k), weights w ~ N(0, 1), y = x w + noise · ε."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k))
    y = x @ rng.normal(size=k) + noise * rng.normal(size=n)
    return jnp.asarray(x), jnp.asarray(y)


def linear_regression(x: Array, y: Array | None = None, noise: float = 0.5) -> None:
    """Bayesian linear regression with a N(0, I) prior on the weights and known noise."""
    w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, noise), obs=y)


def linear_regression_posterior(
    x: Array, y: Array, noise: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior mean and covariance of ``linear_regression``: Σ = (I + XᵀX/s²)⁻¹."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    cov = np.linalg.inv(np.eye(x.shape[1]) + x.T @ x / noise**2)
    return cov @ x.T @ y / noise**2, cov


def make_classification_data(n: int, k: int, seed: int = 0) -> tuple[Array, Array]:
    """x ~ N(0, 1) (n × k), y ~ Bernoulli(sigmoid(x w)) with w ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k))
    logits = x @ rng.normal(size=k)
    y = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
    return jnp.asarray(x), jnp.asarray(y)


def logistic_regression(x: Array, y: Array | None = None) -> None:
    """Logistic regression with a N(0, I) prior on the weights."""
    w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def scale_model(y: Array = EIGHT_SCHOOLS_Y / 10.0) -> None:
    """Constrained sites: a HalfNormal noise scale, a LogNormal gain, a Gaussian vector."""
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    gain = numpyro.sample("gain", dist.LogNormal(0.0, 1.0))
    z = numpyro.sample("z", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(gain * z.sum(), s), obs=y)


def full_rank_guide(x: Array, y: Array | None = None) -> None:
    """A hand-written full-rank Gaussian guide for the weights ``w`` of a regression model."""
    k = x.shape[1]
    loc = numpyro.param("w_loc", jnp.zeros(k))
    scale_tril = numpyro.param(
        "w_scale_tril", 0.1 * jnp.eye(k), constraint=dist.constraints.scaled_unit_lower_cholesky
    )
    numpyro.sample("w", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def make_vae_data(n: int = 200, d: int = 8, latent: int = 2, seed: int = 0) -> Array:
    """n points in d dimensions from a random two-layer tanh decoder of ``latent`` Gaussians."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, latent))
    hidden = np.tanh(z @ rng.normal(size=(latent, 16)))
    return jnp.asarray(hidden @ rng.normal(size=(16, d)) / 4.0 + 0.1 * rng.normal(size=(n, d)))


def _decoder_params(latent: int, d: int, hidden: int = 16) -> tuple[Array, Array, Array]:
    # a fixed, asymmetric start (no random key needed inside the model)
    w1 = numpyro.param("dec_w1", jnp.sin(jnp.arange(latent * hidden) + 1.0).reshape(latent, hidden))
    w2 = numpyro.param("dec_w2", 0.1 * jnp.cos(jnp.arange(hidden * d) + 1.0).reshape(hidden, d))
    b = numpyro.param("dec_b", jnp.zeros(d))
    return w1, w2, b


def vae_model(x: Array, latent: int = 2) -> None:
    """VAE-style model: one latent zₙ ~ N(0, I) per data point, xₙ ~ N(tanh(zₙW₁)W₂ + b, 0.1²)."""
    w1, w2, b = _decoder_params(latent, x.shape[1])
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(jnp.zeros(latent), 1.0).to_event(1))
        numpyro.sample("x", dist.Normal(jnp.tanh(z @ w1) @ w2 + b, 0.1).to_event(1), obs=x)


def vae_guide(x: Array, latent: int = 2) -> None:
    """Amortized diagonal Gaussian encoder q(zₙ | xₙ) = N(xₙA + a, softplus(xₙB + c)²)."""
    d = x.shape[1]
    enc_a = numpyro.param("enc_a", jnp.zeros((d, latent)))
    enc_a0 = numpyro.param("enc_a0", jnp.zeros(latent))
    enc_b = numpyro.param("enc_b", jnp.zeros((d, latent)))
    enc_b0 = numpyro.param("enc_b0", jnp.zeros(latent))
    with numpyro.plate("data", x.shape[0]):
        scale = jnp.logaddexp(0.0, x @ enc_b + enc_b0)
        numpyro.sample("z", dist.Normal(x @ enc_a + enc_a0, scale).to_event(1))
