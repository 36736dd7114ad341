"""ArviZ diagnostics for the KL estimators: gradient draws, SVI runs over seeds, a NUTS reference.

Everything returns ArviZ data (``InferenceData`` on arviz 0.x, ``xarray.DataTree`` on arviz 1.x),
so ``az.summary``, ``az.ess``, ``az.mcse``, ``az.rhat`` and ArviZ's plots apply directly:

- ``gradient_draws``: independent draws of the loss gradient (and of the loss) at fixed
  parameters for several estimators, one variable per parameter with the estimator as a
  coordinate, so ``az.summary`` gives mean, sd, MCSE and ESS per estimator and element
  (``gradient_draws_at``: the same at several parameter values, compiled once);
- ``variance_ratio``: the summed gradient variance of one estimator over another's, with a
  bootstrap interval (ArviZ has no variance ratio);
- ``svi_runs``: SVI over several seeds with one estimator, the seeds as chains: the guide's
  posterior draws in ``posterior`` (R-hat and ESS across seeds, ``az.plot_forest``) and the
  ELBO trace in ``sample_stats`` (variable ``elbo``, its draw axis the SVI step);
- ``nuts_reference``: NUTS on the same model, ``az.from_numpyro``.

Gradients are with respect to the unconstrained parameters, the ones SVI's optimizer updates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import arviz as az
import jax
import numpy as np
import numpyro
from numpyro.infer import MCMC, NUTS, SVI, Predictive

from numpyro_gkl.elbo import TraceAnalytic_ELBO

ESTIMATORS = ("sampled", "analytic", "adaptive")
ARVIZ_1 = int(az.__version__.split(".")[0]) >= 1


def to_arviz(groups: dict[str, dict[str, np.ndarray]], coords=None, dims=None) -> Any:
    """``az.from_dict`` for both ArviZ generations (arrays are (chain, draw, ...))."""
    if ARVIZ_1:
        return az.from_dict(groups, coords=coords, dims=dims)
    return az.from_dict(**groups, coords=coords, dims=dims)


def _elbo(estimator: str, num_particles: int) -> TraceAnalytic_ELBO:
    return TraceAnalytic_ELBO(num_particles=num_particles, kl=estimator)


def _unconstrained(model, guide, args, kwargs, params):
    """SVI's constrain function and the unconstrained values of ``params`` (or of the init)."""
    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), TraceAnalytic_ELBO())
    state = svi.init(jax.random.PRNGKey(0), *args, init_params=params, **kwargs)
    return svi.constrain_fn, svi.optim.get_params(state.optim_state)


def gradient_draws(
    model: Callable,
    guide: Callable,
    *args: Any,
    params: dict | None = None,
    estimators: Sequence[str] = ESTIMATORS,
    num_draws: int = 200,
    num_particles: int = 4,
    seed: int = 0,
    **kwargs: Any,
) -> Any:
    """Draws of the loss gradient at fixed parameters for each estimator, as ArviZ data.

    ``params`` are constrained values of the param sites (``svi_result.params``); ``None`` uses
    the guide's initialization. Draw i of every estimator uses the same random key, so the
    estimators differ only in how they weight the same draws. Group ``posterior``: one variable
    per parameter, dims (chain=1, draw, estimator, …), plus ``loss``. Cost: ``num_draws`` ×
    ``len(estimators)`` gradient evaluations: one compiled program per estimator, run one after
    another, each mapping over the draws one at a time.
    """
    return gradient_draws_at(
        model,
        guide,
        *args,
        params=[params],
        estimators=estimators,
        num_draws=num_draws,
        num_particles=num_particles,
        seed=seed,
        **kwargs,
    )[0]


def gradient_draws_at(
    model: Callable,
    guide: Callable,
    *args: Any,
    params: Sequence[dict | None],
    estimators: Sequence[str] = ESTIMATORS,
    num_draws: int = 200,
    num_particles: int = 4,
    seed: int = 0,
    **kwargs: Any,
) -> list[Any]:
    """``gradient_draws`` at each entry of ``params`` (same keys at every point), one ArviZ
    data per entry. Each estimator's program is compiled once and run at every point, which
    costs ``len(estimators)`` compilations in all instead of ``len(params)`` times that.
    """
    if not params:
        raise ValueError("gradient_draws_at: params is empty; give at least one point (None: init)")
    points = [_unconstrained(model, guide, args, kwargs, p) for p in params]
    constrain = points[0][0]  # the param sites' transforms do not depend on their values
    keys = jax.random.split(jax.random.PRNGKey(seed), num_draws)

    def program(elbo):
        def at(keys, free):
            def one(key):
                def loss_at(u):
                    return elbo.loss(key, constrain(u), model, guide, *args, **kwargs)

                return jax.value_and_grad(loss_at)(free)

            return jax.lax.map(one, keys)

        return jax.jit(at)

    # One program per estimator, draws not batched: jaxlib 0.10.2 on CPU deadlocks (idle in
    # BlockUntilReady) when a program runs several independent batched LAPACK calls at once,
    # as one program of all estimators over chunks of 10 draws did on the VAE.
    per_point: list[list[dict]] = [[] for _ in points]
    for estimator in estimators:
        run = program(_elbo(estimator, num_particles))
        for draws, (_, free) in zip(per_point, points, strict=True):
            loss, grads = run(keys, free)
            draws.append({"loss": np.asarray(loss), **jax.tree.map(np.asarray, grads)})
    return [_as_arviz(per_estimator, estimators) for per_estimator in per_point]


def _as_arviz(per_estimator: list[dict], estimators: Sequence[str]) -> Any:
    """ArviZ data of one point's draws, the estimator as a coordinate."""
    variables, dims = {}, {}
    for name in per_estimator[0]:
        stacked = np.stack([d[name] for d in per_estimator], axis=1)  # draw, estimator, ...
        variables[name] = stacked[None]
        dims[name] = ["estimator", *(f"{name}_dim_{i}" for i in range(stacked.ndim - 2))]
    return to_arviz({"posterior": variables}, coords={"estimator": list(estimators)}, dims=dims)


def _gradient_matrix(data: Any, estimator: str) -> np.ndarray:
    """Draws × parameters of one estimator's gradient (every variable but ``loss``)."""
    post = data["posterior"]
    names = [n for n in post.data_vars if n != "loss"]
    cols = [
        np.asarray(post[n].sel(estimator=estimator)).reshape(post.sizes["draw"], -1) for n in names
    ]
    return np.concatenate(cols, axis=1)


def bootstrap_weights(n: int, reps: int, seed: int = 0) -> np.ndarray:
    """``reps`` multinomial resampling weights over ``n`` draws (reps × n, rows sum to 1)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=reps) / n


def summed_variance_resampled(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_p Var(x[:, p]) of draws ``x`` (n × P) under each row of ``weights``. Cost: O(reps n P)."""
    x = x.astype(np.float64)
    return weights @ (x**2).sum(1) - ((weights @ x) ** 2).sum(1)


def variance_ratio(
    data: Any, numerator: str, denominator: str = "sampled", reps: int = 500, seed: int = 0
) -> dict[str, float]:
    """Summed gradient variance of ``numerator`` over ``denominator``, with a 90% interval.

    The interval is a paired bootstrap over the draws (the estimators share their keys). Returns
    ``{"ratio", "low", "high", "numerator", "denominator"}`` (the last two the summed variances).
    """
    a, b = _gradient_matrix(data, numerator), _gradient_matrix(data, denominator)
    weights = bootstrap_weights(a.shape[0], reps, seed)
    ratios = summed_variance_resampled(a, weights) / summed_variance_resampled(b, weights)
    va, vb = float(a.var(0).sum()), float(b.var(0).sum())
    low, high = np.percentile(ratios, [5, 95])
    return {
        "ratio": va / vb,
        "low": float(low),
        "high": float(high),
        "numerator": va,
        "denominator": vb,
    }


def svi_runs(
    model: Callable,
    make_guide: Callable[[], Callable],
    *args: Any,
    estimator: str = "analytic",
    seeds: int = 4,
    steps: int = 2000,
    lr: float = 0.01,
    num_particles: int = 4,
    num_samples: int = 200,
    **kwargs: Any,
) -> Any:
    """SVI with one estimator over ``seeds`` seeds, the seeds as ArviZ chains.

    The seeds run one after another as a ``lax.map`` of a ``lax.scan`` (one compilation; a
    ``vmap`` over seeds deadlocked jaxlib 0.10.2 on CPU in the VAE). Group ``posterior``:
    ``num_samples`` draws of every latent site from each seed's fitted guide (``Predictive``);
    group ``sample_stats``: ``elbo`` (chain, draw = SVI step), the negated loss trace. Cost:
    ``seeds`` × ``steps`` SVI steps.
    """
    guide = make_guide()
    svi = SVI(model, guide, numpyro.optim.Adam(lr), _elbo(estimator, num_particles))
    svi.init(jax.random.PRNGKey(0), *args, **kwargs)  # sets up the guide outside any transform

    def one_seed(key):
        state = svi.init(key, *args, **kwargs)

        def step(state, _):
            state, loss = svi.update(state, *args, **kwargs)
            return state, loss

        state, losses = jax.lax.scan(step, state, None, length=steps)
        params = svi.get_params(state)
        predictive = Predictive(guide, params=params, num_samples=num_samples)
        draws = predictive(jax.random.fold_in(key, 1), *args, **kwargs)
        return -losses, {k: v for k, v in draws.items() if not k.startswith("_")}

    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    elbo, posterior = jax.jit(lambda k: jax.lax.map(one_seed, k))(keys)
    posterior = jax.tree.map(np.asarray, posterior)
    return to_arviz({"posterior": posterior, "sample_stats": {"elbo": np.asarray(elbo)}})


def nuts_reference(
    model: Callable,
    *args: Any,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 2,
    seed: int = 0,
    **kwargs: Any,
) -> Any:
    """NUTS on ``model`` as ArviZ data (``az.from_numpyro``), chains run one after another."""
    mcmc = MCMC(
        NUTS(model),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), *args, **kwargs)
    # dims given: arviz 1.x's plate-dimension inference can fail on numpyro 0.22
    # ("module 'numpyro.infer' has no attribute 'initialization'")
    return az.from_numpyro(mcmc, dims={}, pred_dims={})


__all__ = [
    "ESTIMATORS",
    "bootstrap_weights",
    "gradient_draws",
    "gradient_draws_at",
    "nuts_reference",
    "summed_variance_resampled",
    "svi_runs",
    "to_arviz",
    "variance_ratio",
]
