"""register() / unregister() / is_registered(): NumPyro's dispatch table is restored exactly."""

from __future__ import annotations

import importlib
import textwrap

import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import assert_close, dense_kl, run_python
from numpyro.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)
from numpyro.distributions.kl import kl_divergence

import numpyro_gkl

MVN_PAIR = (MultivariateNormal, MultivariateNormal)


@pytest.fixture(autouse=True)
def _leave_registered():
    """Every test here leaves the rules registered, whatever happens."""
    yield
    numpyro_gkl.register()


def _table():
    return dict(kl_divergence.funcs)


def _upstream_table():
    numpyro_gkl.unregister()
    table = _table()
    numpyro_gkl.register()
    return table


def _diag_and_mvn():
    p = dist.Normal(np.zeros(3), np.full(3, 2.0)).to_event(1)
    cov = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 1.5]])
    q = dist.MultivariateNormal(np.ones(3), cov)
    return p, q, dense_kl(np.zeros(3), 4.0 * np.eye(3), np.ones(3), cov)


def test_registered_at_import():
    assert numpyro_gkl.is_registered()
    assert kl_divergence.dispatch(*MVN_PAIR) is not _upstream_table()[MVN_PAIR]


def test_unregister_restores_table_exactly():
    numpyro_gkl.unregister()
    assert not numpyro_gkl.is_registered()
    upstream = _table()
    numpyro_gkl.register()
    assert numpyro_gkl.is_registered()
    ours = _table()
    assert ours[MVN_PAIR] is not upstream[MVN_PAIR]
    assert (Independent, MultivariateNormal) in ours
    assert (Independent, MultivariateNormal) not in upstream
    numpyro_gkl.unregister()
    after = _table()
    assert after.keys() == upstream.keys()
    assert all(after[sig] is upstream[sig] for sig in upstream)
    # and dispatch (which caches) resolves to NumPyro's functions again
    assert kl_divergence.dispatch(*MVN_PAIR) is upstream[MVN_PAIR]
    assert kl_divergence.dispatch(Normal, Normal) is upstream[(Normal, Normal)]
    assert kl_divergence.dispatch(Independent, Independent) is upstream[(Independent, Independent)]


def test_unregister_twice_and_register_twice_are_idempotent():
    upstream = _upstream_table()
    numpyro_gkl.register()
    first = _table()
    numpyro_gkl.register()
    assert numpyro_gkl.is_registered()
    second = _table()
    assert first.keys() == second.keys()
    assert all(first[sig] is second[sig] for sig in first)
    numpyro_gkl.unregister()
    numpyro_gkl.unregister()
    assert not numpyro_gkl.is_registered()
    after = _table()
    assert after.keys() == upstream.keys()
    assert all(after[sig] is upstream[sig] for sig in upstream)


def test_reimport_registers_once():
    upstream = _upstream_table()
    before = _table()
    again = importlib.import_module("numpyro_gkl")
    assert again is numpyro_gkl
    reloaded = importlib.reload(numpyro_gkl)
    assert reloaded.is_registered()
    now = _table()
    assert now.keys() == before.keys()
    assert all(now[sig] is before[sig] for sig in before)
    # one unregister still gets back to NumPyro's own table
    reloaded.unregister()
    after = _table()
    assert all(after[sig] is upstream[sig] for sig in upstream)
    assert after.keys() == upstream.keys()


def test_rules_follow_registration():
    """After unregister NumPyro has no Independent(Normal)–MVN rule; after register it does."""
    p, q, expected = _diag_and_mvn()
    numpyro_gkl.unregister()
    with pytest.raises(NotImplementedError):
        kl_divergence(p, q)
    numpyro_gkl.register()
    assert_close(kl_divergence(p, q), expected, rtol=1e-10)
    numpyro_gkl.unregister()
    with pytest.raises(NotImplementedError):
        kl_divergence(p, q)
    numpyro_gkl.register()
    assert_close(kl_divergence(p, q), expected, rtol=1e-10)


def test_upstream_rules_work_again_after_unregister():
    """NumPyro's own MVN–MVN rule (not ours) answers after unregister; same value."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    cov_p, cov_q = a @ a.T + np.eye(3), np.diag([1.0, 2.0, 3.0])
    p = MultivariateNormal(np.zeros(3), cov_p)
    q = MultivariateNormal(np.ones(3), cov_q)
    numpyro_gkl.unregister()
    assert kl_divergence.dispatch(*MVN_PAIR).__module__ == "numpyro.distributions.kl"
    assert_close(kl_divergence(p, q), dense_kl(np.zeros(3), cov_p, np.ones(3), cov_q), rtol=1e-9)
    # LowRank has no upstream rule at all
    lr = LowRankMultivariateNormal(np.zeros(3), np.ones((3, 1)), np.ones(3))
    with pytest.raises(NotImplementedError):
        kl_divergence(lr, q)


def test_fresh_interpreter_import_registers_and_unregister_restores():
    """In a clean process: the table before ``import numpyro_gkl`` is what unregister restores."""
    code = textwrap.dedent(
        """
        import importlib
        from numpyro.distributions.kl import kl_divergence
        before = dict(kl_divergence.funcs)
        import numpyro_gkl
        assert numpyro_gkl.is_registered()
        assert dict(kl_divergence.funcs) != before
        importlib.reload(numpyro_gkl)
        numpyro_gkl.unregister()
        after = dict(kl_divergence.funcs)
        assert after.keys() == before.keys(), set(after) ^ set(before)
        assert all(after[k] is before[k] for k in before)
        print("OK")
        """
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"
