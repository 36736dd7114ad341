"""TraceAnalytic_ELBO(kl="adaptive"): coefficients, unbiasedness, variance, SVI, running state.

Two ways to fit the coefficients: leave one out (bare guide) and running moments across steps
(``with_adaptive_state(guide)``). References: NumPy least squares on the other particles and a
constructed linear relation (coefficients), Trace_ELBO's gradient with its Monte Carlo standard
error (unbiasedness), independent draws of the sampled and analytic estimators (variance), the
exact conjugate posterior (SVI).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpyro.distributions import constraints
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from numpyro.primitives import mutable

from numpyro_gkl import TraceAnalytic_ELBO, with_adaptive_state
from numpyro_gkl.adaptive_state import STATE_SITE, initial_state, moments, unpack, updated
from numpyro_gkl.control_variate import (
    combine,
    fitted_coefficients,
    loo_coefficients,
    running_coefficients,
)
from numpyro_gkl.models import (
    eight_schools_noncentered,
    full_rank_guide,
    linear_regression,
    linear_regression_posterior,
    logistic_regression,
    make_classification_data,
    make_regression_data,
)

# -- the coefficients ------------------------------------------------------------------------


def numpy_loo(g: np.ndarray, e: np.ndarray) -> np.ndarray:
    """c₋ᵢ from the other particles by the normal equations, written out in float64."""
    n, s, _ = e.shape
    out = np.empty((n, s))
    for i in range(n):
        others = [j for j in range(n) if j != i]
        gm = g[others].mean(0)
        m = sum(e[j] @ e[j].T for j in others)
        b = sum(e[j] @ (g[j] - gm) for j in others) * (n - 1) / (n - 2)
        m = m + 1e-6 * np.trace(m) / s * np.eye(s)
        # shrinkage by the noise of b: the others' shares r_j and their spread
        r = np.stack([e[j] @ (g[j] - gm) for j in others])
        var_b = ((n - 1) / (n - 2)) ** 3 * ((r - r.mean(0)) ** 2).sum(0)
        out[i] = -np.linalg.solve(m, b) * np.maximum(0.0, 1.0 - var_b / b**2)
    return out


@given(st.integers(3, 6), st.integers(1, 3), st.integers(0, 2**16))
def test_loo_coefficients_match_normal_equations(n, s, seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, 7))
    e = rng.normal(size=(n, s, 7))
    np.testing.assert_allclose(
        jax.jit(loo_coefficients)(jnp.asarray(g), jnp.asarray(e)),  # one compile per shape
        numpy_loo(g, e),
        rtol=1e-8,
        atol=1e-10,
    )


def test_loo_coefficient_ignores_its_own_particle():
    rng = np.random.default_rng(0)
    g, e = rng.normal(size=(5, 9)), rng.normal(size=(5, 2, 9))
    c = loo_coefficients(jnp.asarray(g), jnp.asarray(e))
    g2, e2 = g.copy(), e.copy()
    g2[2] += 100.0 * rng.normal(size=9)
    e2[2] *= -3.0
    c2 = loo_coefficients(jnp.asarray(g2), jnp.asarray(e2))
    np.testing.assert_allclose(c2[2], c[2], rtol=1e-10)
    assert not np.allclose(c2[0], c[0])


def test_fitted_coefficients_recover_a_known_relation():
    """g = a − 0.7 d₁ + 0.2 d₂ (a independent of d): the fitted c is (0.7, −0.2)."""
    rng = np.random.default_rng(1)
    d = rng.normal(size=(20000, 2, 3))
    g = rng.normal(size=(20000, 3)) - 0.7 * d[:, 0] + 0.2 * d[:, 1]
    c = np.asarray(fitted_coefficients(jnp.asarray(g), jnp.asarray(d)))
    np.testing.assert_allclose(c, [0.7, -0.2], atol=0.02)
    h = np.asarray(combine(jnp.asarray(g), jnp.asarray(d), jnp.asarray(c)))
    # what is left is the independent part a, of unit variance (g itself has 1 + 0.49 + 0.04)
    np.testing.assert_allclose(h.var(0), 1.0, rtol=0.05)


def test_running_coefficients_recover_a_known_relation():
    """Steps of ḡ = a − 0.7 d₁ + 0.2 d₂, E[d] = 0, a independent with a large mean: c = (0.7, −0.2).

    The moments are not centred (b̂ = d̄ · ḡ): the mean of a only adds noise, which 3000 steps
    (λ = 0.9995) average out. Fewer than two steps give c = 0.
    """
    rng = np.random.default_rng(2)
    steps, p = 3000, 6
    d = rng.normal(size=(steps, 2, p))
    g = 3.0 + rng.normal(size=(steps, p)) - 0.7 * d[:, 0] + 0.2 * d[:, 1]
    order, names = ["a", "d1", "d2", "z"], ["d1", "d2"]
    b_hat = jnp.asarray(np.einsum("tsp,tp->ts", d, g))
    m_hat = jnp.asarray(np.einsum("tsp,tup->tsu", d, d))
    state = initial_state(len(order))
    assert np.all(np.asarray(running_coefficients(*moments(state, order, names))) == 0.0)
    state = updated(state, order, names, b_hat[0], m_hat[0], 0.9995)
    assert np.all(np.asarray(running_coefficients(*moments(state, order, names))) == 0.0)

    def step(state, x):
        return updated(state, order, names, *x, 0.9995), None

    state, _ = jax.lax.scan(step, state, (b_hat[1:], m_hat[1:]))
    parts = unpack(state)
    assert parts["steps"] == steps
    np.testing.assert_array_equal(np.asarray(parts["b"])[[0, 3]], 0.0)  # sites without a term
    c = np.asarray(running_coefficients(*moments(state, order, names)))
    np.testing.assert_allclose(c, [0.7, -0.2], atol=0.05)


def init_params(model, guide, data):
    """The guide's initial (constrained) params."""
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    return svi.get_params(svi.init(jax.random.PRNGKey(0), *data))


def test_adaptive_argument_errors():
    with pytest.raises(ValueError, match="sum_sites=True"):
        TraceAnalytic_ELBO(num_particles=4, kl="adaptive", sum_sites=False)
    with pytest.raises(ValueError, match="moment_decay"):
        TraceAnalytic_ELBO(kl="adaptive", moment_decay=1.0)
    with pytest.raises(ValueError, match="at least 3"):
        loo_coefficients(jnp.zeros((2, 3)), jnp.zeros((2, 1, 3)))
    x, y = make_regression_data(10, 2)
    guide = AutoNormal(linear_regression)
    params = init_params(linear_regression, guide, (x, y))
    with pytest.raises(ValueError, match="with_adaptive_state"):  # leave one out needs 3
        TraceAnalytic_ELBO(2, kl="adaptive").loss(
            jax.random.PRNGKey(1), params, linear_regression, guide, x, y
        )


# -- the estimator ---------------------------------------------------------------------------


def gradient_draws(elbo, model, guide, data, n, seed, extra=None):
    """``n`` draws of the gradient SVI's optimizer gets (w.r.t. unconstrained parameters) at the
    guide's initialization; ``extra`` (e.g. a frozen adaptive state) is added to the params."""
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), *data)
    free = svi.optim.get_params(state.optim_state)
    extra = extra or {}

    def one(key):
        g = jax.grad(
            lambda u: elbo.loss(key, {**svi.constrain_fn(u), **extra}, model, guide, *data)
        )(free)
        return jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])

    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return np.asarray(jax.jit(lambda k: jax.lax.map(one, k, batch_size=10))(keys))


CASES = [
    ("eight schools AutoNormal", eight_schools_noncentered, AutoNormal, ()),
    ("eight schools AutoMVN", eight_schools_noncentered, AutoMultivariateNormal, ()),
    (
        "logistic K=10 N=500 full rank",
        logistic_regression,
        lambda m: full_rank_guide,
        make_classification_data(500, 10),
    ),
]


@pytest.mark.parametrize(
    ("label", "model", "make_guide", "data"), CASES, ids=lambda x: x if isinstance(x, str) else ""
)
def test_adaptive_is_unbiased(label, model, make_guide, data):
    """Mean adaptive gradient = Trace_ELBO's mean gradient within 4 standard errors, per element."""
    guide = make_guide(model)
    ga = gradient_draws(TraceAnalytic_ELBO(4, kl="adaptive"), model, guide, data, 600, seed=1)
    gs = gradient_draws(Trace_ELBO(4), model, guide, data, 600, seed=2)
    se = np.sqrt(ga.var(0) / len(ga) + gs.var(0) / len(gs))
    z = np.abs(ga.mean(0) - gs.mean(0)) / se
    assert z.max() < 4.5, f"{label}: worst element {z.max():.1f} standard errors off"


@pytest.mark.parametrize(
    ("label", "model", "make_guide", "data"), CASES, ids=lambda x: x if isinstance(x, str) else ""
)
def test_adaptive_variance_not_above_the_better_estimator(label, model, make_guide, data):
    """Summed variance ≤ 1.1 × min(sampled, analytic) on common random numbers (same keys)."""
    guide = make_guide(model)
    var = {
        kl: gradient_draws(TraceAnalytic_ELBO(4, kl=kl), model, guide, data, 300, seed=3)
        .var(0)
        .sum()
        for kl in ("sampled", "analytic", "adaptive")
    }
    assert var["adaptive"] <= 1.1 * min(var["sampled"], var["analytic"]), var


def test_adaptive_beats_both_where_the_terms_correlate():
    """Logistic regression with much data (benchmarks/gradient_variance.py: ratio 0.5 at init)."""
    data = make_classification_data(500, 10)
    var = {
        kl: gradient_draws(
            TraceAnalytic_ELBO(4, kl=kl), logistic_regression, full_rank_guide, data, 300, seed=4
        )
        .var(0)
        .sum()
        for kl in ("sampled", "analytic", "adaptive")
    }
    assert var["adaptive"] < 0.75 * min(var["sampled"], var["analytic"]), var


def test_particle_gradients_average_to_the_analytic_gradient():
    model, guide = eight_schools_noncentered, AutoMultivariateNormal(eight_schools_noncentered)
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    free = svi.optim.get_params(svi.init(jax.random.PRNGKey(0)).optim_state)
    elbo = TraceAnalytic_ELBO(4)
    key = jax.random.PRNGKey(5)
    value, g, d, names = elbo.particle_gradients(key, svi.constrain_fn(free), model, guide)
    assert names == ("mu", "eta")
    assert value.shape == (4,)
    loss_grad = jax.grad(lambda u: elbo.loss(key, svi.constrain_fn(u), model, guide))(free)
    for k in loss_grad:
        np.testing.assert_allclose(-np.asarray(g[k]).mean(0), loss_grad[k], rtol=1e-4, atol=1e-5)
        assert d[k].shape == (4, 2, *loss_grad[k].shape)


def site_guide(x, y=None):
    """A site-wise diagonal guide for ``w``."""
    loc = numpyro.param("w_loc", jnp.full(x.shape[1], 0.3))
    scale = numpyro.param("w_scale", jnp.full(x.shape[1], 0.5), constraint=constraints.positive)
    numpyro.sample("w", dist.Normal(loc, scale).to_event(1))


def assert_difference_gradients(model, guide, data, site, draw_minus_closed, shift=None):
    """Per draw, the gradient of ``site``'s difference equals that of
    ``draw_minus_closed(params, guide_trace)``, on the draws the ELBO makes (particle keys split
    from the key, then model and guide keys), at the guide's initial unconstrained parameters
    (moved by ``shift``)."""
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    free = svi.optim.get_params(svi.init(jax.random.PRNGKey(0), *data).optim_state)
    free = free if shift is None else jax.tree.map(shift, free)
    key = jax.random.PRNGKey(3)
    _, _, d, names = TraceAnalytic_ELBO(3).particle_gradients(
        key, svi.constrain_fn(free), model, guide, *data
    )
    assert names == (site,)

    def reference(u, particle_key):
        _, guide_key = jax.random.split(particle_key)
        params = svi.constrain_fn(u)
        tr = numpyro.handlers.trace(
            numpyro.handlers.substitute(numpyro.handlers.seed(guide, guide_key), params)
        ).get_trace(*data)
        return draw_minus_closed(params, tr)

    reference_grad = jax.jit(jax.grad(reference))
    for i, particle_key in enumerate(jax.random.split(key, 3)):
        expected = reference_grad(free, particle_key)
        for k in expected:
            np.testing.assert_allclose(d[k][i, 0], expected[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("guide", [full_rank_guide, site_guide], ids=["full rank", "diagonal"])
def test_site_difference_has_the_gradient_of_draw_minus_closed_form(guide):
    """Per draw, the gradient of site w's difference is that of log p(z) − log q(z) + KL(q‖p),
    here from NumPyro's log densities and the KL against N(0, I) written out."""
    data = make_classification_data(20, 4)

    def draw_minus_closed(params, tr):
        q, z = tr["w"]["fn"], tr["w"]["value"]
        cov = q.covariance_matrix if hasattr(q, "covariance_matrix") else jnp.diag(q.variance)
        kl = 0.5 * (jnp.trace(cov) + jnp.sum(q.mean**2) - 4 - jnp.linalg.slogdet(cov)[1])
        log_p = dist.Normal(0.0, 1.0).log_prob(z).sum()
        return log_p - q.log_prob(z) + kl

    def shift(u):
        return u + 0.2 * jnp.cos(jnp.arange(u.size)).reshape(u.shape)

    assert_difference_gradients(logistic_regression, guide, data, "w", draw_minus_closed, shift)


def plate_model():
    with numpyro.plate("N", 6):
        numpyro.sample("z", dist.Normal(0.5, 2.0))


def plate_guide():
    """Scalar parameters that the plate broadcasts to its 6 elements."""
    loc = numpyro.param("loc", 0.3)
    scale = numpyro.param("scale", 0.7, constraint=constraints.positive)
    with numpyro.plate("N", 6):
        numpyro.sample("z", dist.Normal(loc, scale))


def test_site_difference_counts_every_element_a_plate_broadcasts():
    """The same, the KL of the 6 elements written out, when the guide's parameters are scalars
    broadcast by a plate (H(q) once instead of 6 times made it biased: its mean was −5 H(q))."""

    def draw_minus_closed(params, tr):
        z, m, s = tr["z"]["value"], params["loc"], params["scale"]
        kl = 6 * (jnp.log(2.0 / s) + (s**2 + (m - 0.5) ** 2) / 8.0 - 0.5)
        log_p = dist.Normal(0.5, 2.0).log_prob(z).sum()
        return log_p - tr["z"]["fn"].log_prob(z).sum() + kl

    assert_difference_gradients(plate_model, plate_guide, (), "z", draw_minus_closed)


# -- running moments: with_adaptive_state -----------------------------------------------------

# (label, model, guide, data, particles, warm-up steps): few warm-up steps make the bias of a c
# that saw this step's draws large enough to detect (1 of 10 steps), enough that c ≠ 0
RUNNING_CASES = [
    (
        "linear regression AutoNormal",
        linear_regression,
        AutoNormal,
        make_regression_data(40, 3),
        1,
        10,
    ),
    ("eight schools AutoMVN", eight_schools_noncentered, AutoMultivariateNormal, (), 4, 40),
]


@pytest.mark.parametrize(
    ("label", "model", "make_guide", "data", "particles", "warm"),
    RUNNING_CASES,
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_running_adaptive_is_unbiased(label, model, make_guide, data, particles, warm):
    """At fixed params and a fixed (warmed, c ≠ 0) state, the mean gradient is Trace_ELBO's."""
    guide = with_adaptive_state(make_guide(model))
    elbo = TraceAnalytic_ELBO(particles, kl="adaptive")
    params = init_params(model, guide, data)
    state = jax.jit(
        lambda k: elbo.warmed_adaptive_state(k, params, model, guide, *data, num_steps=warm)
    )(jax.random.PRNGKey(7))
    names = ["w"] if "regression" in label else ["eta", "mu"]
    c = running_coefficients(*moments(state, sorted(unpack_names(model, guide, data)), names))
    assert np.abs(np.asarray(c)).max() > 0.1, c  # the control variate is in use
    extra = {STATE_SITE: state}
    ga = gradient_draws(elbo, model, guide, data, 400, seed=1, extra=extra)
    gs = gradient_draws(Trace_ELBO(particles), model, guide.guide, data, 400, seed=2)
    se = np.sqrt(ga.var(0) / len(ga) + gs.var(0) / len(gs))
    z = np.abs(ga.mean(0) - gs.mean(0)) / se
    assert z.max() < 4.5, f"{label}: worst element {z.max():.1f} standard errors off"


def unpack_names(model, guide, data):
    """The guide's latent sample sites (the state's entries), from a trace of the guide."""
    tr = numpyro.handlers.trace(numpyro.handlers.seed(guide, 0)).get_trace(*data)
    return [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]


def test_svi_with_running_adaptive_reaches_the_conjugate_posterior():
    """One particle, SVI.run (a scan: the state's structure must not change), then update.

    The step size decays (0.01 · 0.999ᵗ, 1.8e-4 at the end) so that the last iterate's noise is
    well below the tolerance: with a constant 0.01 it alone reaches 0.02 on some seeds, for the
    analytic estimator too.
    """
    x, y = make_regression_data(40, 3)
    guide = with_adaptive_state(AutoMultivariateNormal(linear_regression))
    elbo = TraceAnalytic_ELBO(num_particles=1, kl="adaptive")
    svi = SVI(linear_regression, guide, numpyro.optim.Adam(lambda t: 0.01 * 0.999**t), elbo)
    result = svi.run(jax.random.PRNGKey(0), 4000, x, y, progress_bar=False)
    post = guide.get_posterior(result.params)  # attribute access reaches the auto guide
    mean, cov = linear_regression_posterior(x, y)
    np.testing.assert_allclose(np.asarray(post.mean), mean, atol=0.01)
    np.testing.assert_allclose(np.asarray(post.covariance_matrix), cov, atol=0.005)
    parts = unpack(result.state.mutable_state[STATE_SITE])
    assert parts["steps"] == 4000 and parts["weight"] > 10.0
    state, loss = jax.jit(svi.update)(result.state, x, y)
    assert unpack(state.mutable_state[STATE_SITE])["steps"] == 4001 and np.isfinite(loss)
    assert set(svi.get_params(state)) == {"auto_loc", "auto_scale_tril"}


@pytest.mark.parametrize("make_guide", [AutoMultivariateNormal, AutoNormal])
def test_disjoint_site_gradients_match_per_site_gradients(monkeypatch, make_guide):
    """The site gradients of AutoMultivariateNormal (rows) and of AutoNormal on a model whose
    Gaussian sites have no latent parents (whole params) are disjoint parts of one gradient:
    the warmed state and the gradient with it equal those of one backward pass per site."""
    model = eight_schools_noncentered
    guide = with_adaptive_state(make_guide(model))
    params = init_params(model, guide, ())
    elbo = TraceAnalytic_ELBO(4, kl="adaptive")

    def run():
        state = elbo.warmed_adaptive_state(jax.random.PRNGKey(1), params, model, guide, num_steps=5)
        grad = jax.grad(lambda p: elbo.loss(jax.random.PRNGKey(2), p, model, guide))(
            {**params, STATE_SITE: state}
        )
        return np.asarray(state), {k: np.asarray(v) for k, v in grad.items() if k != STATE_SITE}

    rows_state, rows_grad = run()
    monkeypatch.setattr(TraceAnalytic_ELBO, "_site_blocks", lambda *args: None)
    sites_state, sites_grad = run()
    assert unpack(jnp.asarray(rows_state))["b"].any()
    np.testing.assert_allclose(rows_state, sites_state, rtol=1e-5, atol=1e-9)
    for k in rows_grad:
        np.testing.assert_allclose(rows_grad[k], sites_grad[k], rtol=1e-5, atol=1e-9)


def test_running_state_has_one_entry_per_guide_site():
    """The state covers the guide's latent sites; the low-rank guide's latent is mixed too."""
    data = make_classification_data(20, 3)
    guide = with_adaptive_state(AutoLowRankMultivariateNormal(logistic_regression))
    svi = SVI(
        logistic_regression, guide, numpyro.optim.Adam(0.01), TraceAnalytic_ELBO(1, kl="adaptive")
    )
    result = svi.run(jax.random.PRNGKey(0), 9, *data, progress_bar=False)
    sites = sorted(unpack_names(logistic_regression, guide, data))
    parts = unpack(result.state.mutable_state[STATE_SITE])
    assert parts["m"].shape == (len(sites), len(sites)) and parts["steps"] == 9
    # refreshed on each of the 9 steps, each earlier one weighed down by λ = 0.98
    np.testing.assert_allclose(parts["weight"], sum(0.98**t for t in range(9)), rtol=1e-6)
    assert sites == ["_auto_latent", "w"]
    assert np.all(np.diag(parts["m"]) > 0), parts["m"]


def test_mutable_sites_keep_their_structure_with_many_particles():
    """A model's own mutable site with num_particles > 1: carried unchanged (with a warning)."""

    def model(x, y):
        counter = mutable("counter", {"n": jnp.zeros(())})
        counter["n"] = counter["n"] + 1.0
        linear_regression(x, y)

    x, y = make_regression_data(10, 2)
    svi = SVI(model, AutoNormal(model), numpyro.optim.Adam(0.01), TraceAnalytic_ELBO(3))
    start = svi.init(jax.random.PRNGKey(0), x, y)
    with pytest.warns(UserWarning, match="does not update the mutable sites"):
        result = svi.run(jax.random.PRNGKey(0), 3, x, y, progress_bar=False, init_state=start)
    assert float(result.state.mutable_state["counter"]["n"]) == start.mutable_state["counter"]["n"]
