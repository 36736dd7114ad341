"""Ablation of the full-against-full KL: the shipped form against the forms it replaced.

Run from the repository root::

    PYTHONPATH=. python benchmarks/full_pair_forms.py [--markdown] [--rounds N]

For the cells of ``kl_speed.py`` where ours and upstream NumPyro are closest (full vs full,
float32, K = 8 and 32 with a shared q, K = 32 and 128 with one q per guide; ``fwd`` and
``fwd+grad`` w.r.t. p), the median time of:

- ``upstream``: NumPyro's MVN–MVN rule, captured before registration;
- ``shipped``: ``kl_divergence`` with numpyro-gkl registered (with a shared q the product of
  Lq⁻¹ and D by blocks, differentiated through the product by blocks of 64, the dense one up to
  K = 64; with a q per guide Lq⁻¹[D | δ] by halves, ``linalg.solve_sq_sums``);
- ``inverse``: Lq⁻¹ by blocks and one product per guide, dense up to K = 64 with a shared q and
  K = 128 with a q per guide, blocked above (the previous shipped form with a q per guide);
- ``solve``: Lq⁻¹[D | δ] by XLA's batched triangular solve (LAPACK per matrix), D = tril(Lp − Lq);
- ``masked``: ``inverse``, but the strict lower triangle of Lq⁻¹D masked and summed apart from
  the diagonal term (an earlier form);
- ``scatter``: ``inverse`` with ``jnp.diagonal``, whose derivative is a scatter;
- ``other product``: ``inverse`` with the other product of Lq⁻¹ and D where it uses one product
  both ways (blocked, ``linalg.sq_sum_of_product``, a third of the flops, where
  it is dense; dense where it is blocked), and the blocked one both ways where it mixes them
  (a shared q up to K = 64; ``scatter`` is dense both ways there).

Every form computes the same KL (checked against upstream to 1e-3 relative). A round calls every
form in turn, in an order rotated every round; ratios are upstream / form (above 1: faster).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
from _common import inner_calls, machine_line, render_table, rotated_medians

CELLS = (
    (8, 10_000, True),
    (32, 1_000, True),
    (128, 100, True),
    (32, 1_000, False),
    (128, 100, False),
    (2048, 1, False),
)
FORMS = ("upstream", "shipped", "inverse", "solve", "masked", "scatter", "other product")
# The largest K at which ``inverse`` forms Lq⁻¹D densely with a q per guide (the shipped rule's
# threshold before ``solve_sq_sums``).
_DENSE_MAX_K_PER_GUIDE = 128


def _forms() -> dict[str, Callable]:
    """``form(mp, lp, mq, lq) -> KL`` for every form (numpyro-gkl registered on return)."""
    import jax.numpy as jnp
    import numpyro.distributions as dist
    from jax.scipy.linalg import solve_triangular
    from numpyro.distributions.kl import kl_divergence

    import numpyro_gkl
    from numpyro_gkl.full_pair import _DENSE_MAX_K_SHARED
    from numpyro_gkl.linalg import (
        diagonal,
        product_transposed,
        scale_ratio_term,
        sq_sum_of_product,
        strict_lower_sq_sum,
        tril_inverse,
        x_minus_log1p,
    )

    numpyro_gkl.unregister()
    upstream_rule = kl_divergence.dispatch(dist.MultivariateNormal, dist.MultivariateNormal)
    numpyro_gkl.register()

    def mvn(m, lt):
        return dist.MultivariateNormal(m, scale_tril=lt)

    def by_inverse(diag_of, masked=False, other_product=False):
        def kl(mp, lp, mq, lq):
            k, shared = lq.shape[-1], lq.ndim == 2
            dense = k <= (_DENSE_MAX_K_SHARED if shared else _DENSE_MAX_K_PER_GUIDE)
            a, b = diag_of(lp), diag_of(lq)
            inv = tril_inverse(lq)
            d = jnp.tril(lp - lq)
            z = (inv @ (mp - mq)[..., None])[..., 0]
            if dense != other_product:
                y = product_transposed(inv, d) if shared else inv @ d
                # the strict lower triangle (upper when the product is transposed)
                strict = jnp.triu(y, 1) if shared else jnp.tril(y, -1)
                y_sq = jnp.sum(jnp.square(strict if masked else y), (-2, -1))
            else:
                y_sq = sq_sum_of_product(inv, d)
                if masked:
                    y_sq = y_sq - jnp.sum(jnp.square((a - b) / b), -1)
            if masked:
                rest = jnp.sum(scale_ratio_term(a, b), -1)
            else:
                rest = 2.0 * jnp.sum(x_minus_log1p((a - b) / b), -1)
            return 0.5 * (y_sq + rest + jnp.sum(jnp.square(z), -1))

        return kl

    def solve(mp, lp, mq, lq):
        k = lp.shape[-1]
        rhs = jnp.concatenate([jnp.tril(lp - lq), (mp - mq)[..., None]], -1)
        lq_b = jnp.broadcast_to(lq, (*rhs.shape[:-2], k, k))
        yz = solve_triangular(lq_b, rhs, lower=True)
        diag = jnp.sum(scale_ratio_term(diagonal(lp), diagonal(lq)), -1)
        return 0.5 * (diag + strict_lower_sq_sum(yz[..., :k]) + jnp.sum(jnp.square(yz[..., k]), -1))

    return {
        "upstream": lambda mp, lp, mq, lq: upstream_rule(mvn(mp, lp), mvn(mq, lq)),
        "shipped": lambda mp, lp, mq, lq: kl_divergence(mvn(mp, lp), mvn(mq, lq)),
        "inverse": by_inverse(diagonal),
        "solve": solve,
        "masked": by_inverse(diagonal, masked=True),
        "scatter": by_inverse(lambda m: jnp.diagonal(m, axis1=-2, axis2=-1)),
        "other product": by_inverse(diagonal, other_product=True),
    }


def _tril(rng: np.random.Generator, batch: tuple[int, ...], k: int) -> np.ndarray:
    a = rng.standard_normal((*batch, k, k))
    return np.linalg.cholesky(a @ np.swapaxes(a, -1, -2) / k + 0.5 * np.eye(k))


def time_cell(k: int, b: int, shared: bool, mode: str, rounds: int) -> dict[str, float]:
    """Median ms of every form on one cell."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(k)
    qb = () if shared else (b,)
    args = [
        jnp.asarray(x.astype(np.float32))
        for x in (
            rng.standard_normal((b, k)),
            _tril(rng, (b,), k),
            rng.standard_normal((*qb, k)),
            _tril(rng, qb, k),
        )
    ]
    calls, inner = {}, {}
    ref = None
    for name, form in _forms().items():
        if mode == "fwd":
            fn = jax.jit(form)
        else:
            fn = jax.jit(jax.value_and_grad(lambda *a, f=form: jnp.sum(f(*a)), argnums=(0, 1)))
        out = jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
        value = np.asarray(out if mode == "fwd" else out[0], np.float64)
        ref = value if ref is None else ref
        if not np.allclose(value, ref, rtol=1e-3):
            raise AssertionError(f"{name} disagrees with upstream on K={k}")
        calls[name] = lambda fn=fn: jax.block_until_ready(fn(*args))
        inner[name] = inner_calls(calls[name])
    return rotated_medians(calls, inner, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    rows = []
    for k, b, shared in CELLS:
        for mode in ("fwd", "fwd+grad"):
            ms = time_cell(k, b, shared, mode, args.rounds)
            cells = [f"{ms[n]:.3g} ({ms['upstream'] / ms[n]:.2f}×)" for n in FORMS[1:]]
            rows.append(
                [
                    str(k),
                    str(b),
                    "()" if shared else f"({b},)",
                    mode,
                    f"{ms['upstream']:.3g}",
                    *cells,
                ]
            )
    print(machine_line(f"float32, {args.rounds} rounds per cell"))
    print()
    header = [
        "K",
        "B",
        "q batch",
        "mode",
        "upstream ms",
        *(f"{n} ms (upstream/{n})" for n in FORMS[1:]),
    ]
    print(render_table(header, rows, args.markdown))


if __name__ == "__main__":
    main()
