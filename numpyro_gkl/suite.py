"""The built-in suite: the examples' models on their bundled data, run through the diagnostics.

Each ``Problem`` is a model, a guide factory and its data; ``run_problem`` measures, in ArviZ
terms, what the closed form does there: gradient draws of every estimator at the guide's
initialization and at a fitted optimum (``diagnostics.gradient_draws_at``) with the variance ratios
against the sampled estimator (``diagnostics.variance_ratio``), SVI over several seeds per
estimator (``diagnostics.svi_runs``) and, where the posterior is known or NUTS is cheap, a
reference (the exact conjugate posterior, or ``diagnostics.nuts_reference``). The examples in
``examples/`` run one problem each; ``numpyro-gkl report`` runs them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import numpyro
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from numpyro_gkl import diagnostics as dg
from numpyro_gkl.elbo import TraceAnalytic_ELBO
from numpyro_gkl.models import (
    eight_schools_centered,
    eight_schools_noncentered,
    full_rank_guide,
    linear_regression,
    linear_regression_posterior,
    logistic_regression,
    make_regression_data,
)


@dataclass(frozen=True)
class Problem:
    """One model of the suite.

    ``data(quick)`` returns ``(args, kwargs)`` for model and guide; ``steps`` are SVI steps per
    seed (full, quick); ``compare`` names the latent sites shown against the reference;
    ``reference(args, quick)`` returns ArviZ data of the reference posterior, or ``None``.
    """

    name: str
    title: str
    model: Callable
    make_guide: Callable[[Any], Callable]
    data: Callable[[bool], tuple[tuple, dict]]
    lr: float
    steps: tuple[int, int]
    compare: tuple[str, ...] = ()
    reference: Callable[[tuple, bool], Any] | None = None
    note: str = ""


@dataclass
class ProblemResult:
    """What ``run_problem`` measured (ArviZ data and plain numbers)."""

    problem: Problem | None
    gradients: dict[str, Any] = field(default_factory=dict)  # "init" / "optimum" -> ArviZ data
    ratios: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    runs: dict[str, Any] = field(default_factory=dict)  # estimator -> ArviZ data
    reference: Any = None
    reference_label: str = ""


# -- data and references ---------------------------------------------------------------------


def _linreg_data(quick: bool) -> tuple[tuple, dict]:
    return make_regression_data(20 if quick else 40, 5, seed=1), {}


def _linreg_reference(args: tuple, quick: bool) -> Any:
    """Draws of the exact conjugate posterior of ``linear_regression``, two chains."""
    mean, cov = linear_regression_posterior(*args)
    rng = np.random.default_rng(0)
    draws = rng.multivariate_normal(mean, cov, size=(2, 500))
    return dg.to_arviz({"posterior": {"w": draws}})


def _breast_cancer(quick: bool) -> tuple[tuple, dict]:
    """scikit-learn's bundled breast-cancer data: standardized features, 0/1 labels."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    if quick:
        x, y = x[:200, :8], y[:200]
    else:
        x = x[:, :10]
    return (jax.numpy.asarray(x, "float32"), jax.numpy.asarray(y, "float32")), {}


def _nuts(model: Callable) -> Callable[[tuple, bool], Any]:
    def reference(args: tuple, quick: bool) -> Any:
        n = 200 if quick else 1000
        return dg.nuts_reference(model, *args, num_warmup=n, num_samples=n)

    return reference


def _no_data(quick: bool) -> tuple[tuple, dict]:
    return (), {}


def problems() -> list[Problem]:
    """The suite, in the order of the examples."""
    from numpyro_gkl import sparse_gp, vae

    def gp_data(quick: bool) -> tuple[tuple, dict]:
        x, y, z = sparse_gp.load_data(quick)
        return (x, y), {"z": z}

    def gp_guide(x, y=None, *, z):
        return sparse_gp.make_guide(z.shape[0])(x, y, z=z)

    def vae_data(quick: bool) -> tuple[tuple, dict]:
        return (vae.load_data(quick),), {}

    out = [
        Problem(
            "linear_regression",
            "Bayesian linear regression, full-rank guide, against the exact posterior",
            linear_regression,
            lambda m: full_rank_guide,
            _linreg_data,
            lr=0.02,
            steps=(3000, 400),
            compare=("w",),
            reference=_linreg_reference,
        ),
        Problem(
            "logistic_regression",
            "Logistic regression (breast cancer), AutoMultivariateNormal, against NUTS",
            logistic_regression,
            AutoMultivariateNormal,
            _breast_cancer,
            lr=0.02,
            steps=(3000, 400),
            compare=("w",),
            reference=_nuts(logistic_regression),
        ),
        Problem(
            "sparse_gp",
            "Sparse variational GP (diabetes), q(u) = N(m, S) against p(u) = N(0, Kuu)",
            sparse_gp.model,
            lambda m: gp_guide,
            gp_data,
            lr=0.02,
            steps=(1500, 300),
            note="the KL term is the MultivariateNormal–MultivariateNormal pair",
        ),
        Problem(
            "vae",
            "VAE (digits), low-rank-plus-diagonal posterior per image",
            vae.model,
            lambda m: vae.guide,
            vae_data,
            lr=0.01,
            steps=(3000, 200),
            note="the KL term is the LowRankMultivariateNormal–Normal pair, one per image",
        ),
    ]
    for model, label in (
        (eight_schools_noncentered, "non-centered"),
        (eight_schools_centered, "centered"),
    ):
        for auto in (AutoNormal, AutoMultivariateNormal):
            out.append(
                Problem(
                    f"eight_schools_{label.replace('-', '')}_{auto.__name__}",
                    f"Eight schools, {label}, {auto.__name__}",
                    model,
                    auto,
                    _no_data,
                    lr=0.02,
                    steps=(3000, 400),
                    compare=("mu", "tau"),
                    reference=_nuts(model),
                )
            )
    return out


# -- running ---------------------------------------------------------------------------------


def _fit(problem: Problem, args: tuple, kwargs: dict, steps: int) -> dict:
    """Constrained params after ``steps`` of Adam on the analytic estimator (seed 0)."""
    guide = problem.make_guide(problem.model)
    svi = SVI(problem.model, guide, numpyro.optim.Adam(problem.lr), TraceAnalytic_ELBO(4))
    result = svi.run(jax.random.PRNGKey(0), steps, *args, progress_bar=False, **kwargs)
    return result.params, guide


def run_problem(problem: Problem, quick: bool = False) -> ProblemResult:
    """Gradient draws and ratios at init and optimum, SVI runs per estimator, the reference.

    Cost (full): 2 × 200 gradient draws × 3 estimators, 4 seeds × ``steps`` SVI steps × 3
    estimators, and the reference (NUTS where there is one); quick: 60 draws, 2 seeds.
    """
    args, kwargs = problem.data(quick)
    draws, seeds = (60, 2) if quick else (200, 4)
    steps = problem.steps[1] if quick else problem.steps[0]
    result = ProblemResult(problem)
    fitted, guide = _fit(problem, args, kwargs, steps)
    at = dg.gradient_draws_at(
        problem.model, guide, *args, params=[None, fitted], num_draws=draws, **kwargs
    )
    for where, data in zip(("init", "optimum"), at, strict=True):
        result.gradients[where] = data
        for estimator in ("analytic", "adaptive"):
            result.ratios[(where, estimator)] = dg.variance_ratio(data, estimator)
    for estimator in dg.ESTIMATORS:
        result.runs[estimator] = dg.svi_runs(
            problem.model,
            lambda: problem.make_guide(problem.model),
            *args,
            estimator=estimator,
            seeds=seeds,
            steps=steps,
            lr=problem.lr,
            **kwargs,
        )
    if problem.reference is not None:
        result.reference = problem.reference(args, quick)
        result.reference_label = "exact" if problem.name == "linear_regression" else "NUTS"
    return result
