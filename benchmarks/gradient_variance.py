"""Gradient variance of the KL estimators: sampled, analytic, adaptive and the oracle c.

For each model and guide, at the guide's initialization and at a fitted optimum (``--fit-steps``
of SVI with the analytic estimator), ``--draws`` independent gradient estimates of each estimator,
all with ``--particles`` particles and common random numbers (draw i uses the same key for every
estimator, so the estimators differ only in how they weight the same draws):

- ``sampled``: ``TraceAnalytic_ELBO(kl="sampled")`` (``Trace_ELBO``'s estimator);
- ``analytic``: ``TraceAnalytic_ELBO(kl="analytic")``;
- ``adaptive``: ``TraceAnalytic_ELBO(kl="adaptive")`` with ``with_adaptive_state(guide)``
  (per-site coefficients from running moments of earlier steps). At a fixed point the moments
  are first warmed with ``--burn-in`` steps' draws (independent keys) without moving the
  parameters, then frozen while the draws are measured;
- ``adaptive-loo``: ``kl="adaptive"`` with the bare guide (per-site coefficients fitted on the
  other particles of the same step, leave one out);
- ``oracle``: analytic + Σₛ cₛ (sampled − analytic)ₛ with per-site c fitted on all the row's
  draws at once (in-sample: the best the per-site family can do, optimistic by construction).

Printed per row: the summed variance (over the elements of the unconstrained parameters, the
gradient SVI's optimizer gets) with a bootstrap 90% interval (paired resamples of the draws), and
adaptive / min(sampled, analytic) and adaptive-loo / min(sampled, analytic) with their paired
intervals; then per model the per-step time of a jitted ``SVI.update`` with ``Trace_ELBO``, with
``adaptive`` and with ``adaptive-loo`` at the same particle count (median over
``--reps-time`` repetitions of ``--steps-time`` steps, the three interleaved; CPU time by
default, ``--scan`` for steps inside one ``lax.scan`` as ``SVI.run`` runs them), and the ratios.

    PYTHONPATH=. python benchmarks/gradient_variance.py [--quick] [--draws 1000] [--markdown]
    PYTHONPATH=. python benchmarks/gradient_variance.py --cost-only [--scan] [--markdown]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from _common import machine_line, render_table
from jax.flatten_util import ravel_pytree
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from tqdm.auto import tqdm

from numpyro_gkl import TraceAnalytic_ELBO, with_adaptive_state
from numpyro_gkl.adaptive_state import STATE_SITE
from numpyro_gkl.control_variate import combine, fitted_coefficients
from numpyro_gkl.diagnostics import bootstrap_weights, summed_variance_resampled
from numpyro_gkl.models import (
    eight_schools_noncentered,
    full_rank_guide,
    logistic_regression,
    make_classification_data,
    make_vae_data,
    vae_guide,
    vae_model,
)

ESTIMATORS = ("sampled", "analytic", "adaptive", "adaptive-loo")
BASE = {"adaptive-loo": "adaptive"}


@dataclass
class Case:
    label: str
    model: Callable
    make_guide: Callable[[Callable], Callable]
    data: tuple
    guide_name: str
    lr: float = 0.01


def cases(quick: bool) -> list[Case]:
    """The rows of the issue: logistic regressions, a VAE-style model, eight schools."""
    rows = []
    sizes = [(50, 20), (10, 500)] if quick else [(50, 20), (10, 500), (200, 50)]
    for k, n in sizes:
        data = make_classification_data(n, k)
        label = f"logistic K={k} N={n}"
        rows.append(Case(label, logistic_regression, lambda m: full_rank_guide, data, "full rank"))
        rows.append(Case(label, logistic_regression, AutoMultivariateNormal, data, "AutoMVN"))
    rows.append(
        Case(
            "VAE-style, 200 local z", vae_model, lambda m: vae_guide, (make_vae_data(),), "encoder"
        )
    )
    rows.append(Case("eight schools (nc)", eight_schools_noncentered, AutoNormal, (), "AutoNormal"))
    rows.append(
        Case("eight schools (nc)", eight_schools_noncentered, AutoMultivariateNormal, (), "AutoMVN")
    )
    return rows


def flat(tree) -> jax.Array:
    return ravel_pytree(tree)[0]


def estimator_draws(
    case: Case, svi: SVI, free, particles: int, draws: int, burn_in: int, seed: int
) -> dict[str, np.ndarray]:
    """Per estimator, ``draws`` flattened gradient estimates (draws × P); and the oracle's.

    Gradients are with respect to the unconstrained parameters ``free`` (SVI's optimizer state).
    """
    guide, params = svi.guide, svi.constrain_fn(free)
    keys = jax.random.split(jax.random.PRNGKey(seed), draws)
    # small chunks: jaxlib 0.10.2 on CPU returned wrong gradients for some vmaps of 400 particles
    # (the check below caught it; jax 0.12 agrees with the per-draw values)
    chunk = max(1, min(draws, 10))
    out = {}
    for kl in ESTIMATORS:
        elbo = TraceAnalytic_ELBO(num_particles=particles, kl=BASE.get(kl, kl))
        run_guide, extra = guide, {}
        if kl == "adaptive":
            run_guide = with_adaptive_state(guide)
            burn_key = jax.random.PRNGKey(seed + 1000)
            state = jax.jit(
                lambda k, p, e=elbo, g=run_guide: e.warmed_adaptive_state(
                    k, p, case.model, g, *case.data, num_steps=burn_in
                )
            )(burn_key, params)
            extra = {STATE_SITE: state}

        def grad_of(key, elbo=elbo, run_guide=run_guide, extra=extra):
            g = jax.grad(
                lambda u: elbo.loss(
                    key, {**svi.constrain_fn(u), **extra}, case.model, run_guide, *case.data
                )
            )(free)
            return flat(g)

        out[kl] = np.asarray(
            jax.jit(lambda k, f=grad_of: jax.lax.map(f, k, batch_size=chunk))(keys)
        )
    # the oracle: the same draws split into the analytic part A and the per-site differences B
    elbo = TraceAnalytic_ELBO(num_particles=particles)

    def parts(key):
        _, g, d, _ = elbo.particle_gradients(key, params, case.model, guide, *case.data)
        a = flat(jax.tree.map(lambda x: jnp.mean(x, 0), g))
        b = jax.vmap(flat)(jax.tree.map(lambda x: jnp.mean(x, 0), d))
        return a, b

    a, b = jax.jit(lambda k: jax.lax.map(parts, k, batch_size=chunk))(keys)
    # loss gradients are of −ELBO: the analytic estimate's gradient must be −A on the same keys
    np.testing.assert_allclose(
        out["analytic"], -np.asarray(a), rtol=1e-3, atol=1e-3 * np.abs(a).max()
    )
    out["oracle"] = -np.asarray(combine(a, b, fitted_coefficients(a, b)))
    return out


def step_timers(
    case: Case, guide, particles: int, steps: int, clock: str, scan: bool
) -> dict[str, Callable[[], float]]:
    """Per estimator, a function timing ``steps`` SVI steps and returning seconds per step.

    ``Trace_ELBO``, ``kl="adaptive"`` with ``with_adaptive_state(guide)`` (its state in
    ``SVIState.mutable_state``) and ``kl="adaptive"`` with the bare guide (leave one out), all
    with ``particles`` particles. A step is one call of the jitted ``SVI.update``, or with
    ``scan`` one iteration of a jitted ``lax.scan`` of ``SVI.update`` (as ``SVI.run`` does: no
    per-call dispatch). ``clock``: ``"cpu"``, this process's CPU time, which other processes on
    a shared machine disturb far less than ``"wall"``, the elapsed time. Each is compiled and
    run once before it is timed.
    """
    setups = {
        "Trace_ELBO": (guide, Trace_ELBO(num_particles=particles)),
        "adaptive": (
            with_adaptive_state(guide),
            TraceAnalytic_ELBO(particles, kl="adaptive"),
        ),
        "adaptive-loo": (guide, TraceAnalytic_ELBO(particles, kl="adaptive")),
    }
    timers = {}
    for name, (run_guide, elbo) in setups.items():
        svi = SVI(case.model, run_guide, numpyro.optim.Adam(1e-3), elbo)
        state = svi.init(jax.random.PRNGKey(0), *case.data)
        timers[name] = _timer(svi, state, case, steps, clock, scan)
    return timers


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _timer(svi: SVI, state, case: Case, steps: int, clock: str, scan: bool):
    def one(state, _):
        return svi.update(state, *case.data)

    if scan:
        run = jax.jit(lambda state: jax.lax.scan(one, state, None, length=steps))
    else:
        update = jax.jit(one)

        def run(state):
            for _ in range(steps):
                state, loss = update(state, None)
            return state, loss

    jax.block_until_ready(run(state))
    now = CLOCKS[clock]

    def timer() -> float:
        nonlocal state
        t0 = now()
        state, loss = run(state)
        jax.block_until_ready(loss)
        return (now() - t0) / steps

    return timer


def step_times(
    case: Case, guide, particles: int, steps: int, reps: int, clock: str, scan: bool
) -> dict[str, float]:
    """Median seconds per step of each estimator, repetitions interleaved across estimators."""
    timers = step_timers(case, guide, particles, steps, clock, scan)
    times = {name: [] for name in timers}
    for _ in range(reps):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: float(np.median(t)) for name, t in times.items()}


def fit(case: Case, guide, particles: int, steps: int) -> dict:
    """Unconstrained parameters after ``steps`` of Adam on the analytic estimator, and the SVI."""
    svi = SVI(case.model, guide, numpyro.optim.Adam(case.lr), TraceAnalytic_ELBO(particles))
    result = svi.run(jax.random.PRNGKey(0), steps, *case.data, progress_bar=False)
    return svi.optim.get_params(result.state.optim_state), svi


def interval(x: np.ndarray, fmt: str = ".3g") -> str:
    lo, hi = np.percentile(x, [5, 95])
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--fit-steps", type=int, default=3000)
    parser.add_argument("--burn-in", type=int, default=100, help="steps warming adaptive's state")
    parser.add_argument("--reps", type=int, default=500, help="bootstrap resamples")
    parser.add_argument("--steps-time", type=int, default=100, help="steps per timing repetition")
    parser.add_argument("--reps-time", type=int, default=15, help="timing repetitions")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu", help="timing clock")
    parser.add_argument("--scan", action="store_true", help="time steps inside lax.scan")
    parser.add_argument("--quick", action="store_true", help="200 draws, 500 fit steps, fewer rows")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--cost-only", action="store_true", help="only the per-step cost table")
    parser.add_argument("--variance-only", action="store_true", help="no per-step cost table")
    args = parser.parse_args()
    draws, fit_steps = (200, 500) if args.quick else (args.draws, args.fit_steps)
    time_steps, time_reps = (20, 5) if args.quick else (args.steps_time, args.reps_time)
    weights = bootstrap_weights(draws, args.reps)
    adaptive = [k for k in ESTIMATORS if k.startswith("adaptive")]
    rows, cost_rows = [], []
    for case in tqdm(cases(args.quick), desc="models"):
        guide = case.make_guide(case.model)
        svi = SVI(case.model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
        state = svi.init(jax.random.PRNGKey(0), *case.data)
        points = {"init": (svi.optim.get_params(state.optim_state), svi)}
        if not args.cost_only:
            points["optimum"] = fit(case, guide, args.particles, fit_steps)
        for where, (free, fitted) in points.items() if not args.cost_only else ():
            g = estimator_draws(case, fitted, free, args.particles, draws, args.burn_in, seed=1)
            boot = {k: summed_variance_resampled(v, weights) for k, v in g.items()}
            var = {k: float(v.var(0).sum()) for k, v in g.items()}
            best = np.minimum(boot["sampled"], boot["analytic"])
            rows.append(
                [
                    case.label,
                    case.guide_name,
                    where,
                    *(f"{var[k]:.3g} {interval(boot[k])}" for k in (*ESTIMATORS, "oracle")),
                    *(
                        f"{var[k] / min(var['sampled'], var['analytic']):.2f} "
                        f"{interval(boot[k] / best, '.2f')}"
                        for k in adaptive
                    ),
                ]
            )
        if args.variance_only:
            continue
        t = step_times(case, guide, args.particles, time_steps, time_reps, args.clock, args.scan)
        cost_rows.append(
            [
                case.label,
                case.guide_name,
                *(f"{t[k] * 1e3:.3f}" for k in t),
                *(f"{t[k] / t['Trace_ELBO']:.2f}" for k in adaptive),
            ]
        )
    unit = "steps in a jitted lax.scan" if args.scan else "jitted SVI.update calls"
    cost = (
        ""
        if args.variance_only
        else f"; per-step cost: {args.clock} time, median of {time_reps} interleaved repetitions "
        f"of {time_steps} {unit}"
    )
    print(
        machine_line(
            f"{draws} draws per estimator, {args.particles} particles per estimate, optimum after "
            f"{fit_steps} Adam steps, adaptive's state warmed by {args.burn_in} steps, "
            f"{args.reps} bootstrap resamples{cost}"
        )
    )
    print()
    header = [
        "model",
        "guide",
        "at",
        *(f"{k} var [90%]" for k in (*ESTIMATORS, "oracle")),
        *(f"{k} / min(sampled, analytic) [90%]" for k in adaptive),
    ]
    if rows:
        print(render_table(header, rows, args.markdown))
        print()
    cost_header = ["model", "guide", "Trace_ELBO ms/step", *(f"{k} ms/step" for k in adaptive)]
    cost_header += [f"{k} / Trace_ELBO" for k in adaptive]
    if cost_rows:
        print(render_table(cost_header, cost_rows, args.markdown))


if __name__ == "__main__":
    main()
