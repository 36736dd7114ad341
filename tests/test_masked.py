"""Masked distributions: the closed form equals E_p[m_p·log p(z) − m_q·log q(z)].

Two independent references: a Monte Carlo estimate with NumPyro's own masked ``log_prob``
(200k draws, within 5 standard errors), and the exact value from dense NumPy (KL where both are
present, −H(p) where only p is, the cross-entropy E_p[−log q] where only q is, 0 where neither;
per coordinate for a mask inside ``Independent``).
"""

from __future__ import annotations

import math
import textwrap

import jax
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import (
    assert_close,
    dense_entropy,
    dense_kl,
    random_gaussian,
    rng_for,
    run_python,
)
from numpyro.distributions.kl import kl_divergence

K = 3
B = 4
N_DRAWS = 200_000
# batch-level masks: element 0 both present, 1 only p, 2 only q, 3 neither
MASK_P = np.array([True, True, False, False])
MASK_Q = np.array([True, False, True, False])


def _coord_mask(seed: int) -> np.ndarray:
    """A (B, K) coordinate mask with every row different, all-present and all-absent included."""
    rng = np.random.default_rng(seed)
    m = rng.random((B, K)) < 0.5
    m[0] = True
    m[-1] = False
    return m


def _masked(built, kind: str | None, mask: np.ndarray | None):
    """Wraps a random Gaussian in the mask of the given kind."""
    if kind is None:
        return built.dist
    if kind == "batch":
        return built.dist.mask(mask)
    assert kind == "coord" and built.structure == "diag"
    return dist.Normal(built.params["loc"], built.params["scale"]).mask(mask).to_event(1)


def _exact(p, q, kind_p, mask_p, kind_q, mask_q) -> np.ndarray:
    """E_p[m_p log p] − E_p[m_q log q] from dense NumPy, per batch element."""
    var_p = np.diagonal(p.cov, axis1=-2, axis2=-1)
    # E_p[log p]
    if kind_p == "coord":
        h = 0.5 * np.log(2 * np.pi * np.e * var_p)  # p is diagonal: per-coordinate entropies
        e_log_p = -np.sum(np.where(mask_p, h, 0.0), -1)
    else:
        e_log_p = -dense_entropy(p.cov) * (1.0 if kind_p is None else mask_p)
    # E_p[log q]
    if kind_q == "coord":
        var_q = np.diagonal(q.cov, axis1=-2, axis2=-1)
        ce = 0.5 * np.log(2 * np.pi * var_q) + 0.5 * ((p.loc - q.loc) ** 2 + var_p) / var_q
        e_log_q = -np.sum(np.where(mask_q, ce, 0.0), -1)
    else:
        ce = dense_entropy(p.cov) + dense_kl(p.loc, p.cov, q.loc, q.cov)
        e_log_q = -ce * (1.0 if kind_q is None else mask_q)
    return e_log_p - e_log_q


def _kinds(structure):
    """Masks a structure can carry: per batch element, and per coordinate for a diagonal one."""
    return ["batch", "coord"] if structure == "diag" else ["batch"]


def _cases():
    pairs = [
        ("diag", "diag"),
        ("scale_tril", "diag"),
        ("diag", "scale_tril"),
        ("scale_tril", "scale_tril"),
        ("lowrank3", "diag"),
    ]
    # masked low-rank q, and a low-rank p against a covariance-parametrized q: both masked
    yield pytest.param("diag", "lowrank1", "coord", "batch", id="diag[coord]-lowrank1[batch]")
    yield pytest.param(
        "lowrank1", "covariance_matrix", "batch", "batch", id="lowrank1[batch]-cov[batch]"
    )
    for sp, sq in pairs:
        for where in ("p", "q", "both"):
            kinds_p = (
                (["batch", "coord"] if sp == "diag" else ["batch"]) if where != "q" else [None]
            )
            kinds_q = (
                (["batch", "coord"] if sq == "diag" else ["batch"]) if where != "p" else [None]
            )
            for kp in kinds_p:
                for kq in kinds_q:
                    yield pytest.param(sp, sq, kp, kq, id=f"{sp}[{kp}]-{sq}[{kq}]")


@pytest.mark.parametrize(("sp", "sq", "kind_p", "kind_q"), list(_cases()))
def test_masked_semantics(sp, sq, kind_p, kind_q):
    rng = rng_for("masked", sp, sq, kind_p, kind_q)
    p = random_gaussian(rng, sp, K, (B,))
    q = random_gaussian(rng, sq, K, (B,))
    mask_p = _coord_mask(1) if kind_p == "coord" else MASK_P
    mask_q = _coord_mask(2) if kind_q == "coord" else MASK_Q
    pm, qm = _masked(p, kind_p, mask_p), _masked(q, kind_q, mask_q)
    kl = np.asarray(kl_divergence(pm, qm))
    assert kl.shape == (B,)

    # exact dense reference
    expected = _exact(p, q, kind_p, mask_p, kind_q, mask_q)
    assert_close(kl, expected, rtol=1e-10, atol=1e-12, what="exact")

    # Monte Carlo with NumPyro's masked log_prob
    z = p.dist.sample(jax.random.PRNGKey(0), (N_DRAWS,))
    diff = np.asarray(pm.log_prob(z) - qm.log_prob(z))
    mean = diff.mean(0)
    se = diff.std(0, ddof=1) / math.sqrt(N_DRAWS)
    assert np.all(np.abs(kl - mean) <= 5 * se + 1e-9), (kl, mean, se)


def test_fully_masked_scalar_masks():
    """``mask(False)`` / ``mask(True)`` with Python bools."""
    rng = rng_for("bool masks")
    p = random_gaussian(rng, "scale_tril", K)
    q = random_gaussian(rng, "diag", K)
    kl = dense_kl(p.loc, p.cov, q.loc, q.cov)
    h = dense_entropy(p.cov)
    assert_close(kl_divergence(p.dist.mask(True), q.dist.mask(True)), kl, rtol=1e-10)
    assert_close(kl_divergence(p.dist.mask(False), q.dist), h + kl, rtol=1e-10)
    assert_close(kl_divergence(p.dist, q.dist.mask(False)), -h, rtol=1e-10)
    # 0 up to rounding (the package adds and removes the masked terms)
    assert_close(kl_divergence(p.dist.mask(False), q.dist.mask(False)), 0.0, rtol=0, atol=1e-12)


def test_masked_scalar_normal():
    mp, sp, mq, sq = 0.3, 1.5, -0.2, 0.7
    mask = np.array([True, False])
    p = dist.Normal(np.full(2, mp), sp).mask(mask)
    q = dist.Normal(mq, sq)
    h = 0.5 * np.log(2 * np.pi * np.e * sp**2)
    kl = dense_kl([mp], [[sp**2]], [mq], [[sq**2]])
    assert_close(kl_divergence(p, q), np.array([kl, h + kl]), rtol=1e-10)


def test_masked_expanded_scalar_normal_p():
    """A masked-out ``Normal(0., 2.).expand([K]).to_event(1)`` p contributes K entropies."""
    p = dist.Normal(0.0, 2.0).expand([K]).to_event(1).mask(False)
    q = random_gaussian(rng_for("exp-mask"), "scale_tril", K)
    cov_p = 4.0 * np.eye(K)
    expected = dense_entropy(cov_p) + dense_kl(np.zeros(K), cov_p, q.loc, q.cov)
    assert_close(kl_divergence(p, q.dist), expected, rtol=1e-10)


def test_masked_out_mvn_q_with_scalar_scale_diag_p():
    """−H(p) for ``Normal(loc_vec, scalar).to_event(1)``: K entropies, not one."""
    p = dist.Normal(np.array([0.1, 0.2, 0.3]), 2.0).to_event(1)
    q = random_gaussian(rng_for("bcast-mask"), "scale_tril", K).dist.mask(False)
    assert_close(kl_divergence(p, q), -dense_entropy(4.0 * np.eye(K)), rtol=1e-10)


# --------------------------------------------------------------------------------------------
# import order
# --------------------------------------------------------------------------------------------


def test_log_2pi_does_not_depend_on_import_order():
    code = textwrap.dedent(
        """
        import math
        import numpy as np
        import numpyro_gkl  # imported before x64 is switched on
        import jax
        jax.config.update("jax_enable_x64", True)
        import numpyro.distributions as dist
        from numpyro.distributions.kl import kl_divergence
        p = dist.Normal(np.zeros(3), np.full(3, 2.0)).to_event(1)
        q = dist.Normal(np.ones(3), np.ones(3)).to_event(1).mask(False)
        got = float(kl_divergence(p, q))
        want = -(1.5 * (1 + math.log(2 * math.pi)) + 3 * math.log(2.0))
        print(repr(got), repr(want))
        assert abs(got - want) <= 1e-12 * abs(want), (got, want)
        """
    )
    out = run_python(code)
    assert out.returncode == 0, out.stdout + out.stderr
