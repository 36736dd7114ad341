"""SVI on Bayesian linear regression against its exact conjugate posterior, per estimator.

``AutoMultivariateNormal`` with Adam on ``numpyro_gkl.models.linear_regression`` (K weights,
N points, N(0, I) prior): every ``--every`` steps the guide's mean and covariance are compared with
the exact posterior. For each estimator (``Trace_ELBO``, ``TraceAnalytic_ELBO``) and seed the
script records the relative errors; the table gives medians over seeds of the final errors, of
the error's step-to-step noise over the last quarter of the run, and of the first step after which
both errors stay below ``--tol``.

    python benchmarks/elbo_linreg.py [--k 10] [--n 5] [--seeds 3] [--steps 6000] [--markdown]

The defaults are a prior-dominated problem (K > N), where the closed form matters most.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import numpyro
from _common import machine_line, render_table
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal

from numpyro_gkl import TraceAnalytic_ELBO
from numpyro_gkl.models import linear_regression, linear_regression_posterior, make_regression_data


def trajectory(elbo, x, y, seed: int, steps: int, every: int, lr: float) -> np.ndarray:
    """(steps // every) × 2 relative errors of the guide's mean and covariance."""
    mean, cov = linear_regression_posterior(x, y)
    guide = AutoMultivariateNormal(linear_regression)
    svi = SVI(linear_regression, guide, numpyro.optim.Adam(lr), elbo)
    state = svi.init(jax.random.PRNGKey(seed), x, y)

    def chunk(state, _):
        state = jax.lax.fori_loop(0, every, lambda _, s: svi.update(s, x, y)[0], state)
        post = guide.get_posterior(svi.get_params(state))
        return state, (post.mean, post.covariance_matrix)

    _, (means, covs) = jax.jit(lambda s: jax.lax.scan(chunk, s, None, steps // every))(state)
    err_m = np.linalg.norm(np.asarray(means) - mean, axis=-1) / np.linalg.norm(mean)
    err_c = np.linalg.norm(np.asarray(covs) - cov, axis=(-2, -1)) / np.linalg.norm(cov)
    return np.stack([err_m, err_c], -1)


def settle_step(err: np.ndarray, tol: float, every: int) -> float:
    """First step after which both errors stay below ``tol`` (inf if never)."""
    ok = np.all(err < tol, axis=-1)
    bad = np.nonzero(~ok)[0]
    if bad.size == 0:
        return float(every)
    return float((bad[-1] + 2) * every) if bad[-1] + 1 < ok.size else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--tol", type=float, default=0.15)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1500 steps")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    seeds, steps = (2, 1500) if args.quick else (args.seeds, args.steps)
    x, y = make_regression_data(args.n, args.k)
    rows = []
    for name, elbo in [("Trace_ELBO", Trace_ELBO()), ("TraceAnalytic_ELBO", TraceAnalytic_ELBO())]:
        errs = np.stack(
            [trajectory(elbo, x, y, s, steps, args.every, args.lr) for s in range(seeds)]
        )
        tail = errs[:, -max(1, errs.shape[1] // 4) :]
        settle = [settle_step(e, args.tol, args.every) for e in errs]
        rows.append(
            [
                name,
                f"{np.median(errs[:, -1, 0]):.4f}",
                f"{np.median(errs[:, -1, 1]):.4f}",
                f"{np.median(tail.std(axis=1)[:, 0]):.4f}",
                f"{np.median(tail.std(axis=1)[:, 1]):.4f}",
                f"{np.median(settle):.0f}",
            ]
        )
    header = [
        "estimator",
        "final mean rel. err",
        "final cov rel. err",
        "mean err noise (last 25%)",
        "cov err noise (last 25%)",
        f"steps to stay < {args.tol}",
    ]
    print(
        machine_line(
            f"K={args.k}, N={args.n}, Adam({args.lr}), {steps} steps, median over {seeds} seeds"
        )
    )
    print(render_table(header, rows, args.markdown))


if __name__ == "__main__":
    main()
