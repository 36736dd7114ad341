"""Registration of the closed-form rules with ``numpyro.distributions.kl.kl_divergence``.

NumPyro dispatches ``kl_divergence(p, q)`` on ``(type(p), type(q))`` with multipledispatch. We add
one thin rule for every ordered pair of the Gaussian classes and their wrappers; each converts both
arguments to the common form (``numpyro_gkl.gaussian``) and calls ``gaussian_kl``. A pair that is
not Gaussian after all (``Independent(Beta)``, ``ExpandedDistribution(Gamma)``, …) goes to the rule
NumPyro had for that signature before, or raises ``NotImplementedError`` so that ELBOs fall back to
sampling. ``unregister`` restores NumPyro's table exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product

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
from numpyro.distributions.kl import kl_divergence

from numpyro_gkl.gaussian import as_gaussian, describe
from numpyro_gkl.kl import check_pair, gaussian_kl

GAUSSIAN_TYPES: tuple[type[Distribution], ...] = (
    Normal,
    Independent,
    MultivariateNormal,
    LowRankMultivariateNormal,
    ExpandedDistribution,
    MaskedDistribution,
)
SIGNATURES = tuple(product(GAUSSIAN_TYPES, GAUSSIAN_TYPES))

Rule = Callable[[Distribution, Distribution], Array]
_saved: dict[tuple[type, ...], Rule] | None = None


def _make_rule(previous: Rule | None) -> Rule:
    def rule(p: Distribution, q: Distribution) -> Array:
        gp, gq = as_gaussian(p), as_gaussian(q)
        if gp is None or gq is None:
            if previous is not None:
                return previous(p, q)
            raise NotImplementedError(
                f"numpyro_gkl: no closed-form KL between {describe(p)} and {describe(q)}"
            )
        check_pair(gp, gq, (describe(p), describe(q)))
        return gaussian_kl(gp, gq)

    rule.__doc__ = "Closed-form Gaussian KL(p‖q) from numpyro_gkl; see numpyro_gkl.kl."
    return rule


def is_registered() -> bool:
    """Whether the numpyro_gkl rules are active."""
    return _saved is not None


def register() -> None:
    """Adds the closed-form rules to ``kl_divergence``; calling it again does nothing."""
    global _saved
    if _saved is not None:
        return
    _saved = dict(kl_divergence.funcs)
    previous = {sig: kl_divergence.dispatch(*sig) for sig in SIGNATURES}
    for sig in SIGNATURES:
        kl_divergence.add(sig, _make_rule(previous[sig]))


def unregister() -> None:
    """Restores exactly the rules ``kl_divergence`` had before ``register``."""
    global _saved
    if _saved is None:
        return
    kl_divergence.funcs.clear()
    for sig, func in _saved.items():
        kl_divergence.add(sig, func)
    _saved = None
