"""A float32 SVI run with ``TraceAnalytic_ELBO`` stays finite, and a pickled state resumes exactly.

One child interpreter with x64 off runs 2,000 steps of Adam on two of the examples' problems
(``numpyro_gkl.suite``): the centered eight schools with ``AutoNormal`` (a funnel, the model most
likely to overflow) with ``kl="analytic"``, and the linear regression with its full-rank guide
with ``kl="adaptive"``. At step 1,000 the ``SVIState`` is pickled and unpickled, and the
remaining 1,000 steps are run from both copies with the same compiled program; the child prints
the bytes of what came out (params, optimizer state, rng key, losses) and the parent compares
them. The linear
regression's guide family holds its exact posterior, so its final ELBO must match the exact log
evidence, log N(y; 0, XXᵀ + σ²I), computed here with NumPy.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from conftest import run_python

STEPS = 2000
CASES = (
    ("eight_schools_centered_AutoNormal", "analytic", 1),
    ("linear_regression", "adaptive", 4),
)

CHILD = textwrap.dedent(
    r"""
    import json, pickle, sys
    import jax
    import numpy as np
    import numpyro
    from numpyro.infer import SVI
    from numpyro.infer.autoguide import AutoGuide
    from numpyro_gkl import TraceAnalytic_ELBO
    from numpyro_gkl.suite import problems

    assert not jax.config.jax_enable_x64
    cases, steps = json.loads(sys.argv[1]), int(sys.argv[2])
    by_name = {p.name: p for p in problems()}

    def leaves(x):
        return [np.asarray(v).tobytes().hex() for v in jax.tree.leaves(jax.device_get(x))]

    out = {}
    for name, kl, particles in cases:
        p = by_name[name]
        args, kwargs = p.data(False)
        elbo = TraceAnalytic_ELBO(num_particles=particles, kl=kl)
        guide = p.make_guide(p.model)
        svi = SVI(p.model, guide, numpyro.optim.Adam(p.lr), elbo)
        # an auto guide sets itself up in init (eagerly); any other init is one compiled program
        init = svi.init if isinstance(guide, AutoGuide) else jax.jit(svi.init)
        state = init(jax.random.PRNGKey(0), *args, **kwargs)
        run = jax.jit(lambda s: jax.lax.scan(
            lambda s, _: svi.update(s, *args, **kwargs), s, None, length=steps // 2))
        middle, first = run(state)
        restored = pickle.loads(pickle.dumps(middle))
        # a state with another rng key must give other steps: the comparison can fail
        other = middle._replace(rng_key=jax.random.PRNGKey(7))
        (end, second), again, moved = run(middle), run(restored), run(other)
        losses = np.concatenate([first, second])
        params = svi.get_params(end)
        out[name] = {
            "dtypes": sorted({str(v.dtype) for v in (*jax.tree.leaves(params), losses)}),
            "finite": int(np.isfinite(losses).sum()),
            "params_finite": all(bool(np.isfinite(v).all()) for v in jax.tree.leaves(params)),
            "final_elbo": -float(losses[-500:].mean()),
            "data": [np.asarray(a, np.float64).tolist() for a in args],
            "resumed": {
                label: {"state": leaves(s), "params": leaves(svi.get_params(s)),
                        "rng_key": leaves(s.rng_key), "losses": leaves(l)}
                for label, (s, l) in (("original", (end, second)), ("restored", again),
                                      ("other_key", moved))},
        }
    print(json.dumps(out))
    """
)


def log_evidence(x: np.ndarray, y: np.ndarray, noise: float = 0.5) -> float:
    """log N(y; 0, XXᵀ + σ²I) of ``models.linear_regression`` (w ~ N(0, I)), float64 NumPy."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cov = x @ x.T + noise**2 * np.eye(len(y))
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (len(y) * np.log(2 * np.pi) + logdet + y @ np.linalg.solve(cov, y))


@pytest.fixture(scope="module")
def child() -> dict:
    out = run_python(CHILD, json.dumps(CASES), str(STEPS), env={"JAX_ENABLE_X64": "0"})
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_float32_run_stays_finite(child, name):
    got = child[name]
    assert got["dtypes"] == ["float32"]
    assert got["finite"] == STEPS and got["params_finite"]


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_pickled_state_resumes_bitwise_identically(child, name):
    got = child[name]["resumed"]
    for part in ("params", "rng_key", "losses", "state"):
        assert got["restored"][part] == got["original"][part], part
    assert got["other_key"]["losses"] != got["original"]["losses"]
    assert got["other_key"]["params"] != got["original"]["params"]


def test_float32_linear_regression_reaches_the_exact_evidence(child):
    x, y = child["linear_regression"]["data"]  # the suite's data, as the child used it
    # the full-rank guide holds the exact posterior: at the optimum ELBO = log evidence; the
    # noise of 500 averaged steps of 4 particles and Adam's wandering are far below 0.5 nats
    assert abs(child["linear_regression"]["final_elbo"] - log_evidence(x, y)) < 0.5
