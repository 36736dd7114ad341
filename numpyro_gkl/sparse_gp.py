"""Sparse variational Gaussian-process regression on scikit-learn's diabetes data.

The model is the inducing-point ("subset of regressors" / DTC) form of GP regression, written as
a plain NumPyro model. With M inducing inputs z and an RBF kernel k,

    u ~ N(0, Kuu + εI),    f = Kxu Kuu⁻¹ u,    yᵢ ~ N(fᵢ, σ²),

and the guide is a full-covariance Gaussian q(u) = N(m, S), S = L Lᵀ. The ELBO's KL(q(u)‖p(u)) is
then a MultivariateNormal–MultivariateNormal pair, which ``numpyro_gkl.TraceAnalytic_ELBO`` (and
NumPyro's ``TraceMeanField_ELBO``) compute in closed form; the likelihood term is sampled.

Each model evaluation costs O(n M d) for Kxu, O(M³) for the Cholesky factor of Kuu and O(n M²)
for the solve, with n data points in d dimensions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.linalg import cho_solve

JITTER = 1e-4
"""Added to the diagonal of Kuu, relative to the signal variance, to keep its Cholesky stable."""


def load_data(quick: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Diabetes regression data (bundled with scikit-learn, no download) and inducing inputs.

    Returns ``(x, y, z)`` as float32 arrays: x (n × 10) standardized per column, y (n,)
    standardized, and z (M × 10) the rows of x at M evenly spaced ranks along its first principal
    component (deterministic). Full: n = 442, M = 20. ``quick``: the first 150 rows, M = 10.
    """
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target, dtype=np.float64)
    n, m = (150, 10) if quick else (x.shape[0], 20)
    x, y = x[:n], y[:n]
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    pc1 = np.linalg.svd(x, full_matrices=False)[2][0]
    order = np.argsort(x @ pc1, kind="stable")
    z = x[order[np.linspace(0, n - 1, m).round().astype(int)]]
    return (
        jnp.asarray(x, dtype=jnp.float32),
        jnp.asarray(y, dtype=jnp.float32),
        jnp.asarray(z, dtype=jnp.float32),
    )


def rbf_kernel(
    a: jax.Array, b: jax.Array, lengthscale: jax.Array, variance: jax.Array
) -> jax.Array:
    """k(a, b) = v · exp(−½ Σ_d (a_d − b_d)² / ℓ_d²), for rows of a (p × d) and b (q × d).

    Costs O(p q d).
    """
    a, b = a / lengthscale, b / lengthscale
    sq = jnp.sum(a**2, -1)[:, None] + jnp.sum(b**2, -1)[None, :] - 2.0 * a @ b.T
    return variance * jnp.exp(-0.5 * jnp.maximum(sq, 0.0))


def model(x: jax.Array, y: jax.Array | None = None, *, z: jax.Array) -> None:
    """Sparse GP regression: u ~ N(0, Kuu + εvI), f = Kxu Kuu⁻¹ u, y ~ N(f, σ²).

    Params: ``lengthscale`` (one per input dimension, ARD), ``variance`` v and ``noise`` σ, all
    positive. ``z`` (M × d) are the inducing inputs, passed as a keyword. Kuu⁻¹ u is applied by
    a Cholesky solve (``cho_solve``), never an explicit inverse: O(n M d + M³ + n M²) per call.
    """
    n, d = x.shape
    m = z.shape[0]
    lengthscale = numpyro.param("lengthscale", jnp.ones(d), constraint=dist.constraints.positive)
    variance = numpyro.param("variance", jnp.array(1.0), constraint=dist.constraints.positive)
    noise = numpyro.param("noise", jnp.array(0.5), constraint=dist.constraints.positive)
    kuu = rbf_kernel(z, z, lengthscale, variance) + JITTER * variance * jnp.eye(m)
    chol = jnp.linalg.cholesky(kuu)
    u = numpyro.sample("u", dist.MultivariateNormal(jnp.zeros(m), scale_tril=chol))
    f = rbf_kernel(x, z, lengthscale, variance) @ cho_solve((chol, True), u)
    with numpyro.plate("data", n):
        numpyro.sample("y", dist.Normal(f, noise), obs=y)


def make_guide(m: int) -> Callable[..., None]:
    """Guide q(u) = N(u_loc, L Lᵀ) over the m inducing values, for use with :func:`model`.

    Params: ``u_loc`` (init zeros) and ``u_scale_tril`` L (constraint
    ``scaled_unit_lower_cholesky``, init 0.1 · I). Sampling costs O(m²).
    """

    def guide(x: jax.Array, y: jax.Array | None = None, *, z: jax.Array) -> None:
        u_loc = numpyro.param("u_loc", jnp.zeros(m))
        u_scale_tril = numpyro.param(
            "u_scale_tril",
            0.1 * jnp.eye(m),
            constraint=dist.constraints.scaled_unit_lower_cholesky,
        )
        numpyro.sample("u", dist.MultivariateNormal(u_loc, scale_tril=u_scale_tril))

    return guide
