"""Float32 accuracy of the Gaussian KL on nearly identical pairs: numpyro-gkl and upstream NumPyro.

Run from the repository root::

    PYTHONPATH=. python benchmarks/accuracy.py [--quick] [--markdown]

For every pair class (p's structure – q's structure, each of diagonal ``Independent(Normal)``,
full ``MultivariateNormal`` and ``LowRankMultivariateNormal``) and K ∈ {2, 8, 32, 128, 512}, pairs
are drawn around a common base covariance and location, each side perturbed independently by a
relative amount ε, so that KL(p‖q) = O(K ε²) spans about 1e-7 … 1. The KL is evaluated in float32
(under ``jax.jit``) by

- ``ours``: ``kl_divergence`` with numpyro-gkl registered;
- ``upstream``: NumPyro's own rule, with numpyro-gkl unregistered while it is traced, for the two
  classes upstream has (``MultivariateNormal``–``MultivariateNormal`` and
  ``Independent(Normal)``–``Independent(Normal)``).

The reference is computed in float64 from the same float32 inputs, stably: with Lq = chol(Σq),
E = Lq⁻¹ (Σp − Σq) Lq⁻ᵀ and its eigenvalues e,
KL = ½ (Σ (e − log1p(e)) + ‖Lq⁻¹ δ‖²), e − log1p(e) by its series for small |e|.
Only cases with reference KL in [1e-7, 3] are scored. Relative error = |KL − ref| / ref.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from _common import machine_line, render_table
from numpyro.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)
from numpyro.distributions.kl import kl_divergence

import numpyro_gkl

KINDS = ("diag", "full", "lowrank")
PAIRS = (
    ("diag", "diag"),
    ("full", "full"),
    ("diag", "full"),
    ("full", "diag"),
    ("lowrank", "diag"),
    ("diag", "lowrank"),
    ("lowrank", "lowrank"),
    ("full", "lowrank"),
    ("lowrank", "full"),
)
UPSTREAM_PAIRS = {("diag", "diag"), ("full", "full")}
KS_FULL = (2, 8, 32, 128, 512)
KS_QUICK = (2, 32, 128)
EPS_FULL = tuple(10.0**e for e in np.linspace(-6.0, -0.5, 12))
EPS_QUICK = tuple(10.0**e for e in np.linspace(-5.5, -0.5, 6))
DRAWS = 8
KL_RANGE = (1e-7, 3.0)
KL_BANDS = ((1e-7, 1e-5), (1e-5, 1e-3), (1e-3, 1e-1), (1e-1, 3.0))
TARGET_MEDIAN, TARGET_WORST = 1e-5, 1e-4


# --------------------------------------------------------------------------------------------
# Nearly identical pairs


@dataclass(frozen=True)
class Side:
    """Float32 parameters of one Gaussian: ``loc`` and ``scale`` (σ), ``tril`` or ``(W, D)``."""

    kind: str
    loc: np.ndarray
    params: tuple[np.ndarray, ...]

    def covariance(self) -> np.ndarray:
        """Σ in float64 from the float32 parameters."""
        p = [x.astype(np.float64) for x in self.params]
        if self.kind == "diag":
            return _diag_embed(np.square(p[0]))
        if self.kind == "full":
            return p[0] @ np.swapaxes(p[0], -1, -2)
        w, d = p
        return _diag_embed(d) + w @ np.swapaxes(w, -1, -2)


def _diag_embed(v: np.ndarray) -> np.ndarray:
    return v[..., :, None] * np.eye(v.shape[-1])


def _rank(k: int) -> int:
    return max(1, min(4, k // 2))


def make_side(kind: str, rng: np.random.Generator, base: dict[str, np.ndarray], eps: float) -> Side:
    """One side of a pair: the base (location μ0, diagonal D0, factor W0) perturbed by ``eps``."""
    mu0, d0, w0 = base["mu"], base["d"], base["w"]
    n, k = d0.shape
    loc = mu0 + eps * rng.standard_normal((n, k)) * np.sqrt(d0)
    if kind == "diag":
        params: tuple = (np.sqrt(d0) * np.exp(eps * rng.standard_normal((n, k))),)
    elif kind == "lowrank":
        dw = eps * rng.standard_normal(w0.shape) * np.sqrt(d0)[..., None] / math.sqrt(w0.shape[-1])
        params = (w0 + dw, d0 * np.exp(eps * rng.standard_normal((n, k))))
    else:
        l0 = np.linalg.cholesky(_diag_embed(d0) + w0 @ np.swapaxes(w0, -1, -2))
        z = rng.standard_normal((n, k, k))
        # Off-diagonal part scaled by 1/√K: a random triangular I + N is otherwise ill-conditioned.
        off = eps / math.sqrt(k) * np.tril(z, -1)
        pert = off + _diag_embed(np.expm1(eps * np.diagonal(z, 0, -2, -1)))
        params = (l0 @ (np.eye(k) + pert),)
    return Side(kind, loc.astype(np.float32), tuple(x.astype(np.float32) for x in params))


def make_pair(p_kind: str, q_kind: str, k: int, eps: float, seed: int) -> tuple[Side, Side]:
    """``DRAWS`` pairs (batched) of the given structures, at relative distance about ``eps``.

    Where one side is diagonal the shared low-rank part W0 is O(√ε) (so Σp − Σq stays O(ε));
    otherwise it is O(1).
    """
    rng = np.random.default_rng(seed)
    r = _rank(k)
    d0 = np.exp(0.5 * rng.standard_normal((DRAWS, k)))
    w_scale = math.sqrt(eps) if "diag" in (p_kind, q_kind) else 1.0
    base = {
        "mu": rng.standard_normal((DRAWS, k)) * np.sqrt(d0),
        "d": d0,
        "w": w_scale * rng.standard_normal((DRAWS, k, r)) * np.sqrt(d0)[..., None] / math.sqrt(r),
    }
    return make_side(p_kind, rng, base, eps), make_side(q_kind, rng, base, eps)


# --------------------------------------------------------------------------------------------
# Reference and the evaluated KLs


def _x_minus_log1p(e: np.ndarray) -> np.ndarray:
    """e − log1p(e) in float64; the series Σ_{n≥2} (−e)ⁿ/n where |e| < 1e-2."""
    small = np.abs(e) < 1e-2
    es = np.where(small, e, 0.0)
    series = sum((-1.0) ** n * es**n / n for n in range(2, 12))
    return np.where(small, series, e - np.log1p(np.where(small, 0.0, e)))


def reference_kl(p: Side, q: Side) -> np.ndarray:
    """KL(p‖q) in float64 from the float32 inputs, without cancellation (see module docstring)."""
    sp, sq = p.covariance(), q.covariance()
    lq = np.linalg.cholesky(sq)
    a = np.linalg.solve(lq, sp - sq)
    e_mat = np.linalg.solve(lq, np.swapaxes(a, -1, -2))
    e_mat = 0.5 * (e_mat + np.swapaxes(e_mat, -1, -2))
    e = np.linalg.eigvalsh(e_mat)
    delta = p.loc.astype(np.float64) - q.loc.astype(np.float64)
    z = np.linalg.solve(lq, delta[..., None])[..., 0]
    return 0.5 * (np.sum(_x_minus_log1p(e), -1) + np.sum(np.square(z), -1))


def _numpyro_dist(kind: str, loc: jax.Array, params: Sequence[jax.Array]) -> Distribution:
    if kind == "diag":
        return Independent(Normal(loc, params[0]), 1)
    if kind == "full":
        return MultivariateNormal(loc, scale_tril=params[0])
    return LowRankMultivariateNormal(loc, params[0], params[1])


def _upstream_kl(p: Distribution, q: Distribution) -> jax.Array:
    """NumPyro's own ``kl_divergence``, numpyro-gkl unregistered while it runs (or is traced)."""
    numpyro_gkl.unregister()
    try:
        return kl_divergence(p, q)
    finally:
        numpyro_gkl.register()


def _ours_kl(p: Distribution, q: Distribution) -> jax.Array:
    """``kl_divergence`` with the numpyro-gkl rules (registered on import)."""
    if not numpyro_gkl.is_registered():
        raise RuntimeError("numpyro_gkl rules are not registered")
    return kl_divergence(p, q)


@functools.cache
def _jitted(kl: Callable, p_kind: str, q_kind: str) -> Callable:
    """``jax.jit`` of ``kl`` on the NumPyro distributions built from arrays (compiled per shape)."""

    def fn(pl: jax.Array, pp: tuple, ql: jax.Array, qp: tuple) -> jax.Array:
        return kl(_numpyro_dist(p_kind, pl, pp), _numpyro_dist(q_kind, ql, qp))

    return jax.jit(fn)


def evaluate(kl: Callable, p: Side, q: Side) -> np.ndarray:
    """``kl`` of the NumPyro distributions of ``p`` and ``q``, in float32 under ``jax.jit``."""
    out = _jitted(kl, p.kind, q.kind)(p.loc, p.params, q.loc, q.params)
    return np.asarray(out, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class Errors:
    """Reference KLs and relative errors of one pair class, with where each case came from."""

    ref: list[float]
    rel: dict[str, list[float]]
    k: list[int]


def measure_pair(p_kind: str, q_kind: str, ks: Sequence[int], eps_grid: Sequence[float]) -> Errors:
    """All scored cases of one pair class."""
    impls: dict[str, Callable] = {"ours": _ours_kl}
    if (p_kind, q_kind) in UPSTREAM_PAIRS:
        impls["upstream"] = _upstream_kl
    errs = Errors([], {name: [] for name in impls}, [])
    for k in ks:
        for j, eps in enumerate(eps_grid):
            p, q = make_pair(p_kind, q_kind, k, eps, seed=1000 * k + j)
            ref = reference_kl(p, q)
            if ref.min() > KL_RANGE[1]:
                break  # the KL grows with ε: larger ε are out of range too
            keep = (ref >= KL_RANGE[0]) & (ref <= KL_RANGE[1])
            if not keep.any():
                continue
            errs.ref += ref[keep].tolist()
            errs.k += [k] * int(keep.sum())
            for name, kl in impls.items():
                got = evaluate(kl, p, q)
                errs.rel[name] += (np.abs(got - ref) / ref)[keep].tolist()
    return errs


def _fmt(x: float) -> str:
    return f"{x:.1e}"


def _meets(rel: Sequence[float]) -> str:
    ok = np.median(rel) <= TARGET_MEDIAN and np.max(rel) <= TARGET_WORST
    return "yes" if ok else "**no**"


def summary_rows(results: dict[tuple[str, str], Errors]) -> list[list[str]]:
    """One row per pair class: KL range, median and worst relative error per implementation."""
    rows = []
    for (pk, qk), e in results.items():
        ours = np.asarray(e.rel["ours"])
        worst = int(np.argmax(ours))
        row = [
            f"{pk}–{qk}",
            str(len(e.ref)),
            f"{_fmt(min(e.ref))} … {_fmt(max(e.ref))}",
            _fmt(float(np.median(ours))),
            _fmt(float(ours.max())),
            f"K={e.k[worst]}, KL={_fmt(e.ref[worst])}",
            _meets(ours),
        ]
        if "upstream" in e.rel:
            up = np.asarray(e.rel["upstream"])
            row += [_fmt(float(np.median(up))), _fmt(float(up.max())), _meets(up)]
        else:
            row += ["—", "—", "—"]
        rows.append(row)
    return rows


def band_rows(results: dict[tuple[str, str], Errors]) -> list[list[str]]:
    """Worst relative error per KL band, per pair class and implementation."""
    rows = []
    for (pk, qk), e in results.items():
        ref = np.asarray(e.ref)
        for name, rel in e.rel.items():
            rel_a = np.asarray(rel)
            cells = []
            for lo, hi in KL_BANDS:
                sel = (ref >= lo) & (ref < hi)
                cells.append(_fmt(float(rel_a[sel].max())) if sel.any() else "—")
            rows.append([f"{pk}–{qk}", name, *cells])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer K and ε")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    ks = KS_QUICK if args.quick else KS_FULL
    eps_grid = EPS_QUICK if args.quick else EPS_FULL
    results = {}
    for pk, qk in PAIRS:
        print(f"{pk}–{qk}", file=sys.stderr, flush=True)
        results[(pk, qk)] = measure_pair(pk, qk, ks, eps_grid)
    k_list = ", ".join(map(str, ks))
    print(machine_line(f"float32 inputs, K ∈ {{{k_list}}}, {DRAWS} draws per (K, ε)"))
    print()
    header = [
        "p–q",
        "cases",
        "reference KL range",
        "ours median",
        "ours worst",
        "ours worst at",
        "ours ≤ 1e-5 / 1e-4",
        "upstream median",
        "upstream worst",
        "upstream ≤ 1e-5 / 1e-4",
    ]
    print(render_table(header, summary_rows(results), args.markdown))
    print()
    print("Worst relative error by reference-KL band:")
    print()
    bands = [f"[{lo:.0e}, {hi:.0e})" for lo, hi in KL_BANDS]
    print(render_table(["p–q", "impl", *bands], band_rows(results), args.markdown))


if __name__ == "__main__":
    main()
