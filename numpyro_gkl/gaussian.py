"""One common form for every NumPyro Gaussian: a location plus a covariance structure.

``as_gaussian`` turns ``Normal``, ``Independent(Normal)`` (any nesting, expanded or masked bases),
``MultivariateNormal`` (any parametrization), ``LowRankMultivariateNormal`` and their
``ExpandedDistribution`` / ``MaskedDistribution`` wrappers into one of three structures:

============  ==========================  ======================================
structure     covariance Σ                square root A with Σ = A Aᵀ
============  ==========================  ======================================
``Diagonal``  diag(σ²), any event rank    diag(σ)
``Tril``      L Lᵀ                        L (lower triangular, positive diagonal)
``LowRank``   D + W Wᵀ                    [W, D^½]
============  ==========================  ======================================

No array is broadcast here: each form keeps its parameters at their own batch shapes and records
the batch shape it stands for, so a shared factor stays shared. Conversion costs nothing but the
Cholesky factor NumPyro already computed at construction, and checks nothing: ``entropy`` and
``numpyro_gkl.gaussian_kl`` are NaN where ``Gaussian.valid`` is False (docs/robustness.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import jax.numpy as jnp
from jax import Array
from numpyro.distributions import (
    Distribution,
    ExpandedDistribution,
    Independent,
    LowRankMultivariateNormal,
    MaskedDistribution,
    MultivariateNormal,
    Normal,
)

from numpyro_gkl.linalg import event_sum, highest_precision

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class Gaussian:
    """Base of the three structures.

    ``mask`` (``None`` = all present) is what ``MaskedDistribution`` carried: for ``Diagonal`` it
    broadcasts to ``batch_shape + event_shape`` (a mask inside ``Independent`` masks single
    coordinates), for the others to ``batch_shape``.
    """

    loc: Array
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    mask: Array | None

    @property
    def dim(self) -> int:
        """Number of scalar dimensions K of one event."""
        return math.prod(self.event_shape)

    @property
    def params(self) -> dict[str, Array]:
        """The floating-point parameters (location and covariance structure) by field name."""
        skip = ("batch_shape", "event_shape", "mask")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @property
    def dtype(self) -> Any:
        """The floating dtype all parameters promote to."""
        return jnp.result_type(float, *self.params.values())

    def astype(self, dtype: Any) -> Gaussian:
        """The same form with every parameter in ``dtype`` (no copy where it already is)."""
        return replace(self, **{k: jnp.asarray(v, dtype) for k, v in self.params.items()})

    def valid(self) -> Array:
        """Per batch element (broadcastable to ``batch_shape``): a finite location, and scales
        (``Diagonal``), diagonal entries of ``scale_tril`` (``Tril``) or ``cov_diag`` entries
        (``LowRank``) in (0, ∞). The mask is not looked at. Off-diagonal entries and
        ``cov_factor`` are not checked: a NaN there reaches every result through the
        arithmetic. Cost O(K) per element."""
        diag = self._diagonal()
        return _all_event(jnp.isfinite(self.loc), self) & _all_event(
            (diag > 0) & (diag < jnp.inf), self
        )

    def _diagonal(self) -> Array:
        """What must be positive: scales, diagonal of the factor, or D."""
        raise NotImplementedError

    def expand(self, batch_shape: tuple[int, ...]) -> Gaussian:
        return replace(self, batch_shape=tuple(batch_shape))

    def with_mask(self, mask: Array) -> Gaussian:
        """Masks whole events (``MaskedDistribution`` around this form)."""
        mask = jnp.asarray(mask, dtype=bool)
        if isinstance(self, Diagonal):
            mask = jnp.reshape(mask, mask.shape + (1,) * len(self.event_shape))
        if self.mask is not None:
            mask = mask & self.mask
        return replace(self, mask=mask)


@dataclass(frozen=True)
class Diagonal(Gaussian):
    """Σ = diag(σ²): ``Normal`` or ``Independent(Normal)``; ``scale`` shaped like ``loc``."""

    scale: Array

    def half_log_det(self) -> Array:
        """½ log|Σ| = Σᵢ log σᵢ summed over the event. Cost O(K)."""
        return _sum_event(jnp.log(self.scale), self)

    def _diagonal(self) -> Array:
        return self.scale

    def marginal_var(self) -> Array:
        """diag(Σ). Cost O(K)."""
        return jnp.square(self.scale)


@dataclass(frozen=True)
class Tril(Gaussian):
    """Σ = L Lᵀ: ``MultivariateNormal``; NumPyro keeps ``scale_tril`` whatever it was built from.

    Only the lower triangle of ``scale_tril`` is read, as NumPyro's ``log_prob`` reads it."""

    scale_tril: Array

    def half_log_det(self) -> Array:
        """½ log|Σ| = Σᵢ log Lᵢᵢ. Cost O(K)."""
        return jnp.sum(jnp.log(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1)), -1)

    def _diagonal(self) -> Array:
        return jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1)

    def marginal_var(self) -> Array:
        """diag(Σ)ᵢ = Σ_{j≤i} Lᵢⱼ². Cost O(K²)."""
        return jnp.sum(jnp.square(jnp.tril(self.scale_tril)), -1)


@dataclass(frozen=True)
class LowRank(Gaussian):
    """Σ = D + W Wᵀ: ``LowRankMultivariateNormal``; ``cov_diag`` is D, ``cov_factor`` W (K × r)."""

    cov_factor: Array
    cov_diag: Array

    @property
    def whitened_factor(self) -> Array:
        """D^-½ W (K × r). Cost O(K r)."""
        return self.cov_factor / jnp.sqrt(self.cov_diag)[..., None]

    def capacitance_tril(self) -> Array:
        """Cholesky factor of the capacitance C = I_r + Wᵀ D⁻¹ W. Cost O(K r² + r³)."""
        u = self.whitened_factor
        r = u.shape[-1]
        return jnp.linalg.cholesky(jnp.eye(r, dtype=u.dtype) + jnp.swapaxes(u, -1, -2) @ u)

    def half_log_det(self) -> Array:
        """½ log|Σ| = ½ Σ log Dᵢ + Σ log diag chol(C) (determinant lemma). Cost O(K r² + r³)."""
        lc = self.capacitance_tril()
        return 0.5 * jnp.sum(jnp.log(self.cov_diag), -1) + jnp.sum(
            jnp.log(jnp.diagonal(lc, axis1=-2, axis2=-1)), -1
        )

    def marginal_var(self) -> Array:
        """diag(Σ)ᵢ = Dᵢ + Σⱼ Wᵢⱼ². Cost O(K r)."""
        return self.cov_diag + jnp.sum(jnp.square(self.cov_factor), -1)

    def _diagonal(self) -> Array:
        return self.cov_diag


def _sum_event(x: Array, g: Gaussian) -> Array:
    """Sums the event axes of an elementwise quantity (shaped like the location) of ``g``
    (``linalg.event_sum``)."""
    return _reduce_event(lambda y, axis: event_sum(y, len(axis)), x, g)


def _all_event(x: Array, g: Gaussian) -> Array:
    """Whether a boolean elementwise quantity (shaped like the location) holds over the event."""
    return _reduce_event(jnp.all, x, g)


def _reduce_event(reduce: Callable[..., Array], x: Array, g: Gaussian) -> Array:
    n = len(g.event_shape)
    x = jnp.broadcast_to(x, jnp.broadcast_shapes(jnp.shape(x), (1,) * n))
    return reduce(x, axis=tuple(range(-n, 0))) if n else x


@highest_precision
def entropy(g: Gaussian) -> Array:
    """H = ½ K log(2πe) + ½ log|Σ| of each event, shape ``g.batch_shape`` (also where the
    parameters are smaller, as when a plate broadcasts them), NaN where ``g.valid()`` is False.
    Cost: that of ``half_log_det``."""
    h = jnp.where(g.valid(), 0.5 * g.dim * (1.0 + _LOG_2PI) + g.half_log_det(), jnp.nan)
    return jnp.broadcast_to(h, g.batch_shape)


def describe(d: Any) -> str:
    """``Name(batch_shape=…, event_shape=…)`` of a NumPyro distribution or a common form."""
    return (
        f"{type(d).__name__}(batch_shape={tuple(d.batch_shape)}, "
        f"event_shape={tuple(d.event_shape)})"
    )


def as_gaussian(d: Distribution) -> Gaussian | None:
    """The common form of ``d``, or ``None`` if ``d`` is not a Gaussian this package knows.

    Subclasses of the NumPyro classes are not recognized (they may change the density), and an
    ``Independent`` qualifies only when its base, unwrapped through ``ExpandedDistribution`` and
    ``MaskedDistribution``, is a ``Normal``.
    """
    kind = type(d)
    if kind is Normal:
        return Diagonal(d.loc, tuple(d.batch_shape), (), None, d.scale)
    if kind is MultivariateNormal:
        return Tril(d.loc, tuple(d.batch_shape), tuple(d.event_shape), None, d.scale_tril)
    if kind is LowRankMultivariateNormal:
        return LowRank(
            d.loc, tuple(d.batch_shape), tuple(d.event_shape), None, d.cov_factor, d.cov_diag
        )
    if kind is ExpandedDistribution:
        base = as_gaussian(d.base_dist)
        return None if base is None else base.expand(tuple(d.batch_shape))
    if kind is MaskedDistribution:
        base = as_gaussian(d.base_dist)
        return None if base is None else base.with_mask(d._mask)
    if kind is Independent:
        base = as_gaussian(d.base_dist)
        if not isinstance(base, Diagonal):
            return None
        event_shape = tuple(d.event_shape)

        def full_event(x: Array) -> Array:
            # NumPyro keeps a shared scalar scale as shape () or (1,); give it the event's axes.
            return jnp.broadcast_to(x, jnp.broadcast_shapes(jnp.shape(x), event_shape))

        return replace(
            base,
            loc=full_event(base.loc),
            scale=full_event(base.scale),
            batch_shape=tuple(d.batch_shape),
            event_shape=event_shape,
        )
    return None
