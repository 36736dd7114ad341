"""``numpyro-gkl report``: run the built-in suite and write an HTML report with tables and figures.

The report shows, per model of ``numpyro_gkl.suite``: the summed gradient variance of the
analytic and adaptive estimators relative to the sampled one (``Trace_ELBO``'s), with bootstrap
90% intervals, at the guide's initialization and at a fitted optimum; ELBO traces of SVI over
seeds per estimator; ArviZ summaries (mean, sd, ESS, R-hat across seeds) of the fitted guides
against a reference posterior (exact or NUTS) and forest plots of both; and a small KL speed
table (ours against NumPyro's own rule). Figures are PNG files under ``DIR/figures``.
"""

from __future__ import annotations

import html
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions.kl import kl_divergence
from tqdm.auto import tqdm

from numpyro_gkl import registry
from numpyro_gkl.diagnostics import ARVIZ_1
from numpyro_gkl.suite import ProblemResult, problems, run_problem

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

COLORS = {"sampled": "#1f77b4", "analytic": "#ff7f0e", "adaptive": "#2ca02c", "reference": "k"}
QUICK_PROBLEMS = (
    "linear_regression",
    "logistic_regression",
    "sparse_gp",
    "vae",
    "eight_schools_noncentered_AutoNormal",
)


# -- figures ---------------------------------------------------------------------------------


def variance_figure(results: list[ProblemResult], path: Path) -> None:
    """Bars of summed gradient variance relative to the sampled estimator, log scale."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(results) + 2.6), sharey=True)
    y = np.arange(len(results))
    for ax, where in zip(axes, ("init", "optimum"), strict=True):
        for k, estimator in enumerate(("analytic", "adaptive")):
            r = [res.ratios[(where, estimator)] for res in results]
            mid = np.array([x["ratio"] for x in r])
            err = np.array([[x["ratio"] - x["low"], x["high"] - x["ratio"]] for x in r]).T
            ax.barh(
                y + (k - 0.5) * 0.38,
                mid,
                height=0.36,
                xerr=err,
                label=estimator,
                color=COLORS[estimator],
                capsize=2,
            )
        ax.axvline(1.0, color=COLORS["sampled"], lw=1.5, label="sampled (Trace_ELBO) = 1")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"at the guide's {'initialization' if where == 'init' else 'optimum'}")
        ax.set_xlabel("gradient variance / sampled's (90% interval)")
    axes[0].set_yticks(y, [res.problem.name for res in results], fontsize=8)
    axes[0].invert_yaxis()
    # the legend under the panels, where it cannot cover a bar
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def elbo_figure(result: ProblemResult, path: Path) -> None:
    """ELBO traces by seed and estimator (running mean over 2% of the steps), last 80% zoomed."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    for estimator, data in result.runs.items():
        elbo = np.asarray(data["sample_stats"]["elbo"])
        width = max(1, elbo.shape[1] // 50)
        kernel = np.ones(width) / width
        for seed, trace in enumerate(elbo):
            smooth = np.convolve(trace, kernel, mode="valid")
            steps = np.arange(smooth.size) + width
            label = estimator if seed == 0 else None
            for ax, start in zip(axes, (0, smooth.size // 5), strict=True):
                ax.plot(
                    steps[start:],
                    smooth[start:],
                    color=COLORS[estimator],
                    lw=0.9,
                    alpha=0.8,
                    label=label,
                )
    axes[0].set_title("ELBO by seed (running mean)")
    axes[1].set_title("the last 80% of the steps")
    for ax in axes:
        ax.set_xlabel("SVI step")
        ax.set_ylabel("ELBO estimate")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _intervals(data: Any, var: str) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and 90% HDI (``az.hdi``) of every element of ``var``, flattened."""
    post = data["posterior"][var]
    mean = np.asarray(post.mean(("chain", "draw"))).ravel()
    prob = {"prob": 0.9} if ARVIZ_1 else {"hdi_prob": 0.9}  # renamed in arviz 1.0
    hdi = np.asarray(az.hdi(data, var_names=[var], **prob)[var])
    return mean, hdi.reshape(-1, 2)


def forest_figure(result: ProblemResult, path: Path) -> None:
    """Forest plot: mean and 90% HDI of each compared site per estimator and the reference."""
    sources = {**result.runs, result.reference_label: result.reference}
    rows = []
    for var in result.problem.compare:
        size = np.asarray(result.reference["posterior"][var].isel(chain=0, draw=0)).size
        rows += [f"{var}[{i}]" if size > 1 else var for i in range(size)]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) * len(sources) / 2 + 1.5))
    offsets = np.linspace(-0.3, 0.3, len(sources))
    for off, (label, data) in zip(offsets, sources.items(), strict=True):
        means, his = [], []
        for var in result.problem.compare:
            m, h = _intervals(data, var)
            means.append(m)
            his.append(h)
        m, h = np.concatenate(means), np.concatenate(his)
        y = np.arange(len(rows)) + off
        color = COLORS.get(label, "k")
        ax.hlines(y, h[:, 0], h[:, 1], color=color, lw=1.5)
        ax.plot(m, y, "o", color=color, ms=3, label=label)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("posterior mean and 90% HDI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- tables ----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """A summary value as text: floats to 3 significant digits (arviz 1.x does not round)."""
    if isinstance(value, float | np.floating):
        return f"{value:.3g}"
    return str(value)


def _ratio_cell(r: dict[str, float]) -> str:
    """A variance ratio with its interval, as the tables print it: ``0.52 [0.48, 0.58]``."""
    return f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def ratio_table(results: list[ProblemResult]) -> str:
    rows = []
    for res in results:
        cells = [res.problem.name]
        for where in ("init", "optimum"):
            for estimator in ("analytic", "adaptive"):
                r = res.ratios[(where, estimator)]
                cells.append(_ratio_cell(r))
        rows.append(cells)
    header = [
        "model",
        "analytic / sampled at init",
        "adaptive / sampled at init",
        "analytic / sampled at optimum",
        "adaptive / sampled at optimum",
    ]
    return _table(header, rows)


def summary_table(result: ProblemResult) -> str:
    """``az.summary`` of the compared sites, per estimator (seeds as chains) and reference."""
    frames = {**result.runs, result.reference_label: result.reference}
    parts = []
    for label, data in frames.items():
        summary = az.summary(data, var_names=list(result.problem.compare))
        summary.insert(0, "source", label)
        parts.append(summary)
    header = ["site", *map(str, parts[0].columns)]
    rows = [
        [str(idx), *(_cell(v) for v in row)]
        for part in parts
        for idx, row in zip(part.index, part.itertuples(index=False), strict=True)
    ]
    return _table(header, rows)


def _median_ms(fn, *args, reps: int = 40) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _full_full(lp: jax.Array, mp: jax.Array, lq: jax.Array) -> jax.Array:
    k = lp.shape[-1]
    p = dist.MultivariateNormal(mp, scale_tril=lp)
    return kl_divergence(p, dist.MultivariateNormal(jnp.zeros(k), scale_tril=lq))


def _full_std(lp: jax.Array, mp: jax.Array, lq: jax.Array) -> jax.Array:
    k = lp.shape[-1]
    prior = dist.Normal(0.0, 1.0).expand([k]).to_event(1)
    if not registry.is_registered():  # NumPyro has no MVN–Independent(Normal) rule
        prior = dist.MultivariateNormal(jnp.zeros(k), scale_tril=jnp.eye(k))
    return kl_divergence(dist.MultivariateNormal(mp, scale_tril=lp), prior)


def speed_table(quick: bool) -> str:
    """Median ms of one jitted KL, ours against NumPyro's own rule (both sides as MVN there)."""
    rows = []
    for k, b in ((8, 2000), (32, 300)) if quick else ((8, 5000), (32, 1000), (128, 50)):
        key = jax.random.PRNGKey(k)
        a = jax.random.normal(key, (b, k, k)) / math.sqrt(k)
        lp = jnp.linalg.cholesky(a @ jnp.swapaxes(a, -1, -2) + jnp.eye(k))
        mp = jax.random.normal(key, (b, k))
        lq = jnp.linalg.cholesky(2.0 * jnp.eye(k) + 0.1)
        for label, fn in (("full vs full (shared q)", _full_full), ("full vs N(0, I)", _full_std)):
            ours = _median_ms(jax.jit(fn), lp, mp, lq)
            registry.unregister()
            try:
                upstream = _median_ms(jax.jit(fn), lp, mp, lq)
            finally:
                registry.register()
            rows.append(
                [label, str(k), str(b), f"{ours:.3f}", f"{upstream:.3f}", f"{upstream / ours:.2f}×"]
            )
    header = ["pair", "K", "batch", "ours ms", "NumPyro ms", "NumPyro / ours"]
    return _table(header, rows)


def _run_named(name: str, quick: bool) -> ProblemResult:
    """Worker: run one problem by name; the result travels back without its (unpicklable)
    problem, which the parent puts back."""
    result = run_problem(next(p for p in problems() if p.name == name), quick=quick)
    result.problem = None
    return result


def run_problems(chosen: list, quick: bool, workers: int = 2) -> list[ProblemResult]:
    """``run_problem`` for each problem, in ``workers`` processes (most of a quick run is XLA
    compilation, which is single-threaded), with a progress bar."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_run_named, p.name, quick) for p in chosen]
        for _ in tqdm(as_completed(futures), total=len(futures), desc="models", unit="model"):
            pass
        results = [f.result() for f in futures]
    for problem, result in zip(chosen, results, strict=True):
        result.problem = problem
    return results


# -- the page --------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def choose_problems(quick: bool, models: list[str] | None = None) -> list:
    """The suite's problems named in ``models`` (in the suite's order), or by default all of them
    (``QUICK_PROBLEMS`` with ``quick``); a ``ValueError`` names any unknown model."""
    suite = problems()
    if models is None:
        return [p for p in suite if not quick or p.name in QUICK_PROBLEMS]
    unknown = sorted(set(models) - {p.name for p in suite})
    if unknown:
        names = ", ".join(p.name for p in suite)
        raise ValueError(
            f"numpyro-gkl report: unknown model(s) {', '.join(unknown)}; the suite has {names}"
        )
    return [p for p in suite if p.name in models]


def build_report(out: Path, quick: bool = False, models: list[str] | None = None) -> Path:
    """Run the suite (or the problems named in ``models``), write ``out/report.html`` and
    ``out/figures/*.png``; return the page path."""
    chosen = choose_problems(quick, models)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    results = run_problems(chosen, quick)
    variance_figure(results, figures / "variance_ratios.png")
    sections = []
    for res in tqdm(results, desc="figures", unit="model"):
        p = res.problem
        elbo_png = f"figures/elbo_{p.name}.png"
        elbo_figure(res, out / elbo_png)
        parts = [f"<h3 id='{p.name}'>{html.escape(p.title)}</h3>"]
        if p.note:
            parts.append(f"<p class='note'>{html.escape(p.note)}</p>")
        parts.append(f"<img src='{elbo_png}' alt='ELBO traces, {html.escape(p.name)}'>")
        if res.reference is not None:
            forest_png = f"figures/forest_{p.name}.png"
            forest_figure(res, out / forest_png)
            parts.append(f"<img src='{forest_png}' alt='forest plot, {html.escape(p.name)}'>")
            parts.append(summary_table(res))
        sections.append("\n".join(parts))
    speed = speed_table(quick)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>numpyro-gkl report</title>
<style>{_CSS}</style></head><body>
<h1>numpyro-gkl report{" (quick)" if quick else ""}</h1>
<p class="note">jax {jax.__version__}, ArviZ {az.__version__}, backend {jax.default_backend()}.
Estimators: <b>sampled</b> = <code>Trace_ELBO</code>'s draw of log p − log q; <b>analytic</b> =
<code>TraceAnalytic_ELBO</code> (closed-form KL / entropy / expected log prior where exact);
<b>adaptive</b> = per-site mix of both fitted on the other particles. All with 4 particles.</p>
<h2>Gradient variance relative to Trace_ELBO</h2>
<p>Summed variance of the loss gradient (with respect to the unconstrained parameters), ratio to
the sampled estimator; below 1 the closed form cuts variance, near 1 it does not.</p>
{ratio_table(results)}
<img src="figures/variance_ratios.png" alt="gradient variance ratios by model and estimator">
<h2>Models</h2>
<p>ELBO traces of SVI with each estimator over several seeds (each estimator's own ELBO
estimate, smoothed: the noise of the value is not the noise of the gradient, which the table
above measures); where a reference posterior exists, the fitted guides (seeds as chains: R-hat
across seeds) against it, as a forest plot and as <code>az.summary</code> tables.</p>
{"".join(sections)}
<h2>KL speed</h2>
<p>Median time of one jitted KL on this machine, ours against NumPyro's own rule (NumPyro has no
MultivariateNormal–Independent(Normal) rule, so its prior is rewritten as a
MultivariateNormal).</p>
{speed}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def example_main(names: list[str], argv: list[str] | None = None) -> None:
    """Entry point of the scripts in ``examples/``: run some problems, save figures, print tables.

    Prints markdown: the variance ratios with their intervals and, where there is a reference,
    ``az.summary`` of the compared sites per estimator and for the reference.
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer draws, seeds and steps")
    parser.add_argument("--out", type=Path, default=Path("docs/examples/figures"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = choose_problems(args.quick, names)
    results = run_problems(chosen, args.quick)
    stem = names[0] if len(names) == 1 else chosen[0].name.rsplit("_", 2)[0]
    variance_figure(results, args.out / f"variance_{stem}.png")
    print(f"jax {jax.__version__}, ArviZ {az.__version__}{', quick' if args.quick else ''}\n")
    rows = []
    for res in results:
        for where in ("init", "optimum"):
            cells = [res.problem.name, where]
            for estimator in ("analytic", "adaptive"):
                r = res.ratios[(where, estimator)]
                cells.append(_ratio_cell(r))
            rows.append(cells)
    header = ["model", "at", "analytic / sampled [90%]", "adaptive / sampled [90%]"]
    print(_markdown(header, rows))
    for res in results:
        elbo_figure(res, args.out / f"elbo_{res.problem.name}.png")
        if res.reference is None:
            continue
        forest_figure(res, args.out / f"forest_{res.problem.name}.png")
        print(f"\n{res.problem.title}\n")
        sources = {**res.runs, res.reference_label: res.reference}
        for label, data in sources.items():
            summary = az.summary(data, var_names=list(res.problem.compare))
            print(f"\n{label}:\n")
            print(
                _markdown(
                    ["site", *map(str, summary.columns)],
                    [
                        [str(i), *map(_cell, row)]
                        for i, row in zip(summary.index, summary.values, strict=True)
                    ],
                )
            )
    print(f"\nfigures in {args.out}")


__all__ = ["build_report", "example_main"]
