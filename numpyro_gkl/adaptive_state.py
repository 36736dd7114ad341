"""Where ``TraceAnalytic_ELBO(kl="adaptive")`` keeps its running moments across SVI steps.

NumPyro's ``SVI`` carries state from one step to the next only for ``numpyro.mutable`` sites that
the model or the guide declares (``SVIState.mutable_state``); a loss has no state of its own.
``with_adaptive_state(guide)`` wraps a guide so that it declares one such site,
``STATE_SITE``, holding the moment buffers of the adaptive estimator for each latent sample site
of the guide. With it, ``kl="adaptive"`` fits its coefficients on earlier steps (running
moments, any ``num_particles``); without it, on the other particles of the same step (leave one
out, ``num_particles >= 3``). See ``docs/adaptive.md``.

The state is one float vector (all zeros at ``SVI.init``, updated only by
``TraceAnalytic_ELBO``): every array of the state is an input and an output of each jitted
``SVI.update`` call, and on a small model a dict of five arrays cost a call visibly more than one
vector in development measurements. ``unpack`` names its parts, for C latent sites
(``state_sites`` order: sorted names):

- ``steps``: SVI steps taken so far;
- ``weight``, ``weight_sq``: Σ_τ λ^(t−1−τ) and Σ_τ λ^2(t−1−τ) over the steps τ < t so far;
- ``b``, ``b_sq`` (C,): per site s, the λ-weighted sums of b̂ₛ and b̂ₛ²;
- ``m`` (C × C): the λ-weighted sum of M̂.

The sites without a closed-form term keep zeros. Length 3 + 2C + C² = 2 + (C + 1)².
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import Array
from numpyro.handlers import trace
from numpyro.primitives import mutable

STATE_SITE = "_gkl_adaptive_state"


def state_sites(guide_trace: dict[str, Any]) -> list[str]:
    """The latent sample sites of a guide's trace, sorted: the order of the state's entries."""
    return sorted(
        name
        for name, site in guide_trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    )


def initial_state(num_sites: int) -> Array:
    """Zero moment buffers for ``num_sites`` latent sites (C): a vector of 2 + (C + 1)²."""
    return jnp.zeros(2 + (num_sites + 1) ** 2)


def num_sites(state: Array) -> int:
    """C, from the state's length 2 + (C + 1)²."""
    return math.isqrt(state.shape[-1] - 2) - 1


def unpack(state: Array) -> dict[str, Array]:
    """The named parts of a state vector: ``steps``, ``weight``, ``weight_sq``, ``b``, ``b_sq``,
    ``m``."""
    c = num_sites(state)
    return {
        "steps": state[0],
        "weight": state[1],
        "weight_sq": state[2],
        "b": state[3 : 3 + c],
        "b_sq": state[3 + c : 3 + 2 * c],
        "m": state[3 + 2 * c :].reshape(c, c),
    }


class AdaptiveStateGuide:
    """A guide that runs ``guide`` unchanged and declares the mutable site ``STATE_SITE``.

    Attribute access falls through to the wrapped guide, so an auto guide's ``get_posterior``,
    ``median``, ``quantiles`` or ``sample_posterior`` work on the wrapper as on the guide.
    """

    def __init__(self, guide: Callable) -> None:
        self.guide = guide

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # a nested trace sees the sites of any guide, joint auto guides' per-site Deltas included
        with trace() as guide_trace:
            result = self.guide(*args, **kwargs)
        mutable(STATE_SITE, initial_state(len(state_sites(guide_trace))))
        return result

    def __getattr__(self, name: str) -> Any:
        if name == "guide":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.guide, name)

    def __repr__(self) -> str:
        return f"with_adaptive_state({self.guide!r})"


def with_adaptive_state(guide: Callable) -> AdaptiveStateGuide:
    """``guide`` with a place for ``kl="adaptive"``'s running moments, for ``SVI``.

    ::

        guide = with_adaptive_state(AutoMultivariateNormal(model))
        svi = SVI(model, guide, optim, TraceAnalytic_ELBO(num_particles=1, kl="adaptive"))

    Works with site-wise guides and with NumPyro's auto guides; ``SVI.run``, ``SVI.update`` and
    ``SVI.get_params`` behave as with the bare guide (the state is
    ``SVIState.mutable_state[STATE_SITE]``, see ``unpack``). Only ``TraceAnalytic_ELBO`` reads
    it; its other ``kl`` modes carry it unchanged.
    """
    if isinstance(guide, AdaptiveStateGuide):
        return guide
    return AdaptiveStateGuide(guide)


def unwrap(guide: Callable) -> Callable:
    """The guide inside ``with_adaptive_state``, or ``guide`` itself."""
    return guide.guide if isinstance(guide, AdaptiveStateGuide) else guide


def _embedding(state: Array, order: list[str], names: list[str]) -> np.ndarray:
    """The 0/1 matrix (C × S) placing the sites ``names`` at their positions in ``order``;
    raises ``ValueError`` if the state does not fit. A constant: selecting and placing with it
    are small products, where indexing would be a gather and a scatter, each an XLA kernel
    that costs a small model's step on CPU more than the products."""
    missing = [n for n in names if n not in order]
    if missing or num_sites(state) != len(order):
        raise ValueError(
            f"the adaptive state holds {num_sites(state)} sites but the guide has {len(order)} "
            f"({order}){f', without {missing}' if missing else ''}: wrap the guide that SVI "
            "runs, with_adaptive_state(guide), and keep its latent sites fixed"
        )
    positions = np.array([order.index(n) for n in names], dtype=np.int64)
    return np.asarray(np.arange(len(order))[:, None] == positions, dtype=state.dtype)


def moments(state: Array, order: list[str], names: list[str]) -> tuple[Array, ...]:
    """``(weight, weight_sq, b, b_sq, m)`` of the sites ``names`` (``order``: the state's sites)."""
    e = _embedding(state, order, names)
    parts = unpack(state)
    m = e.T @ parts["m"] @ e
    return parts["weight"], parts["weight_sq"], e.T @ parts["b"], e.T @ parts["b_sq"], m


def updated(
    state: Array, order: list[str], names: list[str], b_hat: Array, m_hat: Array, decay: float
) -> Array:
    """The state after a step: every sum ← λ·sum + this step's value (λ = ``decay``), and one
    more step.

    ``b_hat`` (S,) and ``m_hat`` (S × S) are this step's estimates for the sites ``names``; the
    other sites' sums only decay (they stay zero). The dtype is kept, so that the state's
    structure is the same at every step (``SVI.run``'s scan needs it). Cost: O(C² S).
    """
    e = _embedding(state, order, names)
    b_step = e @ b_hat.astype(state.dtype)
    m_step = e @ m_hat.astype(state.dtype) @ e.T
    ones = jnp.ones(3, state.dtype)
    step = jnp.concatenate([ones, b_step, jnp.square(b_step), m_step.ravel()])
    rates = np.full(state.shape, decay)
    rates[0], rates[2] = 1.0, decay**2
    return (rates * state + step).astype(state.dtype)


def stepped(state: Array) -> Array:
    """The state after a step without moments (no site has a closed form): one more step."""
    return state.at[0].add(1.0)
