"""TraceAnalytic_ELBO: exactness, unbiasedness against Trace_ELBO, variance, and NumPyro features.

References: dense float64 KL (``dense_kl``), or Trace_ELBO's own estimator with its standard error.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from conftest import dense_entropy, dense_kl
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from numpyro_gkl import TraceAnalytic_ELBO
from numpyro_gkl.models import (
    eight_schools_centered,
    eight_schools_noncentered,
    linear_regression,
    linear_regression_posterior,
    make_regression_data,
    scale_model,
)

PRIOR_COV = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]])
AUTO_JOINT = (AutoMultivariateNormal, AutoLowRankMultivariateNormal, AutoDiagonalNormal)


def latent_model():
    """Gaussian roots only: a full site, a plate of scalars, a low-rank site."""
    numpyro.sample("a", dist.MultivariateNormal(jnp.ones(3), jnp.asarray(PRIOR_COV)))
    with numpyro.plate("p", 4):
        numpyro.sample("b", dist.Normal(0.5, 2.0))
    numpyro.sample("c", dist.LowRankMultivariateNormal(jnp.zeros(2), jnp.ones((2, 1)), jnp.ones(2)))


def prior_moments() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Dense mean and covariance of the latent model's prior, site by site."""
    blocks = {
        "a": (np.ones(3), PRIOR_COV),
        "b": (np.full(4, 0.5), 4.0 * np.eye(4)),
        "c": (np.zeros(2), np.ones((2, 2)) + np.eye(2)),
    }
    return blocks


def init_params(model, guide, *args, **kwargs):
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0), *args, **kwargs))
    # move the locations off the prior so the KL is not trivial
    return {
        k: v + 0.3 * jnp.sin(jnp.arange(v.size).reshape(v.shape)) if "loc" in k else v
        for k, v in params.items()
    }


@pytest.mark.parametrize("auto", AUTO_JOINT, ids=lambda c: c.__name__)
def test_joint_auto_guide_latent_only_is_exact_kl(auto):
    guide = auto(latent_model)
    params = init_params(latent_model, guide)
    posterior = guide.get_posterior(params)
    m = np.asarray(posterior.mean)
    s = np.asarray(
        posterior.covariance_matrix
        if auto is not AutoDiagonalNormal
        else np.diag(np.asarray(posterior.variance))
    )
    # The prior in u-coordinates: numpyro's own unpacking tells where each site sits in u.
    index = {
        name: np.asarray(v, dtype=int).reshape(-1)
        for name, v in guide._unpack_latent(jnp.arange(m.size, dtype=jnp.float64)).items()
    }
    mp, sp = np.zeros(m.size), np.zeros((m.size, m.size))
    for name, (mu, cov) in prior_moments().items():
        mp[index[name]] = mu
        sp[np.ix_(index[name], index[name])] = cov
    expected = dense_kl(m, s, mp, sp)
    elbo = TraceAnalytic_ELBO()
    loss = jax.jit(lambda key: elbo.loss(key, params, latent_model, guide))  # one compilation
    losses = [float(loss(jax.random.PRNGKey(k))) for k in range(4)]
    assert losses[0] == pytest.approx(expected, rel=1e-9)
    assert len(set(losses)) == 1


def test_sitewise_guide_latent_only_is_exact_kl():
    guide = AutoNormal(latent_model)
    params = init_params(latent_model, guide)
    locs = {k.removesuffix("_auto_loc"): np.asarray(v) for k, v in params.items() if "loc" in k}
    scales = {
        k.removesuffix("_auto_scale"): np.asarray(v) for k, v in params.items() if "scale" in k
    }
    expected = sum(
        dense_kl(locs[n].reshape(-1), np.diag(scales[n].reshape(-1) ** 2), mu, cov)
        for n, (mu, cov) in prior_moments().items()
    )
    elbo = TraceAnalytic_ELBO()
    loss = jax.jit(lambda key: elbo.loss(key, params, latent_model, guide))  # one compilation
    losses = [float(loss(jax.random.PRNGKey(k))) for k in range(4)]
    assert losses[0] == pytest.approx(expected, rel=1e-9)
    assert len(set(losses)) == 1


# -- models with non-Gaussian or dependent priors: unbiased, and no more variance ---------------


def draws(elbo, model, guide, params, n=1500, seed=1):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    fn = jax.jit(
        jax.vmap(jax.value_and_grad(lambda p, k: elbo.loss(k, p, model, guide)), (None, 0))
    )
    loss, grads = fn(params, keys)
    flat = jnp.concatenate([g.reshape(n, -1) for g in jax.tree.leaves(grads)], axis=1)
    return np.asarray(loss), np.asarray(flat)


def summed_variance(g: np.ndarray) -> tuple[float, float]:
    """Σ over parameters of the gradient variance, and its standard error over the draws."""
    sq = ((g - g.mean(0)) ** 2).sum(1)
    return float(sq.mean()), float(sq.std() / np.sqrt(sq.size))


@pytest.mark.parametrize(
    "model",
    [eight_schools_centered, eight_schools_noncentered, scale_model],
    ids=lambda f: f.__name__,
)
@pytest.mark.parametrize("auto", [AutoNormal, AutoMultivariateNormal], ids=lambda c: c.__name__)
def test_unbiased_and_no_more_variance(model, auto):
    guide = auto(model)
    params = init_params(model, guide)
    ls, gs = draws(Trace_ELBO(), model, guide, params, seed=1)
    la, ga = draws(TraceAnalytic_ELBO(), model, guide, params, seed=2)
    se = np.hypot(ls.std(), la.std()) / np.sqrt(ls.size)
    assert abs(ls.mean() - la.mean()) < 3 * se
    # independent draws: the analytic variance may exceed the sampled one only within the noise
    (va, se_a), (vs, se_s) = summed_variance(ga), summed_variance(gs)
    assert va - vs < 3 * np.hypot(se_a, se_s)


def test_kl_sampled_is_trace_elbo():
    guide = AutoMultivariateNormal(eight_schools_noncentered)
    params = init_params(eight_schools_noncentered, guide)
    for k in range(3):
        key = jax.random.PRNGKey(k)
        ours = TraceAnalytic_ELBO(kl="sampled").loss(key, params, eight_schools_noncentered, guide)
        theirs = Trace_ELBO().loss(key, params, eight_schools_noncentered, guide)
        assert float(ours) == pytest.approx(float(theirs), rel=1e-12)


def test_bad_kl_argument():
    with pytest.raises(ValueError, match="kl must be"):
        TraceAnalytic_ELBO(kl="exact")


# -- NumPyro features ------------------------------------------------------------------------


def test_sum_sites_false_adds_up_and_names_sites():
    guide = AutoNormal(eight_schools_noncentered)
    params = init_params(eight_schools_noncentered, guide)
    key = jax.random.PRNGKey(3)
    per_site = TraceAnalytic_ELBO(sum_sites=False).loss(
        key, params, eight_schools_noncentered, guide
    )
    total = TraceAnalytic_ELBO().loss(key, params, eight_schools_noncentered, guide)
    assert set(per_site) == {"mu", "tau", "eta", "y"}
    assert float(sum(per_site.values())) == pytest.approx(float(total), rel=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_num_particles_average(vectorize):
    guide = AutoMultivariateNormal(latent_model)
    params = init_params(latent_model, guide)
    one = TraceAnalytic_ELBO().loss(jax.random.PRNGKey(0), params, latent_model, guide)
    many = TraceAnalytic_ELBO(num_particles=5, vectorize_particles=vectorize).loss(
        jax.random.PRNGKey(0), params, latent_model, guide
    )
    assert float(many) == pytest.approx(float(one), rel=1e-12)  # latent-only: exact either way


def linreg(x, y=None, subsample=None):
    """``linear_regression`` with a subsampled data plate."""
    w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
    with numpyro.plate("N", x.shape[0], subsample_size=subsample) as idx:
        numpyro.sample("y", dist.Normal(x[idx] @ w, 0.5), obs=None if y is None else y[idx])


def test_svi_converges_to_conjugate_posterior():
    x, y = make_regression_data(40, 3)
    guide = AutoMultivariateNormal(linear_regression)
    elbo = TraceAnalytic_ELBO(num_particles=4)
    svi = SVI(linear_regression, guide, numpyro.optim.Adam(0.02), elbo)
    result = svi.run(jax.random.PRNGKey(0), 3000, x, y, progress_bar=False)
    post = guide.get_posterior(result.params)
    mean, cov = linear_regression_posterior(x, y)
    np.testing.assert_allclose(np.asarray(post.mean), mean, atol=0.02)
    np.testing.assert_allclose(np.asarray(post.covariance_matrix), cov, atol=0.01)


def test_subsample_scale_matches_trace_elbo():
    x, y = make_regression_data(40, 3)
    guide = AutoNormal(linreg)
    params = init_params(linreg, guide, x, y, subsample=10)
    keys = jax.random.split(jax.random.PRNGKey(5), 3000)

    def losses(elbo):
        f = jax.jit(jax.vmap(lambda k: elbo.loss(k, params, linreg, guide, x, y, subsample=10)))
        return np.asarray(f(keys))

    ls, la = losses(Trace_ELBO()), losses(TraceAnalytic_ELBO())
    assert abs(ls.mean() - la.mean()) < 3 * np.hypot(ls.std(), la.std()) / np.sqrt(ls.size)


def masked_model(mask):
    with handlers.mask(mask=mask):
        numpyro.sample("z", dist.Normal(jnp.zeros(4), 2.0).to_event(1))


def test_handlers_mask_and_scale_keep_the_expectation():
    def model():
        with handlers.scale(scale=3.0):
            masked_model(jnp.array(False))
        numpyro.sample("v", dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)))

    def guide():
        loc = numpyro.param("loc", jnp.array([0.3, -0.2, 0.1, 0.0]))
        numpyro.sample("z", dist.Normal(loc, 0.7).to_event(1))
        numpyro.sample("v", dist.MultivariateNormal(jnp.array([0.2, 0.1]), 0.5 * jnp.eye(2)))

    # model term of z masked out: E[−log q(z)] = H(q); v: −KL; scale 3 applies to the model only
    hz = 4 * (0.5 * np.log(2 * np.pi * np.e) + np.log(0.7))
    kl_v = dense_kl(np.array([0.2, 0.1]), 0.5 * np.eye(2), np.zeros(2), np.eye(2))
    loss = TraceAnalytic_ELBO().loss(jax.random.PRNGKey(0), {}, model, guide)
    assert float(loss) == pytest.approx(-(hz - kl_v), rel=1e-9)


Z_LOC, Z_SCALE, Z_PRIOR_SCALE = np.array([0.3, -0.2, 0.1, 0.0]), 0.7, 2.0
V_LOC, V_COV = np.array([0.2, 0.1]), np.array([[0.5, 0.1], [0.1, 0.4]])


def scaled_sides_model(model_scale=1.0, guide_scale=1.0):
    with handlers.scale(scale=model_scale):
        numpyro.sample("z", dist.Normal(jnp.zeros(4), Z_PRIOR_SCALE).to_event(1))
    numpyro.sample("v", dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)))


def scaled_sides_guide(model_scale=1.0, guide_scale=1.0):
    numpyro.sample("z", dist.Normal(jnp.asarray(Z_LOC), Z_SCALE).to_event(1))
    with handlers.scale(scale=guide_scale):
        numpyro.sample("v", dist.MultivariateNormal(jnp.asarray(V_LOC), jnp.asarray(V_COV)))


def scaled_term(kl: float, h: float, model_scale: float, guide_scale: float) -> float:
    """−E_q[sp·log p − sq·log q] = sp·(KL + H) − sq·H, since E_q[−log p] = KL(q‖p) + H(q)."""
    return model_scale * (kl + h) - guide_scale * h


@pytest.mark.parametrize(
    ("model_scale", "guide_scale", "traced"),
    [(3.0, 1.0, False), (1.0, 0.5, False), (3.0, 1.0, True), (1.0, 1.0, True)],
    ids=["model-3", "guide-0.5", "model-3-traced", "model-1-traced"],
)
def test_model_and_guide_scales_weigh_their_own_sides(model_scale, guide_scale, traced):
    """The loss is Trace_ELBO's expectation with each side weighed by its own scale, exact
    (dense NumPy), whether the scales are numbers or traced values (KL annealing)."""
    z_cov, z_prior = Z_SCALE**2 * np.eye(4), Z_PRIOR_SCALE**2 * np.eye(4)
    expected = scaled_term(
        dense_kl(Z_LOC, z_cov, np.zeros(4), z_prior), dense_entropy(z_cov), model_scale, 1.0
    ) + scaled_term(
        dense_kl(V_LOC, V_COV, np.zeros(2), np.eye(2)), dense_entropy(V_COV), 1.0, guide_scale
    )
    elbo = TraceAnalytic_ELBO()

    def loss(ms, gs):
        key = jax.random.PRNGKey(0)
        return elbo.loss(key, {}, scaled_sides_model, scaled_sides_guide, ms, guide_scale=gs)

    value = loss(model_scale, guide_scale)
    if traced:  # after a concrete call, as after SVI.init: the model's structure is known
        value = jax.jit(loss)(model_scale, guide_scale)
    assert float(value) == pytest.approx(expected, rel=1e-9)


def test_guide_plate_replayed_into_a_larger_model_plate():
    """A guide plate of 5 replayed into a model plate of 10 gives the model site scale 2 (NumPyro
    reads it as a subsample): the loss is 2·(KL + H) − H summed over the 5 elements, exact, and
    Trace_ELBO's mean over draws agrees with it."""

    def model():
        with numpyro.plate("N", 10):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        with numpyro.plate("N", 5):
            numpyro.sample("z", dist.Normal(0.3, 0.8))

    kl = dense_kl(np.array([0.3]), np.array([[0.64]]), np.zeros(1), np.eye(1))
    expected = 5 * scaled_term(kl, dense_entropy(np.array([[0.64]])), 2.0, 1.0)
    assert float(TraceAnalytic_ELBO().loss(jax.random.PRNGKey(0), {}, model, guide)) == (
        pytest.approx(expected, rel=1e-9)
    )
    keys = jax.random.split(jax.random.PRNGKey(3), 4000)
    draws = np.asarray(jax.vmap(lambda k: Trace_ELBO().loss(k, {}, model, guide))(keys))
    assert abs(draws.mean() - expected) < 4 * draws.std() / np.sqrt(draws.size)


def test_scaled_model_with_a_masked_guide_keeps_the_draw():
    """With unequal scales and a masked guide there is no exact closed form here: the site keeps
    Trace_ELBO's draw, so the two estimators agree draw by draw."""

    def model():
        with handlers.scale(scale=3.0):
            numpyro.sample("z", dist.Normal(jnp.zeros(4), 2.0).to_event(1))

    def guide():
        with handlers.mask(mask=jnp.array(False)):
            numpyro.sample("z", dist.Normal(jnp.asarray(Z_LOC), Z_SCALE).to_event(1))

    keys = jax.random.split(jax.random.PRNGKey(4), 8)
    for k in keys:
        ours = TraceAnalytic_ELBO().loss(k, {}, model, guide)
        assert float(ours) == pytest.approx(float(Trace_ELBO().loss(k, {}, model, guide)), rel=1e-9)


def test_obs_mask_matches_trace_elbo():
    y = jnp.array([0.5, jnp.nan, -1.0, 2.0])
    mask = ~jnp.isnan(y)

    def model():
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0).expand([4]), obs=jnp.nan_to_num(y), obs_mask=mask)

    guide = AutoNormal(model)
    params = init_params(model, guide)
    keys = jax.random.split(jax.random.PRNGKey(2), 3000)

    def losses(elbo):
        return np.asarray(jax.vmap(lambda k: elbo.loss(k, params, model, guide))(keys))

    ls, la = losses(Trace_ELBO()), losses(TraceAnalytic_ELBO())
    assert abs(ls.mean() - la.mean()) < 3 * np.hypot(ls.std(), la.std()) / np.sqrt(ls.size)


def test_mean_field_violation_warns_and_samples():
    def model():
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("theta", dist.Normal(mu, 1.0))

    def guide():  # mu depends on theta in the guide: the KL of theta given mu is not exact
        theta = numpyro.sample("theta", dist.Normal(0.5, 0.8))
        numpyro.sample("mu", dist.Normal(0.3 * theta, 0.6))

    key = jax.random.PRNGKey(0)
    with pytest.warns(UserWarning, match="'theta'"):
        ours = TraceAnalytic_ELBO(sum_sites=False).loss(key, {}, model, guide)
    theirs = Trace_ELBO(sum_sites=False).loss(key, {}, model, guide)
    assert float(ours["theta"]) == pytest.approx(float(theirs["theta"]), rel=1e-12)


def test_auxiliary_guide_site_and_mutable_state():
    def model():
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        state = numpyro.primitives.mutable("count", {"n": jnp.array(0)})
        state["n"] = state["n"] + 1
        a = numpyro.sample("a", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
        numpyro.sample("z", dist.Normal(0.1 * a, 1.0))

    svi = SVI(model, guide, numpyro.optim.Adam(0.01), TraceAnalytic_ELBO())
    state = svi.init(jax.random.PRNGKey(0))
    state, loss = jax.jit(svi.update)(state)
    assert np.isfinite(float(loss))
    assert int(state.mutable_state["count"]["n"]) == 2  # init + one update


def test_jit_update_and_run():
    x, y = make_regression_data(20, 3)
    guide = AutoLowRankMultivariateNormal(linreg)
    svi = SVI(linreg, guide, numpyro.optim.Adam(0.01), TraceAnalytic_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x, y)
    update = jax.jit(svi.update)
    for _ in range(3):
        state, _ = update(state, x, y)
    result = svi.run(jax.random.PRNGKey(1), 50, x, y, progress_bar=False)
    assert np.all(np.isfinite(np.asarray(result.losses)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no structure warning for a plain model
        TraceAnalytic_ELBO().loss(jax.random.PRNGKey(0), result.params, linreg, guide, x, y)
