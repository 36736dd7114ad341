"""A small variational autoencoder on scikit-learn's bundled 8 × 8 digits, in plain JAX.

Model, for each image xᵢ ∈ [0, 1]⁶⁴ (pixels divided by 16):

    zᵢ ~ N(0, I_K),    xᵢ | zᵢ ~ N(f(zᵢ), σ² I_64),    σ = ``NOISE`` = 0.1,

with the decoder f(z) = sigmoid(W₂ tanh(W₁ z + b₁) + b₂) (K → hidden → 64). A Gaussian likelihood
with a fixed σ = 0.1 is used rather than a (Continuous) Bernoulli: the pixels are grey levels, not
binary, the fixed scale cannot collapse to make the loss unbounded, and it weights reconstruction
strongly enough against the KL term that the latent space is used (no posterior collapse).

Guide (amortized): an encoder MLP g(x) = V₂ tanh(V₁ x + c₁) + c₂ (64 → hidden → K (2 + rank))
gives, per image, q(zᵢ | xᵢ) = N(μᵢ, Uᵢ Uᵢᵀ + diag(dᵢ)), a ``LowRankMultivariateNormal`` with
loc μᵢ (K), cov_factor Uᵢ (K × rank) and cov_diag dᵢ = softplus(·) + 10⁻⁴ (K).

Negative ELBO (the SVI loss, summed over the n images):

    Σᵢ E_q[−log p(xᵢ | zᵢ)] + KL(q(zᵢ | xᵢ) ‖ N(0, I_K)).

The KL term is the ``LowRankMultivariateNormal``–``Independent(Normal)`` pair, which
``numpyro_gkl.TraceAnalytic_ELBO`` (default ``kl="analytic"``) computes in closed form; the
expected log-likelihood is estimated by draws. Costs per SVI step and particle: the encoder
and decoder passes, O(n · hidden · (64 + K · rank)), plus the closed-form KL, O(n · K · rank²).

All parameters are ``numpyro.param`` sites initialized deterministically (no random key) from
scaled sine patterns of Glorot size, so gradients are non-zero at the start.

Example::

    import jax
    import numpyro
    from numpyro.infer import SVI
    from numpyro_gkl import TraceAnalytic_ELBO
    from numpyro_gkl.vae import guide, load_data, model, reconstruction_error

    x = load_data()
    svi = SVI(model, guide, numpyro.optim.Adam(1e-2), TraceAnalytic_ELBO(num_particles=4))
    result = svi.run(jax.random.PRNGKey(0), 2000, x, progress_bar=False)
    print(reconstruction_error(result.params, x))
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

NOISE = 0.1
"""Observation noise σ of the Gaussian likelihood, on pixels scaled to [0, 1]."""

PIXELS = 64
"""Pixels per image (8 × 8)."""


def load_data(quick: bool = False) -> jax.Array:
    """The digits images as a float32 array of shape (1797, 64), pixels in [0, 1].

    Uses ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download). With
    ``quick=True`` only the first 300 images, shape (300, 64).
    """
    from sklearn.datasets import load_digits

    x = load_digits().data / 16.0
    if quick:
        x = x[:300]
    return jnp.asarray(x, dtype=jnp.float32)


def _init(shape: tuple[int, ...], phase: float) -> jax.Array:
    """Deterministic weights: a sine pattern with Glorot variance 2 / (fan_in + fan_out)."""
    size = math.prod(shape)
    pattern = jnp.sin(phase + 2.399963 * jnp.arange(size, dtype=jnp.float32))  # variance ½
    return (math.sqrt(4.0 / sum(shape)) * pattern).reshape(shape)


def _mlp(prefix: str, x: jax.Array, sizes: tuple[int, int, int], phase: float) -> jax.Array:
    """Two-layer tanh MLP ``sizes[0] → sizes[1] → sizes[2]`` with ``numpyro.param`` weights."""
    d_in, d_hidden, d_out = sizes
    w1 = numpyro.param(f"{prefix}_w1", _init((d_in, d_hidden), phase))
    b1 = numpyro.param(f"{prefix}_b1", jnp.zeros(d_hidden))
    w2 = numpyro.param(f"{prefix}_w2", _init((d_hidden, d_out), phase + 1.0))
    b2 = numpyro.param(f"{prefix}_b2", jnp.zeros(d_out))
    return jnp.tanh(x @ w1 + b1) @ w2 + b2


def _decode(z: jax.Array, latent: int, hidden: int) -> jax.Array:
    """Decoder mean f(z) ∈ (0, 1)⁶⁴ for latents z of shape (..., latent)."""
    return jax.nn.sigmoid(_mlp("decoder", z, (latent, hidden, PIXELS), phase=0.5))


def _encode(
    x: jax.Array, latent: int, hidden: int, rank: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encoder: loc (n, latent), cov_factor (n, latent, rank), cov_diag (n, latent)."""
    out = _mlp("encoder", x, (PIXELS, hidden, latent * (2 + rank)), phase=1.5)
    n = x.shape[0]
    loc = out[:, :latent]
    cov_factor = out[:, latent : latent * (1 + rank)].reshape(n, latent, rank)
    cov_diag = jax.nn.softplus(out[:, latent * (1 + rank) :]) + 1e-4
    return loc, cov_factor, cov_diag


def model(x: jax.Array, latent: int = 4, hidden: int = 64) -> None:
    """zᵢ ~ N(0, I_latent), xᵢ ~ N(f(zᵢ), ``NOISE``² I_64) for the n images x of shape (n, 64)."""
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(jnp.zeros(latent), 1.0).to_event(1))
        numpyro.sample("x", dist.Normal(_decode(z, latent, hidden), NOISE).to_event(1), obs=x)


def guide(x: jax.Array, latent: int = 4, hidden: int = 64, rank: int = 2) -> None:
    """q(zᵢ | xᵢ) = LowRankMultivariateNormal(μᵢ, Uᵢ, dᵢ) from the encoder; x has shape (n, 64)."""
    loc, cov_factor, cov_diag = _encode(x, latent, hidden, rank)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag))


def reconstruction_error(
    params: dict[str, jax.Array], x: jax.Array, latent: int = 4, hidden: int = 64
) -> float:
    """Mean squared error, over images and pixels, of f(μ(x)) against x (decoded encoder mean).

    ``params`` are the fitted parameters, e.g. ``SVI.run(...).params``; the encoder's rank is read
    from their shapes.
    """
    rank = params["encoder_w2"].shape[1] // latent - 2
    with numpyro.handlers.substitute(data=params):
        loc, _, _ = _encode(x, latent, hidden, rank)
        recon = _decode(loc, latent, hidden)
    return float(jnp.mean((recon - x) ** 2))
