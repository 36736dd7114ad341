"""End to end: SVI with the sampled, analytic and adaptive KL estimators over several seeds.

For each model of ``gradient_variance.py`` and each estimator (``TraceAnalytic_ELBO`` with
``kl="sampled"`` (``Trace_ELBO``'s estimator), ``"analytic"``, ``"adaptive"`` (running moments:
the guide wrapped by ``with_adaptive_state``), all with
``--particles`` particles and Adam at the model's step size), ``--seeds`` runs of ``--steps``
steps. Every ``--every`` steps the ELBO of the current guide is evaluated by one common yardstick,
the analytic estimator with 256 particles and a fixed key, so that the estimators are compared on
the same scale. Printed per model and estimator: the final ELBO (mean over seeds ± standard error)
and the steps until the ELBO first reaches 95% of the way from its initial value to the best
final value of any estimator (median over seeds; "—" if a seed never does, with the count). A
figure of the ELBO gap against steps (median and interquartile band over seeds) is written to
``--figure``.

    PYTHONPATH=. python benchmarks/elbo_end_to_end.py [--quick] [--markdown] [--figure PATH]
"""

from __future__ import annotations

import argparse
import math

import jax
import matplotlib
import numpy as np
import numpyro
from _common import machine_line, render_table
from gradient_variance import Case, cases
from numpyro.infer import SVI
from tqdm.auto import tqdm

from numpyro_gkl import TraceAnalytic_ELBO, with_adaptive_state

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ESTIMATORS = ("sampled", "analytic", "adaptive")
YARDSTICK_PARTICLES = 256


def run(case: Case, kl: str, particles: int, steps: int, every: int, seeds: int) -> np.ndarray:
    """Evaluated ELBO (seeds × (steps/every + 1)) along SVI runs with one estimator."""
    guide = case.make_guide(case.model)
    run_guide = with_adaptive_state(guide) if kl == "adaptive" else guide
    svi = SVI(
        case.model,
        run_guide,
        numpyro.optim.Adam(case.lr),
        TraceAnalytic_ELBO(num_particles=particles, kl=kl),
    )
    yardstick = TraceAnalytic_ELBO(num_particles=YARDSTICK_PARTICLES)
    eval_key = jax.random.PRNGKey(12345)

    def evaluate(state):
        params = svi.get_params(state)
        return -yardstick.loss(eval_key, params, case.model, guide, *case.data)

    @jax.jit
    def chunk(state):
        state = jax.lax.fori_loop(0, every, lambda _, s: svi.update(s, *case.data)[0], state)
        return state, evaluate(state)

    out = np.empty((seeds, steps // every + 1))
    for seed in range(seeds):
        state = svi.init(jax.random.PRNGKey(seed), *case.data)
        out[seed, 0] = float(jax.jit(evaluate)(state))
        for i in range(steps // every):
            state, value = chunk(state)
            out[seed, i + 1] = float(value)
    return out


def first_reach(trace: np.ndarray, target: float, every: int) -> float:
    hit = np.nonzero(trace >= target)[0]
    return float(hit[0] * every) if hit.size else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="3 seeds, 600 steps, fewer models")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--figure", default="docs/figures/elbo_end_to_end.png")
    args = parser.parse_args()
    steps, seeds = (600, 3) if args.quick else (args.steps, args.seeds)
    rows = []
    all_cases = cases(args.quick)
    fig, axes = plt.subplots(
        math.ceil(len(all_cases) / 3), 3, figsize=(13, 3.2 * math.ceil(len(all_cases) / 3))
    )
    axes = np.atleast_1d(axes).ravel()
    x = np.arange(steps // args.every + 1) * args.every
    for ax, case in zip(axes, tqdm(all_cases, desc="models"), strict=False):
        traces = {kl: run(case, kl, args.particles, steps, args.every, seeds) for kl in ESTIMATORS}
        start = np.median([t[:, 0] for t in traces.values()])
        best = max(np.median(t[:, -1]) for t in traces.values())
        target = start + 0.95 * (best - start)
        for kl, t in traces.items():
            final = t[:, -1]
            reach = np.array([first_reach(s, target, args.every) for s in t])
            ok = ~np.isnan(reach)
            rows.append(
                [
                    case.label,
                    case.guide_name,
                    kl,
                    f"{final.mean():.2f} ± {final.std(ddof=1) / math.sqrt(seeds):.2f}",
                    f"{np.median(reach[ok]):.0f} ({ok.sum()}/{seeds})"
                    if ok.any()
                    else f"— (0/{seeds})",
                ]
            )
            gap = np.maximum(best - t, 1e-3)
            lo, med, hi = np.percentile(gap, [25, 50, 75], axis=0)
            ax.plot(x, med, label=kl)
            ax.fill_between(x, lo, hi, alpha=0.25)
        ax.set_yscale("log")
        ax.set_title(f"{case.label}, {case.guide_name}", fontsize=9)
        ax.set_xlabel("SVI step")
        ax.set_ylabel("best final ELBO − ELBO")
        ax.legend(fontsize=8)
    for ax in axes[len(all_cases) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.figure, dpi=110)
    print(
        machine_line(
            f"{seeds} seeds, {steps} steps, {args.particles} particles, ELBO evaluated every "
            f"{args.every} steps with {YARDSTICK_PARTICLES} analytic particles; figure "
            f"{args.figure}"
        )
    )
    print()
    header = ["model", "guide", "estimator", "final ELBO (mean ± SE)", "steps to 95% (median)"]
    print(render_table(header, rows, args.markdown))


if __name__ == "__main__":
    main()
