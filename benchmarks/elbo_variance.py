"""Gradient variance and per-step cost of TraceAnalytic_ELBO against Trace_ELBO.

For each built-in model and guide, at the guide's initialization: the summed (over the
unconstrained parameters the optimizer updates) variance of the loss gradient from ``--draws``
independent draws of each estimator, with a bootstrap 90% interval, the ratio analytic / sampled
with its interval, and the median time of one jitted ``SVI.update`` for each estimator with its
ratio.

    python benchmarks/elbo_variance.py [--draws 2000] [--quick] [--markdown]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from _common import machine_line, render_table
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from numpyro_gkl import TraceAnalytic_ELBO
from numpyro_gkl.models import (
    eight_schools_centered,
    eight_schools_noncentered,
    linear_regression,
    logistic_regression,
    make_classification_data,
    make_regression_data,
    scale_model,
)


def cases() -> list[tuple[str, Callable, tuple]]:
    """(label, model, args) of the built-in suite."""
    lin = make_regression_data(100, 5)
    return [
        ("eight schools, centered", eight_schools_centered, ()),
        ("eight schools, non-centered", eight_schools_noncentered, ()),
        ("HalfNormal + LogNormal + Gaussian", scale_model, ()),
        ("linear regression K=5 N=100", linear_regression, lin),
        ("logistic regression K=50 N=20", logistic_regression, make_classification_data(20, 50)),
        ("logistic regression K=10 N=500", logistic_regression, make_classification_data(500, 10)),
    ]


def gradient_draws(elbo, svi, free, args, n: int, seed: int) -> np.ndarray:
    """``n`` independent draws of the flattened loss gradient (n × number of parameters).

    The gradient is the one SVI's optimizer gets: with respect to the unconstrained parameters
    ``free``. (With respect to the constrained ones, a full-rank guide's factor would also get
    gradient noise in its upper triangle, which no optimizer step ever uses.)
    """
    keys = jax.random.split(jax.random.PRNGKey(seed), n)

    def one(key):
        g = jax.grad(lambda u: elbo.loss(key, svi.constrain_fn(u), svi.model, svi.guide, *args))(
            free
        )
        return jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])

    # small chunks: jaxlib 0.10.2 on CPU returned wrong gradients for some large vmaps
    return np.asarray(jax.jit(lambda k: jax.lax.map(one, k, batch_size=10))(keys))


def bootstrap_totals(g: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Summed gradient variance of ``reps`` bootstrap resamples of the draws."""
    idx = rng.integers(0, g.shape[0], size=(reps, g.shape[0]))
    return np.array([g[i].var(0).sum() for i in idx])


def step_time(model, guide, elbo, args, steps: int) -> float:
    """Median seconds of one jitted SVI.update (after compilation)."""
    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), elbo)
    state = svi.init(jax.random.PRNGKey(0), *args)
    update = jax.jit(svi.update)
    state, _ = update(state, *args)
    jax.block_until_ready(state)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, loss = update(state, *args)
        jax.block_until_ready(loss)
        times.append((time.perf_counter() - t0) / steps)
    return float(np.median(times))


def interval(x: np.ndarray) -> str:
    lo, hi = np.percentile(x, [5, 95])
    return f"[{lo:.3g}, {hi:.3g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="400 draws, 50 timed steps")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    draws, steps = (400, 50) if args.quick else (args.draws, 200)
    rng = np.random.default_rng(0)
    rows = []
    for label, model, data in cases():
        for auto in (AutoNormal, AutoMultivariateNormal):
            guide = auto(model)
            svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
            free = svi.optim.get_params(svi.init(jax.random.PRNGKey(0), *data).optim_state)
            gs = gradient_draws(Trace_ELBO(), svi, free, data, draws, seed=1)
            ga = gradient_draws(TraceAnalytic_ELBO(), svi, free, data, draws, seed=2)
            bs, ba = bootstrap_totals(gs, 200, rng), bootstrap_totals(ga, 200, rng)
            vs, va = gs.var(0).sum(), ga.var(0).sum()
            ts = step_time(model, guide, Trace_ELBO(), data, steps)
            ta = step_time(model, guide, TraceAnalytic_ELBO(), data, steps)
            rows.append(
                [
                    label,
                    auto.__name__,
                    f"{vs:.3g} {interval(bs)}",
                    f"{va:.3g} {interval(ba)}",
                    f"{va / vs:.2f} {interval(ba / bs)}",
                    f"{ts * 1e3:.3f}",
                    f"{ta * 1e3:.3f}",
                    f"{ta / ts:.2f}",
                ]
            )
    header = [
        "model",
        "guide",
        "Trace_ELBO var [90%]",
        "TraceAnalytic var [90%]",
        "ratio [90%]",
        "Trace_ELBO ms/step",
        "TraceAnalytic ms/step",
        "cost ratio",
    ]
    print(machine_line(f"{draws} draws at initialization, float{jnp.zeros(()).dtype.itemsize * 8}"))
    print(render_table(header, rows, args.markdown))


if __name__ == "__main__":
    main()
