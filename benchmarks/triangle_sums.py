"""Σ_{i>j} m_ij² over a batch of K × K matrices: the forms ``linalg.strict_lower_sq_sum`` chooses
between, against ``jnp.tril``.

Run from the repository root::

    PYTHONPATH=. python benchmarks/triangle_sums.py [--markdown] [--rounds N]

For a grid of (K, B) with a few MB of float32 input, the median time of one jitted call of:

- ``tril``: ``jnp.sum(jnp.square(jnp.tril(m, -1)))`` (``linalg._tril_sq_sum``), a select (the
  previous form);
- ``masked``: the squares times a 0/1 mask (``linalg._masked_sq_sum``), without the fallback
  for a non-finite upper triangle, whose ``lax.cond`` costs one reduction over B values;
- ``row blocks``: 16 blocks of rows, only the diagonal blocks through ``jnp.tril``
  (``linalg._row_block_sq_sum``);
- ``shipped``: ``linalg.strict_lower_sq_sum``, masked with the fallback up to K = 128, row
  blocks above;
- ``all entries``: the sum of squares of every entry, no mask: what reading the input once
  costs, a floor for the others.

A round calls every form in turn, in an order rotated every round; every form's sum is checked
against ``tril``'s. Ratios are tril / form (above 1: faster).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
from _common import inner_calls, machine_line, render_table, rotated_medians

CELLS = ((8, 10_000), (32, 4_000), (128, 100), (128, 400), (256, 16), (512, 32), (2048, 1))
FORMS = ("tril", "masked", "row blocks", "shipped", "all entries")


def _forms() -> dict[str, Callable]:
    import jax.numpy as jnp

    from numpyro_gkl import linalg

    return {
        "tril": linalg._tril_sq_sum,
        "masked": linalg._masked_sq_sum,
        "row blocks": linalg._row_block_sq_sum,
        "shipped": linalg.strict_lower_sq_sum,
        "all entries": lambda m: jnp.sum(jnp.square(m), axis=(-2, -1)),
    }


def time_cell(k: int, b: int, rounds: int) -> dict[str, float]:
    """Median ms of one call of every form on a (b, k, k) float32 input."""
    import jax

    m = jax.numpy.asarray(np.random.default_rng(k).normal(size=(b, k, k)), "float32")
    calls, inner, ref = {}, {}, None
    for name, form in _forms().items():
        fn = jax.jit(form)
        value = np.asarray(jax.block_until_ready(fn(m)), np.float64)
        ref = value if ref is None else ref
        if name != "all entries" and not np.allclose(value, ref, rtol=1e-4):
            raise AssertionError(f"{name} disagrees with tril at K={k}")
        calls[name] = lambda fn=fn: jax.block_until_ready(fn(m))
        inner[name] = inner_calls(calls[name])
    return rotated_medians(calls, inner, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for k, b in CELLS:
        ms = time_cell(k, b, args.rounds)
        cells = [f"{ms[n]:.3g} ({ms['tril'] / ms[n]:.2f}×)" for n in FORMS[1:]]
        rows.append([str(k), str(b), f"{b * k * k * 4 / 1e6:.1f}", f"{ms['tril']:.3g}", *cells])
    print(machine_line(f"float32, {args.rounds} rounds per cell"))
    print()
    header = ["K", "B", "input MB", "tril ms", *(f"{n} ms (tril/{n})" for n in FORMS[1:])]
    print(render_table(header, rows, args.markdown))


if __name__ == "__main__":
    main()
