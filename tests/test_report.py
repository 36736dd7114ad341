"""``numpyro-gkl report --quick --models …``: every table and figure is in the page, every figure
is an image; the quick suite's other models, run through the estimators.

Also the diagnostics it is built from: ArviZ data with the estimator as a coordinate, the
variance ratio against a direct NumPy computation, SVI seeds as chains.
"""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import arviz as az
import matplotlib.image
import numpy as np
import pytest
from conftest import dense_kl
from numpyro.infer.autoguide import AutoNormal

from numpyro_gkl import diagnostics as dg
from numpyro_gkl.models import eight_schools_noncentered, linear_regression, make_regression_data
from numpyro_gkl.report import QUICK_PROBLEMS, choose_problems

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables = 0
        self.headers: list[str] = []
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables += 1
        elif tag == "th":
            self._in_th = True

    def handle_endtag(self, tag):
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th:
            self.headers.append(data)


# The report's models, one of each kind of page section: an exact reference, a NUTS reference
# (and an auto guide), none. The quick suite's other models are run by
# test_other_quick_models_estimators_agree, which costs a third of their report sections.
REPORT_MODELS = ("linear_regression", "eight_schools_noncentered_AutoNormal", "sparse_gp")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    subprocess.run(
        [
            *(sys.executable, "-m", "numpyro_gkl", "report", "--quick", "--out", str(out)),
            *("--models", ",".join(REPORT_MODELS)),
        ],
        check=True,
        timeout=900,
        capture_output=True,
    )
    return out


def test_report_has_every_table_and_figure(report):
    page = _Page()
    page.feed((report / "report.html").read_text())
    with_reference = [n for n in REPORT_MODELS if n != "sparse_gp"]
    expected = {"figures/variance_ratios.png"}
    expected |= {f"figures/elbo_{n}.png" for n in REPORT_MODELS}
    expected |= {f"figures/forest_{n}.png" for n in with_reference}
    assert set(page.images) == expected
    # ratio table, one ArviZ summary per model with a reference, the speed table
    assert page.tables == 1 + len(with_reference) + 1
    assert "analytic / sampled at init" in page.headers
    assert "NumPyro / ours" in page.headers
    assert "ess_bulk" in page.headers and "r_hat" in page.headers
    for src in page.images:
        data = (report / src).read_bytes()
        assert data[:8] == PNG_MAGIC, src
        image = matplotlib.image.imread(report / src)
        assert image.ndim == 3 and min(image.shape[:2]) > 100, src
        assert image.std() > 0.01, f"{src} is blank"


def test_report_ratios_are_numbers_with_intervals(report):
    text = (report / "report.html").read_text()
    cells = re.findall(r"<td>(\d+\.\d\d) \[(\d+\.\d\d), (\d+\.\d\d)\]</td>", text)
    assert len(cells) == 4 * len(REPORT_MODELS)
    for mid, low, high in cells:
        assert float(low) <= float(mid) <= float(high)


def test_report_unknown_model_is_named():
    with pytest.raises(ValueError, match=r"unknown model.*no_such_model.*linear_regression"):
        choose_problems(True, ["linear_regression", "no_such_model"])


@pytest.mark.parametrize("name", [n for n in QUICK_PROBLEMS if n not in REPORT_MODELS])
def test_other_quick_models_estimators_agree(name):
    """The quick suite's models that the report test leaves out, on their quick data: at the
    guide's initialization the closed-form and adaptive estimators' mean loss agrees with the
    sampled one (``Trace_ELBO``'s Monte Carlo estimate) within 5 standard errors."""
    (problem,) = choose_problems(True, [name])
    args, kwargs = problem.data(True)
    guide = problem.make_guide(problem.model)
    n = 100
    (data,) = dg.gradient_draws_at(
        problem.model, guide, *args, params=[None], num_draws=n, **kwargs
    )
    loss = data["posterior"]["loss"]
    sampled = np.asarray(loss.sel(estimator="sampled")).ravel()
    for estimator in ("analytic", "adaptive"):
        other = np.asarray(loss.sel(estimator=estimator)).ravel()
        se = np.sqrt(sampled.var(ddof=1) / n + other.var(ddof=1) / n)
        assert abs(other.mean() - sampled.mean()) < 5 * se, (
            estimator,
            other.mean(),
            sampled.mean(),
        )


# -- the diagnostics -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grads():
    guide = AutoNormal(eight_schools_noncentered)
    return dg.gradient_draws(eight_schools_noncentered, guide, num_draws=60, seed=3)


def test_gradient_draws_estimator_coordinate(grads):
    post = grads["posterior"]
    assert list(post["estimator"].values) == list(dg.ESTIMATORS)
    assert {"mu_auto_loc", "tau_auto_scale", "eta_auto_loc", "loss"} <= set(post.data_vars)
    assert post.sizes["draw"] == 60
    summary = az.summary(grads, var_names=["loss"])
    assert len(summary) == len(dg.ESTIMATORS)  # one row per estimator


def test_variance_ratio_matches_numpy(grads):
    post = grads["posterior"]

    def summed(estimator):
        cols = [
            np.asarray(post[n].sel(estimator=estimator)).reshape(60, -1)
            for n in post.data_vars
            if n != "loss"
        ]
        return np.concatenate(cols, 1).var(0).sum()

    r = dg.variance_ratio(grads, "analytic", "sampled")
    assert r["ratio"] == pytest.approx(summed("analytic") / summed("sampled"), rel=1e-6)
    assert r["low"] <= r["ratio"] <= r["high"]


def _linreg_neg_elbo(x, y, m, s, noise=0.5):
    """−ELBO of ``linear_regression`` under q = N(m, diag s²) and its gradient in m (NumPy)."""
    x, y = np.asarray(x), np.asarray(y)
    r = y - x @ m
    loglik = -0.5 * len(y) * np.log(2 * np.pi * noise**2) - (r @ r + (x**2 @ s**2).sum()) / (
        2 * noise**2
    )
    kl = dense_kl(m, np.diag(s**2), np.zeros_like(m), np.eye(len(m)))  # against the N(0, I) prior
    return kl - loglik, m - x.T @ r / noise**2


def test_gradient_draws_at_each_point_match_the_exact_elbo():
    """At two parameter values, one program per estimator: each point's mean loss and loc
    gradient agree with the closed-form −ELBO of the conjugate model (5 standard errors)."""
    x, y = make_regression_data(20, 3, seed=4)
    guide = AutoNormal(linear_regression)
    points = [
        {"w_auto_loc": np.array([0.3, -0.2, 0.5]), "w_auto_scale": np.array([0.4, 0.7, 0.2])},
        {"w_auto_loc": np.array([-1.0, 0.8, 0.1]), "w_auto_scale": np.array([0.1, 0.3, 0.9])},
    ]
    at = dg.gradient_draws_at(linear_regression, guide, x, y, params=points, num_draws=200)
    assert len(at) == 2
    for data, point in zip(at, points, strict=True):
        loss, grad = _linreg_neg_elbo(x, y, point["w_auto_loc"], point["w_auto_scale"])
        for estimator in dg.ESTIMATORS:
            post = data["posterior"].sel(estimator=estimator)
            for draws, exact in ((post["loss"], loss), (post["w_auto_loc"], grad)):
                d = np.asarray(draws).reshape(200, -1)
                se = d.std(0, ddof=1) / np.sqrt(200) + 1e-9
                assert np.all(np.abs(d.mean(0) - exact) < 5 * se), (estimator, d.mean(0), exact)


def test_gradient_draws_at_no_point_raises():
    with pytest.raises(ValueError, match="params is empty"):
        dg.gradient_draws_at(
            eight_schools_noncentered, AutoNormal(eight_schools_noncentered), params=[]
        )


def test_svi_runs_seeds_are_chains():
    data = dg.svi_runs(
        eight_schools_noncentered,
        lambda: AutoNormal(eight_schools_noncentered),
        seeds=3,
        steps=50,
        num_samples=20,
    )
    assert data["posterior"]["mu"].shape == (3, 20)
    assert data["sample_stats"]["elbo"].shape == (3, 50)
    assert np.all(np.isfinite(np.asarray(data["sample_stats"]["elbo"])))
    assert "r_hat" in az.summary(data, var_names=["mu"]).columns
