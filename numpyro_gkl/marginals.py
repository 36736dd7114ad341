"""Marginals of a joint Gaussian guide q(u) for the model sites it covers.

A joint auto guide (``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``,
``AutoDiagonalNormal``) samples one vector u ~ q(u) and cuts it into the model's sites. For a site
with real support the cut is a plain selection z = u[idx], so the site's marginal under q is the
Gaussian with the selected mean and covariance block, and E_q[log p(z)] has a closed form.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import Array

from numpyro_gkl.gaussian import Diagonal, Gaussian, LowRank, Tril
from numpyro_gkl.linalg import highest_precision


def _select(x: Array, index: np.ndarray) -> Array:
    """``x[index]`` along the first axis, as a slice where ``index`` is a contiguous range (as an
    auto guide's sites are): XLA fuses a slice and its derivative (a pad) into their neighbours,
    where a gather's derivative is a scatter, a kernel of its own."""
    flat = index.ravel()
    start = int(flat[0]) if flat.size else 0
    if np.array_equal(flat, np.arange(start, start + flat.size)):
        return x[start : start + flat.size].reshape(index.shape + x.shape[1:])
    return x[index]


@highest_precision
def site_marginal(joint: Gaussian, index: np.ndarray, prior: Gaussian) -> Gaussian:
    """The marginal of ``joint`` (a vector Gaussian over u) at ``u[index]``, shaped like ``prior``.

    ``index`` has the site's shape, ``prior.batch_shape + prior.event_shape``. Against a diagonal
    prior only the marginal means and variances matter for the cross-entropy, so a ``Diagonal``
    marginal is returned (O(n) diagonal, O(n r) low rank, O(n D) full joint for n selected
    coordinates). Against a full or low-rank prior (vector event of size k) each batch element
    gets its k × k block: ``LowRank`` rows of a low-rank joint (O(n r)), or the Cholesky factor of
    the selected rows of a full joint's factor, chol(L[idx] L[idx]ᵀ) (O(n k D + n k²)).
    """
    loc = _select(joint.loc, index)
    batch_shape, event_shape = prior.batch_shape, prior.event_shape
    if isinstance(joint, Diagonal):
        return Diagonal(loc, batch_shape, event_shape, None, _select(joint.scale, index))
    if isinstance(prior, Diagonal):
        return Diagonal(
            loc, batch_shape, event_shape, None, jnp.sqrt(_select(joint.marginal_var(), index))
        )
    if isinstance(joint, LowRank):
        return LowRank(
            loc,
            batch_shape,
            event_shape,
            None,
            _select(joint.cov_factor, index),
            _select(joint.cov_diag, index),
        )
    assert isinstance(joint, Tril)
    rows = _select(joint.scale_tril, index)  # (…, k, D)
    cov = rows @ jnp.swapaxes(rows, -1, -2)
    return Tril(loc, batch_shape, event_shape, None, jnp.linalg.cholesky(cov))
