"""Command line: ``numpyro-gkl demo`` (also ``python -m numpyro_gkl demo``).

``demo`` builds one float32 pair for every structure pair (p = q perturbed where both share a
structure), evaluates KL(p‖q)
with the registered rules and with NumPyro's own rules (where NumPyro has one), and prints each
one's relative error against a float64 evaluation of the textbook formula on the same inputs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

PairMaker = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple]


def _reference(mp: np.ndarray, sp: np.ndarray, mq: np.ndarray, sq: np.ndarray) -> float:
    """KL in float64 through the eigenvalues e of Lq⁻¹(Σp − Σq)Lq⁻ᵀ: ½[Σ e − log1p e + ‖Lq⁻¹δ‖²]."""
    lq = np.linalg.cholesky(sq)
    e = np.linalg.solve(lq, np.linalg.solve(lq, sp - sq).T)
    ev = np.linalg.eigvalsh(0.5 * (e + e.T))
    d = np.linalg.solve(lq, mp - mq)
    return 0.5 * float(np.sum(ev - np.log1p(ev)) + d @ d)


def _pairs(k: int, eps: float, seed: int) -> list[tuple[str, object, object, float]]:
    """(name, p, q, reference) for every structure pair, p = q perturbed by ``eps``."""
    import jax.numpy as jnp
    import numpyro.distributions as dist

    rng = np.random.default_rng(seed)
    f32 = np.float32

    def base() -> dict[str, tuple[object, np.ndarray, np.ndarray]]:
        a = rng.normal(size=(k, k))
        tril = np.linalg.cholesky(a @ a.T / k + np.eye(k)).astype(f32)
        w = (0.5 * rng.normal(size=(k, 2))).astype(f32)
        d = rng.uniform(0.5, 2.0, k).astype(f32)
        s = np.sqrt(d)
        loc = rng.normal(size=k).astype(f32)
        return {"loc": loc, "tril": tril, "w": w, "d": d, "s": s}

    def perturb(x: dict) -> dict:
        out = {
            key: (v + eps * rng.normal(size=v.shape) / np.sqrt(k)).astype(f32)
            for key, v in x.items()
        }
        out["tril"] = np.tril(out["tril"])
        np.fill_diagonal(out["tril"], np.abs(np.diag(out["tril"])))
        out["d"], out["s"] = np.abs(out["d"]), np.abs(out["s"])
        return out

    def build(kind: str, x: dict) -> tuple[object, np.ndarray]:
        loc = jnp.asarray(x["loc"])
        f64 = {key: v.astype(np.float64) for key, v in x.items()}
        if kind == "diagonal":
            return dist.Normal(loc, jnp.asarray(x["s"])).to_event(1), np.diag(f64["s"] ** 2)
        if kind == "full":
            cov = f64["tril"] @ f64["tril"].T
            return dist.MultivariateNormal(loc, scale_tril=jnp.asarray(x["tril"])), cov
        cov = f64["w"] @ f64["w"].T + np.diag(f64["d"])
        return dist.LowRankMultivariateNormal(loc, jnp.asarray(x["w"]), jnp.asarray(x["d"])), cov

    kinds = ("diagonal", "full", "low rank")
    out = []
    for kp in kinds:
        for kq in kinds:
            xq = base()
            xp = perturb(xq)
            p, sp = build(kp, xp)
            q, sq = build(kq, xq)
            ref = _reference(xp["loc"].astype(np.float64), sp, xq["loc"].astype(np.float64), sq)
            out.append((f"{kp} ‖ {kq}", p, q, ref))
    return out


def demo(k: int = 16, eps: float = 1e-3, seed: int = 0) -> None:
    """Prints ours vs NumPyro's float32 relative error for every structure pair."""
    from numpyro.distributions.kl import kl_divergence

    import numpyro_gkl

    pairs = _pairs(k, eps, seed)
    numpyro_gkl.unregister()
    upstream = []
    for _, p, q, _ in pairs:
        try:
            upstream.append(float(kl_divergence(p, q)))
        except NotImplementedError:
            upstream.append(None)
    numpyro_gkl.register()
    print(f"KL(p‖q) in float32, K={k}, q = p perturbed by {eps:g}; relative error vs float64")
    print(f"{'pair':<22}{'KL (float64)':>14}{'numpyro-gkl':>14}{'NumPyro':>14}")
    for (name, p, q, ref), up in zip(pairs, upstream, strict=True):
        ours = abs(float(kl_divergence(p, q)) - ref) / ref
        theirs = "no rule" if up is None else f"{abs(up - ref) / ref:.1e}"
        print(f"{name:<22}{ref:>14.3e}{ours:>14.1e}{theirs:>14}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="numpyro-gkl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="float32 accuracy of every KL pair, ours vs NumPyro's")
    p_demo.add_argument("--dim", type=int, default=16)
    p_demo.add_argument("--eps", type=float, default=1e-3)
    p_demo.add_argument("--seed", type=int, default=0)
    p_report = sub.add_parser(
        "report", help="run the built-in suite and write DIR/report.html with tables and figures"
    )
    p_report.add_argument("--out", type=Path, default=Path("gkl-report"), help="output folder")
    p_report.add_argument("--quick", action="store_true", help="fewer models, draws and steps")
    p_report.add_argument(
        "--models",
        type=lambda text: [name for name in text.split(",") if name],
        default=None,
        metavar="NAME[,NAME...]",
        help="run only these models of the suite (the names the report's tables show)",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.dim, args.eps, args.seed)
    elif args.command == "report":
        from numpyro_gkl.report import build_report

        path = build_report(args.out, quick=args.quick, models=args.models)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
