"""numpyro-gkl: exact, numerically stable closed-form KL divergence for NumPyro's Gaussians.

Importing the package registers the rules with ``numpyro.distributions.kl.kl_divergence``, so
``TraceMeanField_ELBO`` and any code calling ``kl_divergence`` use them.
"""

from numpyro_gkl.adaptive_state import with_adaptive_state
from numpyro_gkl.elbo import TraceAnalytic_ELBO
from numpyro_gkl.gaussian import Diagonal, Gaussian, LowRank, Tril, as_gaussian, entropy
from numpyro_gkl.kl import gaussian_kl
from numpyro_gkl.registry import is_registered, register, unregister

__all__ = [
    "Diagonal",
    "Gaussian",
    "LowRank",
    "TraceAnalytic_ELBO",
    "Tril",
    "as_gaussian",
    "entropy",
    "gaussian_kl",
    "is_registered",
    "register",
    "unregister",
    "with_adaptive_state",
]
__version__ = "0.1.0"

register()
