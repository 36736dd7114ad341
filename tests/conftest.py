"""Shared fixtures and builders for the numpyro_gkl tests.

float64 is switched on here, before ``numpyro_gkl`` is imported anywhere in the test session;
tests that need float32 build float32 arrays explicitly.

Every builder returns the NumPyro distribution together with an independent dense float64
reference (mean, covariance) computed with NumPy from the very same (dtype-rounded) parameters,
so that reference values never go through ``numpyro_gkl``.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

# The suite's time is mostly XLA compilation (check_grads' derivatives, a jit per shape, the
# quick report), so LLVM's backend optimizations are switched off for it: the same HLO programs,
# compiled faster (the quick report's five problems, run one after the other: 190 → 143 s).
# Set before jax creates its CPU client; child interpreters inherit it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# jaxlib 0.10 still has XLA:CPU's elemental emitters beside its new fusion emitters, and they
# compile the same programs in about half the time (test_exact + test_float32: backend compile
# 58.6 → 27.2 s; the quick report's five problems in one process: 146 → 92 s). jaxlib 0.12 has
# dropped the flag, and an unknown XLA flag is fatal, so it is set for jaxlib 0.10 only.
if importlib.metadata.version("jaxlib").startswith("0.10."):
    TEST_XLA_FLAGS += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import numpyro_gkl  # noqa: E402  (registers the rules)

settings.register_profile(
    "numpyro_gkl",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("numpyro_gkl")

# The longest modules first, so that under ``pytest -n auto --dist loadfile`` the short ones fill
# the end of the run instead of one worker finishing the quick report alone (module seconds on
# 2 cores: report ~125, adaptive ~165, grads ~165, trace_analytic_elbo ~90, properties ~90).
_FIRST = (
    "test_report",
    "test_adaptive",
    "test_grads",
    "test_trace_analytic_elbo",
    "test_properties",
)


def pytest_collection_modifyitems(items: list) -> None:
    """Orders the collected tests by module, longest modules first (``_FIRST``), otherwise as
    collected."""

    def rank(item) -> int:
        name = item.path.stem
        return _FIRST.index(name) if name in _FIRST else len(_FIRST)

    items.sort(key=rank)


#: Every structure / parametrization the package supports for a vector event.
STRUCTURES = (
    "diag",
    "scale_tril",
    "covariance_matrix",
    "precision_matrix",
    "lowrank1",
    "lowrank3",
)
FULL = ("scale_tril", "covariance_matrix", "precision_matrix")
LOWRANK = ("lowrank1", "lowrank3")


def dot_precisions(stablehlo: str) -> list[tuple[str, str]]:
    """The (lhs, rhs) precision of every ``dot_general`` in a lowered program's StableHLO text."""
    return re.findall(r"dot_general .*?precision = \[(\w+), (\w+)\]", stablehlo)


def run_python(
    code: str, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs ``code`` (with ``sys.argv[1:] = args``) in a fresh interpreter that imports this
    checkout of numpyro_gkl, with the variables ``env`` added to its environment."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**subprocess_env(), **(env or {})},
    )


def subprocess_env() -> dict:
    """Environment for a child interpreter that must import this checkout of numpyro_gkl."""
    root = str(pathlib.Path(numpyro_gkl.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def rng_for(*key) -> np.random.Generator:
    """A generator seeded deterministically (not with ``hash``, which is salted per process)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def rank_of(structure: str) -> int:
    return int(structure.removeprefix("lowrank"))


# --------------------------------------------------------------------------------------------
# random, well-conditioned parameters (float64 NumPy)
# --------------------------------------------------------------------------------------------


def random_tril(rng: np.random.Generator, k: int, batch_shape=(), off=0.3) -> np.ndarray:
    """Lower-triangular factor with a positive diagonal in [e^-0.5, e^0.5]."""
    shape = (*tuple(batch_shape), k, k)
    low = np.tril(off * rng.normal(size=shape), -1)
    diag = np.exp(rng.uniform(-0.5, 0.5, size=(*tuple(batch_shape), k)))
    return low + diag[..., :, None] * np.eye(k)


def conditioned_tril(rng: np.random.Generator, k: int, batch_shape=()) -> np.ndarray:
    """``random_tril`` with off-diagonals scaled by min(1, √(32/K)), so that L Lᵀ stays
    conditioned (≤ 1e5) for the dense float64 references at large K."""
    return random_tril(rng, k, batch_shape, off=0.3 * min(1.0, (32 / k) ** 0.5))


def random_params(rng: np.random.Generator, structure: str, k: int, batch_shape=()) -> dict:
    """Random float64 parameters (NumPy arrays) for ``structure`` at ``batch_shape``."""
    batch_shape = tuple(batch_shape)
    params = {"loc": rng.normal(size=(*batch_shape, k))}
    if structure == "diag":
        params["scale"] = np.exp(rng.uniform(-0.5, 0.5, size=(*batch_shape, k)))
    elif structure == "scale_tril":
        params["scale_tril"] = random_tril(rng, k, batch_shape)
    elif structure in ("covariance_matrix", "precision_matrix"):
        tril = random_tril(rng, k, batch_shape)
        mat = tril @ np.swapaxes(tril, -1, -2)
        params[structure] = 0.5 * (mat + np.swapaxes(mat, -1, -2))
    elif structure.startswith("lowrank"):
        r = rank_of(structure)
        params["cov_factor"] = 0.5 * rng.normal(size=(*batch_shape, k, r))
        params["cov_diag"] = np.exp(rng.uniform(-0.5, 0.5, size=(*batch_shape, k)))
    else:
        raise ValueError(structure)
    return params


# --------------------------------------------------------------------------------------------
# parameters -> NumPyro distribution, parameters -> dense float64 reference
# --------------------------------------------------------------------------------------------


def make_dist(structure: str, params: Mapping) -> dist.Distribution:
    """The NumPyro distribution for ``params`` (NumPy or JAX arrays, possibly traced)."""
    loc = params["loc"]
    if structure == "diag":
        return dist.Normal(loc, params["scale"]).to_event(1)
    if structure in FULL:
        return dist.MultivariateNormal(loc, **{structure: params[structure]})
    if structure.startswith("lowrank"):
        return dist.LowRankMultivariateNormal(loc, params["cov_factor"], params["cov_diag"])
    raise ValueError(structure)


def dense_cov(structure: str, params: Mapping) -> np.ndarray:
    """Dense covariance (float64 NumPy), computed from the parameters without numpyro_gkl."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    if structure == "diag":
        return p["scale"][..., :, None] ** 2 * np.eye(p["scale"].shape[-1])
    if structure == "scale_tril":
        tril = np.tril(p["scale_tril"])
        return tril @ np.swapaxes(tril, -1, -2)
    if structure == "covariance_matrix":
        return p["covariance_matrix"]
    if structure == "precision_matrix":
        return np.linalg.inv(p["precision_matrix"])
    if structure.startswith("lowrank"):
        w, d = p["cov_factor"], p["cov_diag"]
        return w @ np.swapaxes(w, -1, -2) + d[..., :, None] * np.eye(d.shape[-1])
    raise ValueError(structure)


def cast(params: Mapping, dtype) -> dict:
    return {k: np.asarray(v, dtype=dtype) for k, v in params.items()}


@dataclass(frozen=True)
class Built:
    """A NumPyro distribution and its dense float64 reference."""

    structure: str
    params: dict
    dist: dist.Distribution
    loc: np.ndarray  # batch + (K,)
    cov: np.ndarray  # batch + (K, K)


def build(structure: str, params: Mapping, dtype=np.float64) -> Built:
    """Rounds ``params`` to ``dtype`` first, so distribution and reference see the same inputs."""
    params = cast(params, dtype)
    d = make_dist(structure, {k: jnp.asarray(v) for k, v in params.items()})
    return Built(
        structure,
        params,
        d,
        np.asarray(params["loc"], dtype=np.float64),
        dense_cov(structure, params),
    )


def random_gaussian(rng, structure: str, k: int, batch_shape=(), dtype=np.float64) -> Built:
    return build(structure, random_params(rng, structure, k, batch_shape), dtype)


# --------------------------------------------------------------------------------------------
# dense float64 references
# --------------------------------------------------------------------------------------------


def dense_kl(mp, sp, mq, sq) -> np.ndarray:
    """KL(N(mp, sp) ‖ N(mq, sq)) by the textbook formula, float64, batched like NumPy.

    0.5 * (tr(Sq⁻¹ Sp) + dᵀ Sq⁻¹ d − K + log|Sq| − log|Sp|)
    """
    mp, sp, mq, sq = (np.asarray(a, dtype=np.float64) for a in (mp, sp, mq, sq))
    k = mp.shape[-1]
    batch = np.broadcast_shapes(mp.shape[:-1], sp.shape[:-2], mq.shape[:-1], sq.shape[:-2])
    mp = np.broadcast_to(mp, (*batch, k))
    mq = np.broadcast_to(mq, (*batch, k))
    sp = np.broadcast_to(sp, (*batch, k, k))
    sq = np.broadcast_to(sq, (*batch, k, k))
    d = mp - mq
    trace = np.trace(np.linalg.solve(sq, sp), axis1=-2, axis2=-1)
    maha = np.einsum("...i,...i->...", d, np.linalg.solve(sq, d[..., None])[..., 0])
    logdet_q = np.linalg.slogdet(sq)[1]
    logdet_p = np.linalg.slogdet(sp)[1]
    return 0.5 * (trace + maha - k + logdet_q - logdet_p)


def dense_entropy(cov) -> np.ndarray:
    cov = np.asarray(cov, dtype=np.float64)
    k = cov.shape[-1]
    return 0.5 * (k * (1.0 + np.log(2 * np.pi)) + np.linalg.slogdet(cov)[1])


def built_kl(p: Built, q: Built) -> np.ndarray:
    return dense_kl(p.loc, p.cov, q.loc, q.cov)


def normal_kl(mp, sp, mq, sq) -> np.ndarray:
    """Elementwise KL between scalar normals with scales sp, sq (float64 NumPy)."""
    mp, sp, mq, sq = (np.asarray(a, dtype=np.float64) for a in (mp, sp, mq, sq))
    r = (sp / sq) ** 2
    return 0.5 * (r + ((mp - mq) / sq) ** 2 - 1.0 - np.log(r))


def assert_close(actual, expected, rtol, atol=0.0, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), (what, actual)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)
