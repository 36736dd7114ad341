"""Bad input: every case of docs/robustness.md gives its documented outcome, never a finite wrong
number.

``test_fuzz_values`` (hypothesis) draws a program (structure pair, K, q per batch element or
shared, wrapper: none, ``expand`` or ``mask``, a dtype on each side, jit or eager with validation
off) from a fixed list, so that its compilation is reused, and then the values: random or
near-equal parameters (the latter send the full/low-rank pairs through their exact-residual
branch) and where each corruption sits. One call evaluates a batch whose element 0 is valid and
every other element carries one corruption of the table on p, on q or on both; each element must
be exact (dense float64 reference from conftest), NaN, or, for an infinite off-diagonal entry,
NaN or +inf. ``test_fuzz_shapes`` (hypothesis) draws event shapes (sometimes different, sometimes
not vectors), batch shapes (sometimes not broadcasting) and non-Gaussian partners, and checks the
error that the shapes decide, at trace time, from ``kl_divergence`` and from ``gaussian_kl`` on
the common forms. x64 off: one subprocess runs more programs in float32 and checks that importing
numpyro_gkl leaves NumPyro's validation setting alone.
"""

from __future__ import annotations

import pathlib
import textwrap
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from conftest import (
    FULL,
    STRUCTURES,
    assert_close,
    dense_cov,
    dense_entropy,
    dense_kl,
    make_dist,
    random_params,
    random_tril,
    rng_for,
    run_python,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from numpyro.distributions.kl import kl_divergence
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from numpyro_gkl import TraceAnalytic_ELBO, as_gaussian, entropy, gaussian_kl

# --------------------------------------------------------------------------------------------
# the corruptions of the table, put into one batch element of a parameter dict
# --------------------------------------------------------------------------------------------

EXACT, NAN, NAN_OR_INF = "exact", "NaN", "NaN or +inf"
#: corruption -> documented KL outcome
KL_OUTCOME = {
    "scale zero": NAN,
    "scale negative": NAN,
    "scale all negative": NAN,  # on both sides log((-a)/(-b)) would be finite
    "scale nan": NAN,
    "scale inf": NAN,
    "not positive definite": NAN,
    "off-diagonal nan": NAN,
    "off-diagonal inf": NAN_OR_INF,
    "upper triangle": EXACT,  # ignored, as NumPyro's log_prob ignores it
    "loc nan": NAN,
    "loc inf": NAN,
    "loc -inf": NAN,
}
#: scale parameter whose entries (diagonal entries for scale_tril) must be positive
DIAG_KEY = {"normal": "scale", "diag": "scale", "scale_tril": "scale_tril"}


def corrupt(structure: str, params: dict, i: int, kind: str, rng: np.random.Generator) -> bool:
    """Puts corruption ``kind`` into batch element ``i`` of ``params`` (in place), at a position
    drawn from ``rng``; False if the structure has no such parameter."""
    k = params["loc"].shape[-1]
    j = int(rng.integers(k))
    row = int(rng.integers(1, k))
    col = int(rng.integers(row))
    if kind.startswith("loc"):
        params["loc"][i, j] = {"loc nan": np.nan, "loc inf": np.inf, "loc -inf": -np.inf}[kind]
        return True
    key = DIAG_KEY.get(structure, "cov_diag" if structure.startswith("lowrank") else None)
    if kind.startswith("scale") and key is not None:
        diag = np.einsum("jj->j", params[key][i]) if key == "scale_tril" else params[key][i]
        diag = diag.copy()
        if kind == "scale all negative":
            diag = -diag
        else:
            diag[j] = {"scale zero": 0.0, "scale nan": np.nan, "scale inf": np.inf}.get(
                kind, -diag[j]
            )
        if key == "scale_tril":
            params[key][i][np.diag_indices(k)] = diag
        else:
            params[key][i] = diag
        return True
    if kind == "not positive definite" and structure in ("covariance_matrix", "precision_matrix"):
        w, v = np.linalg.eigh(params[structure][i])
        w[j] = -w[j]
        params[structure][i] = (v * w) @ v.T
        return True
    if kind.startswith("off-diagonal"):
        value = np.nan if kind == "off-diagonal nan" else np.inf
        if structure == "scale_tril":
            params["scale_tril"][i, row, col] = value
        elif structure.startswith("lowrank"):
            params["cov_factor"][i, j, -1] = value
        elif structure in FULL and value != np.inf:  # a symmetric NaN pair
            params[structure][i, row, col] = params[structure][i, col, row] = value
        else:
            return False
        return True
    if kind == "upper triangle" and structure == "scale_tril":
        params["scale_tril"][i, col, row] = 7.0
        return True
    return False


def applicable(structure: str, kind: str) -> bool:
    shapes = random_params(np.random.default_rng(0), _base(structure), 3, (1,))
    fake = {n: np.ones(v.shape) for n, v in shapes.items()}
    return corrupt(structure, fake, 0, kind, np.random.default_rng(0))


def _base(structure: str) -> str:
    return "diag" if structure == "normal" else structure


def build(structure: str, params: dict) -> dist.Distribution:
    if structure == "normal":  # scalar events: batch (…, K)
        return dist.Normal(params["loc"], params["scale"])
    return make_dist(structure, params)


def reference_cov(structure: str, params: dict, dtype: str) -> np.ndarray:
    """Dense covariance of one valid element; for covariance and precision matrices from the
    ``scale_tril`` NumPyro computes at construction (in ``dtype``), so that its rounding is in
    the reference."""
    if structure in ("covariance_matrix", "precision_matrix"):
        arrays = {n: jnp.asarray(v.astype(dtype)) for n, v in params.items()}
        tril = make_dist(structure, arrays).scale_tril
        return dense_cov("scale_tril", {"scale_tril": np.asarray(tril)})
    return dense_cov(_base(structure), params)


def near(sp: str, sq: str, pp: dict, k: int) -> dict:
    """Parameters of structure ``sq`` for p's mean and covariance: KL ≈ 0, which sends the
    full/low-rank pairs through their exact-residual branch."""
    cov = dense_cov(_base(sp), pp)
    out = {"loc": pp["loc"].copy()}
    if sq in ("normal", "diag"):
        out["scale"] = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
    elif sq == "scale_tril":
        out["scale_tril"] = np.linalg.cholesky(cov)
    elif sq == "covariance_matrix":
        out["covariance_matrix"] = cov
    elif sq == "precision_matrix":
        out["precision_matrix"] = np.linalg.inv(cov)
    else:
        d = 0.5 * np.linalg.eigvalsh(cov)[..., :1]
        out["cov_diag"] = np.broadcast_to(d, cov.shape[:-1]).copy()
        out["cov_factor"] = np.linalg.cholesky(cov - d[..., None] * np.eye(k))
    return out


# --------------------------------------------------------------------------------------------
# one case: a batch of corruptions, evaluated in one call
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """What decides the compilation."""

    sp: str
    sq: str
    k: int
    shared: bool  # q has batch (1,); otherwise one q per element
    wrapper: str  # "plain", "expand", "mask"
    dtypes: tuple[str, str]
    jit: bool


@dataclass(frozen=True)
class Case:
    program: Program
    near: bool  # q has p's covariance (diagonal q: only for diagonal p)
    seed: int  # parameters and corruption positions
    q_kind: str  # the corruption of a shared q (second call)


def _kl_entropy(sp, sq, wrapper, a, b, masks):
    p, q = build(sp, a), build(sq, b)
    h = entropy(as_gaussian(p))
    if wrapper == "expand":
        p, q = p.expand((2, *p.batch_shape)), q.expand((2, *q.batch_shape))
    elif wrapper == "mask":
        mp, mq = (m[:, None] for m in masks) if sp == "normal" else masks
        p, q = p.mask(mp), q.mask(mq)
    return kl_divergence(p, q), h


_KL_ENTROPY_JIT = jax.jit(_kl_entropy, static_argnums=(0, 1, 2))


def _evaluate(prog: Program, a: dict, b: dict, masks: tuple) -> tuple[np.ndarray, np.ndarray]:
    """KL as (rows, elements) and entropy of p per element; the KL's dtype must be that of all
    parameters together (float64 as soon as one side is, with x64 on)."""
    a = {n: jnp.asarray(v.astype(prog.dtypes[0])) for n, v in a.items()}
    b = {n: jnp.asarray(v.astype(prog.dtypes[1])) for n, v in b.items()}
    if prog.jit:
        kl, h = _KL_ENTROPY_JIT(prog.sp, prog.sq, prog.wrapper, a, b, masks)
    else:
        with numpyro.validation_enabled(False):
            kl, h = _kl_entropy(prog.sp, prog.sq, prog.wrapper, a, b, masks)
    assert kl.dtype == jnp.result_type(*a.values(), *b.values()), (kl.dtype, prog)
    kl, h = np.asarray(kl, np.float64), np.asarray(h, np.float64)
    if prog.sp == "normal":  # scalar events: one KL per coordinate
        kl, h = kl.sum(-1), h.sum(-1)
    return kl.reshape(-1, kl.shape[-1]), h


def _assert_outcome(values: np.ndarray, outcome: str, ref: float, tol: tuple, what) -> None:
    if outcome == EXACT:
        np.testing.assert_allclose(values, ref, rtol=tol[0], atol=tol[1], err_msg=str(what))
    elif outcome == NAN:
        assert np.all(np.isnan(values)), (what, values)
    else:
        assert np.all(np.isnan(values) | (values == np.inf)), (what, values)


def _tolerance(k: int, *dtypes: str) -> tuple[float, float]:
    """(rtol, atol) for a result computed in the promotion of ``dtypes``."""
    f64 = jnp.result_type(*(jnp.zeros((), d) for d in dtypes)) == jnp.float64
    return (1e-9, 1e-12 * k) if f64 else (1e-4, 1e-5 * k)


def _entropy_outcome(structure: str, kind: str) -> str:
    """H = ½ K log 2πe + Σ log Lᵢᵢ does not read a factor's off-diagonal entries."""
    if structure == "scale_tril" and kind.startswith(("off-diagonal", "upper")):
        return EXACT
    return NAN_OR_INF if kind == "off-diagonal inf" else NAN


def check_case(case: Case) -> None:
    """Evaluates one case (and, for a shared q, a second call with q corrupted) and checks every
    element against its documented outcome."""
    prog = case.program
    rng = rng_for("bad input", case)
    pp = random_params(rng, _base(prog.sp), prog.k, (1,))
    if case.near and (prog.sq not in ("normal", "diag") or prog.sp in ("normal", "diag")):
        qq = near(prog.sp, prog.sq, pp, prog.k)
    else:
        qq = random_params(rng, _base(prog.sq), prog.k, (1,))
    pp, qq = (
        {n: v.astype(d).astype(np.float64) for n, v in x.items()}
        for x, d in ((pp, prog.dtypes[0]), (qq, prog.dtypes[1]))
    )
    cov_p = reference_cov(prog.sp, {n: v[0] for n, v in pp.items()}, prog.dtypes[0])
    cov_q = reference_cov(prog.sq, {n: v[0] for n, v in qq.items()}, prog.dtypes[1])
    ref_kl = float(dense_kl(pp["loc"][0], cov_p, qq["loc"][0], cov_q))
    ref_h = float(dense_entropy(cov_p))  # for "normal": the K scalar entropies, summed
    tol, tol_h = _tolerance(prog.k, *prog.dtypes), _tolerance(prog.k, prog.dtypes[0])

    rows = [("valid", None)]
    for side in ("p",) if prog.shared else ("p", "q", "both"):
        for kind in KL_OUTCOME:
            ok_p = side == "q" or applicable(prog.sp, kind)
            ok_q = side == "p" or applicable(prog.sq, kind)
            if ok_p and ok_q:
                rows.append((side, kind))
    n = len(rows)
    a = {name: np.repeat(v, n, 0) for name, v in pp.items()}
    b = {name: np.repeat(v, 1 if prog.shared else n, 0) for name, v in qq.items()}
    for i, (side, kind) in enumerate(rows):
        if side in ("p", "both"):
            corrupt(prog.sp, a, i, kind, rng)
        if side in ("q", "both"):
            corrupt(prog.sq, b, i, kind, rng)
    expect = [EXACT if kind is None else KL_OUTCOME[kind] for _, kind in rows]
    # masks: every other NaN element masked out (masking hides no bad parameter); q masked out
    # where a factor has an upper triangle, so that the result is E_p[log p] = −H(p) there
    mask_p = np.array([e != NAN or i % 2 == 0 for i, e in enumerate(expect)])
    upper = np.array([kind == "upper triangle" for _, kind in rows])
    kl, h = _evaluate(prog, a, b, (mask_p, mask_p & ~upper))
    for i, (side, kind) in enumerate(rows):
        ref = -ref_h if upper[i] and prog.wrapper == "mask" else ref_kl
        _assert_outcome(kl[:, i], expect[i], ref, tol, (case, side, kind, "KL"))
        outcome = EXACT if side in ("valid", "q") else _entropy_outcome(prog.sp, kind)
        _assert_outcome(h[i], outcome, ref_h, tol_h, (case, side, kind, "entropy"))
    if prog.shared and applicable(prog.sq, case.q_kind):
        b = {name: v.copy() for name, v in qq.items()}
        corrupt(prog.sq, b, 0, case.q_kind, rng)
        a = {name: np.repeat(v, n, 0) for name, v in pp.items()}
        kl, _ = _evaluate(prog, a, b, (np.ones(n, bool), np.ones(n, bool)))
        _assert_outcome(kl, KL_OUTCOME[case.q_kind], ref_kl, tol, (case, "shared q"))


F32, F64 = "float32", "float64"
#: x64 on; together with X64_OFF every structure is p and q, every structure class pair
#: (diagonal / full / low rank) occurs, with q shared and not, under every wrapper and dtype mix
PROGRAMS = (
    Program("normal", "normal", 3, False, "mask", (F64, F32), True),
    Program("diag", "scale_tril", 9, True, "plain", (F64, F64), True),
    Program("scale_tril", "diag", 3, False, "mask", (F64, F32), False),
    Program("covariance_matrix", "scale_tril", 9, True, "expand", (F32, F64), True),
    Program("scale_tril", "lowrank1", 3, False, "plain", (F64, F32), True),
    Program("lowrank3", "precision_matrix", 9, True, "mask", (F32, F64), True),
    Program("diag", "lowrank3", 3, True, "plain", (F64, F32), True),
    Program("lowrank3", "lowrank1", 9, False, "expand", (F32, F64), True),
    Program("lowrank1", "diag", 9, True, "expand", (F64, F64), True),
    Program("scale_tril", "scale_tril", 3, False, "plain", (F64, F64), True),
)
X64_OFF = (
    Case(Program("precision_matrix", "covariance_matrix", 9, False, "plain", (F32, F32), True),
         False, 0, "scale nan"),
    Case(Program("lowrank1", "scale_tril", 3, False, "mask", (F32, F32), True), True, 2,
         "scale zero"),
    Case(Program("diag", "diag", 3, True, "plain", (F32, F32), False), False, 3, "loc inf"),
)  # fmt: skip


@settings(max_examples=15)
@given(
    case=st.builds(
        Case,
        program=st.sampled_from(PROGRAMS),
        near=st.booleans(),
        seed=st.integers(0, 2**16),
        q_kind=st.sampled_from(list(KL_OUTCOME)),
    )
)
def test_fuzz_values(case):
    check_case(case)


# --------------------------------------------------------------------------------------------
# shapes: ValueError / NotImplementedError at trace time
# --------------------------------------------------------------------------------------------

SHAPE_KINDS = ("normal", "diag", "matrix", "scale_tril", "covariance_matrix", "lowrank1", "beta")
BATCHES = ((), (2,), (3,), (2, 1), (1, 3))


def shaped(kind: str, k: int, batch: tuple) -> dist.Distribution:
    with numpyro.validation_enabled(False):  # valid parameters: skip NumPyro's eager checks
        return _shaped(kind, k, batch)


def _shaped(kind: str, k: int, batch: tuple) -> dist.Distribution:
    if kind == "normal":
        return dist.Normal(np.zeros((*batch, k)), 1.0)
    if kind == "matrix":
        return dist.Normal(np.zeros((*batch, 2, k)), 1.0).to_event(2)
    if kind == "beta":
        return dist.Beta(2.0, 3.0).expand((*batch, k)).to_event(1)
    return make_dist(kind, random_params(np.random.default_rng(0), kind, k, batch))


def expected_error(kp, kq, p, q) -> type[Exception] | None:
    """The documented outcome decided by the shapes (docs/robustness.md), found without the
    code under test."""
    if "beta" in (kp, kq):
        return NotImplementedError
    diagonal = {"normal", "diag", "matrix"}
    vectors = len(p.event_shape) == 1 and len(q.event_shape) == 1
    if not (kp in diagonal and kq in diagonal) and not vectors:
        return NotImplementedError
    if p.event_shape != q.event_shape:
        return ValueError
    try:
        np.broadcast_shapes(p.batch_shape, q.batch_shape)
    except ValueError:
        return ValueError
    return None


def _kl(p, q):  # jax.jit / eval_shape of the Dispatcher itself fails (no weak reference)
    return kl_divergence(p, q)


def _names(d) -> list[str]:
    return [type(d).__name__, str(tuple(d.batch_shape)), str(tuple(d.event_shape))]


@settings(max_examples=30)
@given(
    kinds=st.tuples(st.sampled_from(SHAPE_KINDS), st.sampled_from(SHAPE_KINDS)).filter(
        lambda ks: ks != ("beta", "beta")
    ),
    ks=st.tuples(st.sampled_from([3, 3, 4]), st.sampled_from([3, 3, 1])),
    batches=st.tuples(st.sampled_from(BATCHES), st.sampled_from(BATCHES)),
)
def test_fuzz_shapes(kinds, ks, batches):
    p, q = (shaped(kind, k, b) for kind, k, b in zip(kinds, ks, batches, strict=True))
    error = expected_error(*kinds, p, q)
    forms = None if "beta" in kinds else (as_gaussian(p), as_gaussian(q))
    if error is None:
        shape = jax.eval_shape(_kl, p, q).shape
        assert shape == np.broadcast_shapes(p.batch_shape, q.batch_shape)
        assert jax.eval_shape(lambda: gaussian_kl(*forms)).shape == shape
        return
    with pytest.raises(error) as info:
        jax.eval_shape(_kl, p, q)
    if error is ValueError:  # names both distributions and their shapes
        for name in (*_names(p), *_names(q)):
            assert name in str(info.value), (name, str(info.value))
    if forms is not None:
        with pytest.raises(error) as info:
            jax.eval_shape(lambda: gaussian_kl(*forms))
        if error is ValueError:
            for name in (*_names(forms[0]), *_names(forms[1])):
                assert name in str(info.value), (name, str(info.value))


# --------------------------------------------------------------------------------------------
# validation, TraceAnalytic_ELBO, x64 off
# --------------------------------------------------------------------------------------------

#: corruptions NumPyro's constraints let through at construction (``positive`` admits +inf, and
#: ``lower_cholesky`` infinite off-diagonal entries); the KL is still NaN or +inf
VALIDATION_PASSES = {
    *((s, "scale inf") for s in ("normal", "diag", "scale_tril", "lowrank1", "lowrank3")),
    ("scale_tril", "off-diagonal inf"),
}


@pytest.mark.parametrize("structure", ["normal", *STRUCTURES])
def test_validation_raises_numpyros_error(structure):
    """With validation on, constructing an invalid distribution raises NumPyro's own error."""
    for kind in KL_OUTCOME:
        params = random_params(np.random.default_rng(1), _base(structure), 3, (1,))
        if not corrupt(structure, params, 0, kind, np.random.default_rng(1)):
            continue
        with numpyro.validation_enabled(True):
            if (structure, kind) in VALIDATION_PASSES:
                build(structure, params)
            else:
                with pytest.raises(ValueError):  # a LinAlgError for a NaN covariance matrix
                    build(structure, params)


@pytest.mark.parametrize(
    ("k", "value"), [(5, np.nan), (5, np.inf), (5, -np.inf), (150, np.nan), (150, np.inf)]
)
def test_non_finite_upper_triangle_is_ignored_with_its_gradient(k, value):
    """A NaN or ±inf above the diagonal of p's ``scale_tril`` (KL against a diagonal q, whose
    triangle's sum of squares is, at K = 5, a product with a 0/1 mask, 0 · inf = NaN, with a
    fallback, and at K = 150 a sum by blocks of rows): the KL is the dense reference, the
    gradient's lower triangle is dKL/dL = tril(Σq⁻¹L − L⁻ᵀ) and its upper triangle exactly zero;
    eagerly, under jit and under a vmap over the batch (which evaluates both branches)."""
    rng = rng_for("non-finite upper", k, str(value))
    b = 3
    lp = random_tril(rng, k, (b,))
    mp, mq, s = rng.normal(size=(b, k)), rng.normal(size=k), np.exp(rng.uniform(-0.5, 0.5, k))
    bad = lp.copy()
    bad[1, 0, 3] = bad[2, k - 2, k - 1] = value
    want = dense_kl(mp, lp @ np.swapaxes(lp, -1, -2), mq, np.diag(s**2))
    want_grad = np.tril(lp / s[:, None] ** 2 - np.swapaxes(np.linalg.inv(lp), -1, -2))

    def kl(m, tril):
        return kl_divergence(
            dist.MultivariateNormal(m, scale_tril=tril, validate_args=False),
            dist.Normal(mq, s).to_event(1),
        )

    grad = jax.grad(lambda tril: jnp.sum(kl(mp, tril)))
    for label, got, got_grad in (
        ("eager", kl(mp, bad), grad(bad)),
        ("jit", jax.jit(kl)(mp, bad), jax.jit(grad)(bad)),
        ("vmap", jax.vmap(kl)(mp, bad), jax.vmap(jax.grad(kl, 1))(mp, bad)),
    ):
        assert_close(got, want, rtol=1e-10, what=label)
        got_grad = np.asarray(got_grad)
        assert np.all(np.triu(got_grad, 1) == 0.0), (label, got_grad)
        assert_close(np.tril(got_grad), want_grad, rtol=1e-9, atol=1e-12, what=label)


def _prior_model():
    numpyro.sample("z", dist.MultivariateNormal(jnp.zeros(3), jnp.eye(3)))


def _sitewise_guide():
    m = numpyro.param("m", jnp.zeros(3))
    s = numpyro.param("s", jnp.ones(3))
    numpyro.sample("z", dist.Normal(m, s).to_event(1))


@pytest.mark.parametrize("guide", ["sitewise", "AutoMultivariateNormal", "AutoNormal"])
def test_elbo_nan_guide_param_gives_nan_loss(guide):
    """A NaN guide location gives a NaN loss under jit (no validation there), never a finite
    one, whichever closed form the guide's terms use."""
    autos = {"AutoMultivariateNormal": AutoMultivariateNormal, "AutoNormal": AutoNormal}
    g = autos[guide](_prior_model) if guide in autos else _sitewise_guide
    elbo = TraceAnalytic_ELBO()
    svi = SVI(_prior_model, g, numpyro.optim.Adam(0.01), elbo)
    params = svi.get_params(svi.init(jax.random.PRNGKey(0)))
    name = next(n for n in params if n.endswith(("loc", "m")))
    params[name] = params[name].at[1].set(jnp.nan)
    loss = jax.jit(lambda prm: elbo.loss(jax.random.PRNGKey(1), prm, _prior_model, g))(params)
    assert np.isnan(loss), (name, loss)


@pytest.mark.parametrize(
    "site",
    [dist.Normal(jnp.zeros(4), 1.0).to_event(1), dist.Normal(jnp.zeros((1, 3)), 1.0).to_event(2)],
)
def test_elbo_shape_mismatch_names_the_site(site):
    """NumPyro's own model/guide check raises first, naming the site (shapes, event dims)."""

    def guide():
        numpyro.sample("z", site)

    with pytest.raises(ValueError, match="disagree at site 'z'"):
        TraceAnalytic_ELBO().loss(jax.random.PRNGKey(0), {}, _prior_model, guide)


def test_x64_off_and_validation_setting():
    """One fresh interpreter: the import keeps NumPyro's validation setting (both ways), and
    float32 programs (x64 off) give their documented outcomes."""
    tests = pathlib.Path(__file__).resolve().parent
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tests)!r})
        import numpyro, numpyro.distributions as dist

        def raises():
            try:
                dist.Normal(0.0, -1.0)
            except ValueError:
                return True
            return False

        before = raises()
        import numpyro_gkl
        assert raises() == before, "import changed the validation setting"
        numpyro.enable_validation(False)
        assert not raises()
        numpyro.enable_validation(True)
        assert raises()
        import jax
        import test_bad_input as t  # imports conftest, which switches x64 on
        jax.config.update("jax_enable_x64", False)
        for case in t.X64_OFF:
            t.check_case(case)
        print("ok")
        """
    )
    out = run_python(code)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
