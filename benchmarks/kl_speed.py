"""Wall time of the Gaussian KL: numpyro-gkl against upstream NumPyro and peer libraries.

Run from the repository root::

    PYTHONPATH=. python benchmarks/kl_speed.py [--quick] [--dtype float32|float64] [--markdown]

Every cell times KL(p‖q) for a batch of B guides p against a prior q that is either shared
(q batch ``()``) or one per guide (q batch ``(B,)``), in two modes: ``fwd`` (the KL values) and
``fwd+grad`` (the sum of the KL and its gradient with respect to p's parameters); ``--grad-q``
times instead ``fwd+grad p,q``, the gradient with respect to q's parameters as well (a learned
prior), in the cells whose q is full. JAX code runs
under ``jax.jit`` (compiled and warmed up first, ``block_until_ready`` after every call); PyTorch
runs eagerly with two threads and ``backward``-style gradients via ``torch.autograd.grad``.

Implementations, one column each:

- ``ours``: ``numpyro.distributions.kl.kl_divergence`` with numpyro-gkl registered, on the
  distributions as given (``MultivariateNormal``, ``Independent(Normal)``,
  ``LowRankMultivariateNormal``, ``Normal(0, 1).expand([K]).to_event(1)``);
- ``upstream``: NumPyro's own ``MultivariateNormal``–``MultivariateNormal`` rule, captured before
  registration. Upstream has no rule for the mixed pairs, so there both sides are first rewritten as
  ``MultivariateNormal`` (what a user would have to do: a diagonal becomes a dense triangular
  factor, a low-rank covariance is formed and factorized);
- peers (skipped with a note when not installed): TFP on JAX (``MultivariateNormalTriL`` /
  ``MultivariateNormalDiag`` / ``MultivariateNormalDiagPlusLowRankCovariance``), distrax
  (``MultivariateNormalTri`` / ``MultivariateNormalDiag``; it has no covariance-low-rank class) and
  PyTorch CPU (``MultivariateNormal`` / ``LowRankMultivariateNormal``; a diagonal is passed as a
  diagonal ``scale_tril`` since PyTorch has no ``Independent``–``MultivariateNormal`` rule).
- ``read``: not a KL, the read pass below (its own columns, never counted as a peer).

Each timing is the median over rounds; a round calls every implementation of the cell in turn
(several calls each for fast ones, averaged), in an order rotated every round, so machine noise
hits all columns alike; the thread pools of PyTorch (OpenMP) and of the LAPACK that JAX's
solves and factorizations call (scipy's OpenBLAS) spin for up to 0.1 s after a call, so each
timed batch follows a pause of ``SETTLE_S`` and one untimed call: every library runs in its
default configuration, with no other library's threads left on the cores. Ratios
``upstream/ours`` and ``best peer/ours`` above 1 mean ours is faster; ``per round: median
(IQR)`` is the median and interquartile range of the latter ratio taken round by round (the
fastest peer and ours timed in the same round, seconds apart), the comparison's own noise,
and the machine line gives the share of CPU time the hypervisor stole during the run (Linux
``/proc/stat``). Every implementation's KL value is checked against the first one's (a note is
printed past a loose tolerance). ``--impls`` times a subset alone (``--impls ours``: ours with
nothing but its pauses between its calls).

Cells run in a child process with a watchdog: jaxlib 0.10.2 on CPU can deadlock (see
``Worker``), and a stalled cell is retried in a fresh process and reported.

The limit of a cell (``limit ms``, printed beside each row with ``ours/limit``) is the roofline
bound max(bytes / copy rate, flops / GEMM rate). Both rates are measured once at the start, in
the worker and in the run's dtype (``_common.measure_rates``: an in-place elementwise pass over
128 MiB, whose read plus written bytes give the copy rate, and a 1024² GEMM, 2n³ flops): see
``cell_flops`` for the flop count of each pair and ``cell_bytes`` for the bytes.

``read ms`` is the floor XLA reaches on the cell's bytes: a jitted pass that reads every input
once and writes one sum per batch element (``read_pass``; with gradients also the gradient,
ones as large as the differentiated inputs), timed in the same interleaved rounds as the
implementations. ``read/limit`` above 3 says that no JAX program meets issue 6's "within 3× of
the limit" there on this machine, whatever its algorithm; ``ours/read`` is how far ours is from
that floor.

``peak/input`` is the memory of one compiled call relative to its inputs, from XLA's buffer
assignment (``jax.jit(f).lower(...).compile().memory_analysis()``: arguments + outputs +
temporaries, over arguments). It is deterministic (no sampling of the process's memory) and an
upper bound on what is live at once. A gradient is as large as p's parameters, so fwd+grad cells
start at about 2.

``--plot PATH`` draws the median time against K of every implementation for full vs full (q
shared: solid, one per guide: dashed) with the limit, fwd and fwd+grad panels, log–log.
``--json PATH`` saves the run (rates, cells, results) and ``--load PATH`` renders a saved run
again without timing anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _common import Rates, cpu_times, machine_line, measure_rates, render_table, steal_share

# K -> batch B, so that the input of a cell is a few MB.
FULL_GRID = {2: 100_000, 8: 10_000, 32: 1_000, 128: 100, 512: 4, 2048: 1}
QUICK_GRID = {2: 100_000, 32: 1_000, 512: 4}
STRUCTURE_SIZES_FULL = {128: 100, 2048: 1}
STRUCTURE_SIZES_QUICK = {128: 100}
LOW_RANK = 8
MODES = ("fwd", "fwd+grad")
# With ``--grad-q``: the gradient with respect to q's parameters as well (a prior that is learned);
# only the cells whose q has parameters (full q).
GRAD_PQ = "fwd+grad p,q"


# --------------------------------------------------------------------------------------------
# Cells and their inputs


@dataclass(frozen=True)
class Cell:
    """One benchmark configuration.

    ``p_kind`` is ``full``, ``diag`` or ``lowrank``; ``q_kind`` is ``full``, ``std`` (the
    standard normal prior ``Normal(0, 1).expand([K]).to_event(1)``, always shared), ``stdvec``
    (the same prior as ``Normal(zeros(K), ones(K)).to_event(1)``; it differs for ours only) or
    ``diag`` (a diagonal q whose location and scales are arguments of the call, as a learned
    prior's are, or one whose scale is another latent: unlike the two fixed priors, whose
    constants XLA folds into the program).
    """

    p_kind: str
    q_kind: str
    k: int
    batch: int
    q_shared: bool
    mode: str

    @property
    def pair(self) -> str:
        names = {
            "full": "full",
            "diag": "diag",
            "lowrank": f"lowrank(r={LOW_RANK})",
            "std": "N(0,1).expand([K])",
            "stdvec": "N(0_K,1_K)",
        }
        return f"{names[self.p_kind]} vs {names[self.q_kind]}"

    @property
    def rank(self) -> int:
        return min(LOW_RANK, self.k)


@dataclass
class Inputs:
    """NumPy parameter arrays of p and q for one cell (p first: loc, then its scale pieces)."""

    p: tuple[np.ndarray, ...]
    q: tuple[np.ndarray, ...]


def _random_tril(rng: np.random.Generator, batch: tuple[int, ...], k: int) -> np.ndarray:
    """Cholesky factors of well-conditioned random covariances A Aᵀ / K + I / 2."""
    a = rng.standard_normal((*batch, k, k))
    cov = a @ np.swapaxes(a, -1, -2) / k + 0.5 * np.eye(k)
    return np.linalg.cholesky(cov)


def _p_params(rng: np.random.Generator, kind: str, b: int, k: int, r: int) -> tuple:
    loc = rng.standard_normal((b, k))
    if kind == "full":
        return loc, _random_tril(rng, (b,), k)
    if kind == "diag":
        return loc, np.exp(0.3 * rng.standard_normal((b, k)))
    cov_factor = 0.5 * rng.standard_normal((b, k, r)) / math.sqrt(r)
    cov_diag = np.exp(0.3 * rng.standard_normal((b, k)))
    return loc, cov_factor, cov_diag


def make_inputs(cell: Cell, dtype: str, seed: int = 0) -> Inputs:
    """Random parameters for ``cell`` in ``dtype``."""
    rng = np.random.default_rng(seed + cell.k)
    p = _p_params(rng, cell.p_kind, cell.batch, cell.k, cell.rank)
    qb = () if cell.q_shared else (cell.batch,)
    if cell.q_kind in ("std", "stdvec"):
        q: tuple = ()
    elif cell.q_kind == "diag":
        q = (rng.standard_normal((*qb, cell.k)), np.exp(0.3 * rng.standard_normal((*qb, cell.k))))
    else:
        q = (rng.standard_normal((*qb, cell.k)), _random_tril(rng, qb, cell.k))
    return Inputs(tuple(x.astype(dtype) for x in p), tuple(x.astype(dtype) for x in q))


# --------------------------------------------------------------------------------------------
# The limit of a cell: bytes moved and flops done by the pair's cheapest known algorithm


def cell_bytes(cell: Cell, inputs: Inputs) -> tuple[int, int]:
    """Bytes read (every parameter array once) and written (the B KL values; with ``fwd+grad``
    the summed KL and a gradient as large as p's parameters)."""
    p_bytes = sum(x.nbytes for x in inputs.p)
    read = p_bytes + sum(x.nbytes for x in inputs.q)
    item = inputs.p[0].itemsize
    written = cell.batch * item if cell.mode == "fwd" else p_bytes + item
    if cell.mode == GRAD_PQ:
        written += sum(x.nbytes for x in inputs.q)
    return read, written


def cell_flops(cell: Cell) -> float:
    """Floating-point operations (a multiply-add is 2) of the pair, forward; ×2 per p with
    gradients (the backward of each product below is one product of the same shape and cost).

    With T = K³/3 (a triangular solve of a lower-triangular right-hand side, or a product of two
    lower-triangular matrices, computing only the triangle that is not zero) and B guides:

    - full vs full, q one per guide: B·(T + K²): Lq⁻¹(Lp − Lq) and Lq⁻¹δ per guide;
    - full vs full, q shared: T + B·(T + 2K²): Lq⁻¹ once, then the triangular product
      Lq⁻¹(Lp − Lq) and the matrix-vector product Lq⁻¹δ per guide (a third of a dense K × K
      product, 2K³, would be 2T);
    - diag vs full, q shared: T + B·(2K² + 4K): Lq⁻¹ and its column norms once, then Lq⁻¹δ and
      the weighted sum per guide;
    - full vs N(0, I) or a diagonal q: B·(K² + 4K): the sum of squares of Lp's triangle (its
      rows scaled by 1/σq), δᵀΣq⁻¹δ;
    - lowrank (rank r) vs N(0, I): B·(K r² + r³/3 + 4K r): the Gram matrix WᵀW (symmetric),
      its Cholesky and the traces.

    The q-only part is doubled only with ``fwd+grad p,q`` (gradients with respect to q too).
    """
    k, b, r = cell.k, cell.batch, cell.rank
    tri = k**3 / 3
    once = 0.0
    if cell.p_kind == "full" and cell.q_kind == "full":
        if cell.q_shared and b > 1:
            once, per = tri, tri + 2 * k**2
        else:
            per = tri + k**2
    elif cell.p_kind == "diag":
        once, per = tri, 2 * k**2 + 4 * k
    elif cell.p_kind == "full":
        per = k**2 + 4 * k
    else:
        per = k * r**2 + r**3 / 3 + 4 * k * r
    return once * (2 if cell.mode == GRAD_PQ else 1) + b * per * (1 if cell.mode == "fwd" else 2)


def cell_limit_ms(cell: Cell, result: Result, rates: Rates) -> float:
    """The roofline bound of ``cell`` at the measured ``rates``, in ms."""
    return rates.limit_ms(result.input_bytes + result.output_bytes, cell_flops(cell))


# --------------------------------------------------------------------------------------------
# JAX implementations: ours, upstream, TFP, distrax, and the read pass

# Not a KL: the floor of the cell's bytes (see the module docstring); never a peer.
READ = "read"


class Skip(Exception):
    """Raised by an implementation that cannot run a cell; the message is the note shown."""


def _numpyro_builders(upstream_form: bool, k: int, dtype: Any) -> dict[str, Callable]:
    """Constructors of NumPyro distributions; with ``upstream_form`` everything is an MVN."""
    import jax.numpy as jnp
    from numpyro.distributions import (
        Independent,
        LowRankMultivariateNormal,
        MultivariateNormal,
        Normal,
    )

    eye = jnp.eye(k, dtype=dtype)
    if upstream_form:
        return {
            "full": lambda loc, tril: MultivariateNormal(loc, scale_tril=tril),
            "diag": lambda loc, s: MultivariateNormal(loc, scale_tril=s[..., None] * eye),
            "lowrank": lambda loc, w, d: MultivariateNormal(
                loc, covariance_matrix=w @ jnp.swapaxes(w, -1, -2) + d[..., None] * eye
            ),
            "std": lambda: MultivariateNormal(jnp.zeros(k, dtype), scale_tril=eye),
            "stdvec": lambda: MultivariateNormal(jnp.zeros(k, dtype), scale_tril=eye),
        }
    return {
        "full": lambda loc, tril: MultivariateNormal(loc, scale_tril=tril),
        "diag": lambda loc, s: Independent(Normal(loc, s), 1),
        "lowrank": lambda loc, w, d: LowRankMultivariateNormal(loc, w, d),
        "std": lambda: Normal(jnp.zeros((), dtype), jnp.ones((), dtype)).expand([k]).to_event(1),
        "stdvec": lambda: Normal(jnp.zeros(k, dtype), jnp.ones(k, dtype)).to_event(1),
    }


def _tfp_builders(k: int, dtype: Any) -> dict[str, Callable]:
    import jax.numpy as jnp
    import tensorflow_probability.substrates.jax as tfp

    tfd = tfp.distributions
    builders = {
        "full": lambda loc, tril: tfd.MultivariateNormalTriL(loc, scale_tril=tril),
        "diag": lambda loc, s: tfd.MultivariateNormalDiag(loc, scale_diag=s),
        "lowrank": lambda loc, w, d: tfd.MultivariateNormalDiagPlusLowRankCovariance(
            loc, cov_diag_factor=d, cov_perturb_factor=w
        ),
        "std": lambda: tfd.MultivariateNormalDiag(jnp.zeros(k, dtype), jnp.ones(k, dtype)),
    }
    builders["stdvec"] = builders["std"]
    return builders


def _distrax_builders(k: int, dtype: Any) -> dict[str, Callable]:
    import distrax
    import jax.numpy as jnp

    def lowrank(*_: Any) -> Any:
        raise Skip("distrax has no covariance-parametrized low-rank MVN")

    builders = {
        "full": lambda loc, tril: distrax.MultivariateNormalTri(loc, tril),
        "diag": lambda loc, s: distrax.MultivariateNormalDiag(loc, s),
        "lowrank": lowrank,
        "std": lambda: distrax.MultivariateNormalDiag(jnp.zeros(k, dtype), jnp.ones(k, dtype)),
    }
    builders["stdvec"] = builders["std"]
    return builders


class UpstreamRules:
    """NumPyro's MVN-MVN rule captured with numpyro-gkl unregistered, and the dispatcher."""

    def __init__(self) -> None:
        from numpyro.distributions import MultivariateNormal
        from numpyro.distributions.kl import kl_divergence

        import numpyro_gkl

        numpyro_gkl.unregister()
        self.mvn_mvn = kl_divergence.dispatch(MultivariateNormal, MultivariateNormal)
        numpyro_gkl.register()
        self.ours_mvn_mvn = kl_divergence.dispatch(MultivariateNormal, MultivariateNormal)
        if self.ours_mvn_mvn is self.mvn_mvn:
            raise RuntimeError("numpyro_gkl did not replace NumPyro's MVN-MVN rule")
        self.dispatcher = kl_divergence


def _sum_columns(flat: Any) -> Any:
    return sum(flat[:, i] for i in range(flat.shape[1]))


def _sum_transposed(flat: Any) -> Any:
    import jax.numpy as jnp

    return jnp.sum(flat.T, 0)


def _sum_minor(flat: Any) -> Any:
    import jax.numpy as jnp

    return jnp.sum(flat, -1)


def _sum_ones(flat: Any) -> Any:
    from numpyro_gkl.linalg import event_sum

    return event_sum(flat)


# Forms of one pass summing a B × n array per row; none is fastest in every cell (XLA's CPU
# loops differ with n and B), so the read pass takes the fastest per cell. ``columns`` unrolls
# n, so it is tried for short rows only.
READ_FORMS: dict[str, Callable[[Any], Any]] = {
    "columns": _sum_columns,
    "transposed": _sum_transposed,
    "minor axis": _sum_minor,
    "product with ones": _sum_ones,
}
_READ_COLUMNS_MAX = 64


def read_pass(cell: Cell, form: str) -> Callable:
    """``read(p_params, q_params) -> Array``: the sum of every input per batch element, each
    input read once in the form ``READ_FORMS[form]``, a shared q's sums added once. Its gradient
    is ones, written without reading anything. Not a floor in theory: a pass that does nothing
    but read the inputs and write the outputs, timed under the same protocol. Cost: one pass
    over the inputs."""
    import jax.numpy as jnp

    row_sum = READ_FORMS[form]

    def sums(x: Any) -> Any:
        flat = jnp.reshape(x, (x.shape[0], -1))
        if form == "columns" and flat.shape[1] > _READ_COLUMNS_MAX:
            return _sum_transposed(flat)
        return row_sum(flat)

    def read(pp: tuple, qp: tuple) -> Any:
        total = sum(sums(x) for x in pp)
        for x in qp:
            total = total + (jnp.sum(x) if cell.q_shared else sums(x))
        return total

    return read


def _fastest_read(cell: Cell, inputs: Inputs) -> tuple[tuple[Callable, Callable, Callable], str]:
    """The runner of the read pass in its fastest form on ``cell`` (medians of 7 calls each,
    after a warm-up), and that form's name."""
    best: tuple[float, str, tuple] | None = None
    for form in READ_FORMS:
        runner = _jax_runner(read_pass(cell, form), inputs, cell.mode)
        runner[0]()
        runner[0]()
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            runner[0]()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        if best is None or median < best[0]:
            best = (median, form, runner)
    assert best is not None
    return best[2], best[1]


def _jax_kl_fn(impl: str, cell: Cell, dtype: Any, rules: UpstreamRules) -> Callable:
    """``kl(p_params, q_params) -> Array`` of implementation ``impl`` on JAX."""
    k = cell.k
    if impl == "ours":
        builders = _numpyro_builders(False, k, dtype)

        def kl_call(p: Any, q: Any) -> Any:
            return rules.dispatcher(p, q)

    elif impl == "upstream":
        builders = _numpyro_builders(True, k, dtype)
        kl_call = rules.mvn_mvn
    elif impl == "TFP":
        builders = _tfp_builders(k, dtype)

        def kl_call(p: Any, q: Any) -> Any:
            return p.kl_divergence(q)

    elif impl == "distrax":
        builders = _distrax_builders(k, dtype)

        def kl_call(p: Any, q: Any) -> Any:
            return p.kl_divergence(q)

    else:
        raise ValueError(impl)

    def kl(pp: tuple, qp: tuple) -> Any:
        return kl_call(builders[cell.p_kind](*pp), builders[cell.q_kind](*qp))

    return kl


def _jax_runner(
    kl: Callable, inputs: Inputs, mode: str
) -> tuple[Callable[[], Any], Callable, Callable]:
    """A no-argument call that runs and waits for one evaluation, its value extractor, and a
    no-argument function giving the compiled call's peak/input (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    pp = tuple(jnp.asarray(x) for x in inputs.p)
    qp = tuple(jnp.asarray(x) for x in inputs.q)
    if mode == "fwd":
        fn = jax.jit(kl)

        def value(out: Any) -> np.ndarray:
            return np.asarray(out)

    else:
        argnums = (0, 1) if mode == GRAD_PQ else 0
        fn = jax.jit(jax.value_and_grad(lambda p, q: jnp.sum(kl(p, q)), argnums))

        def value(out: Any) -> np.ndarray:
            return np.asarray(out[0])

    def call() -> Any:
        return jax.block_until_ready(fn(pp, qp))

    def peak_ratio() -> float:
        stats = fn.lower(pp, qp).compile().memory_analysis()
        args = stats.argument_size_in_bytes
        return (args + stats.output_size_in_bytes + stats.temp_size_in_bytes) / args

    return call, value, peak_ratio


# --------------------------------------------------------------------------------------------
# PyTorch


def _torch_runner(
    cell: Cell, inputs: Inputs, mode: str
) -> tuple[Callable[[], Any], Callable, Callable]:
    """PyTorch CPU: ``kl_divergence`` of ``MultivariateNormal``/``LowRankMultivariateNormal``."""
    import torch
    from torch.distributions import LowRankMultivariateNormal, MultivariateNormal, kl_divergence

    torch.set_num_threads(2)
    torch.distributions.Distribution.set_default_validate_args(False)
    k = cell.k
    dt = torch.from_numpy(inputs.p[0]).dtype
    eye = torch.eye(k, dtype=dt)
    builders = {
        "full": lambda loc, tril: MultivariateNormal(loc, scale_tril=tril),
        "diag": lambda loc, s: MultivariateNormal(loc, scale_tril=torch.diag_embed(s)),
        "lowrank": lambda loc, w, d: LowRankMultivariateNormal(loc, w, d),
        "std": lambda: MultivariateNormal(torch.zeros(k, dtype=dt), scale_tril=eye),
    }
    builders["stdvec"] = builders["std"]
    grad = mode != "fwd"
    pp = tuple(torch.from_numpy(x).requires_grad_(grad) for x in inputs.p)
    qp = tuple(torch.from_numpy(x).requires_grad_(mode == GRAD_PQ) for x in inputs.q)

    def kl() -> Any:
        return kl_divergence(builders[cell.p_kind](*pp), builders[cell.q_kind](*qp))

    if not grad:

        def call() -> Any:
            with torch.no_grad():
                return kl()

        return call, lambda out: out.numpy(), lambda: None

    def call_grad() -> Any:
        out = kl()
        total = out.sum()
        grads = torch.autograd.grad(total, pp + qp if mode == GRAD_PQ else pp)
        return total.detach(), grads

    return call_grad, lambda out: out[0].numpy(), lambda: None


# --------------------------------------------------------------------------------------------
# Timing


# Implementations whose compiled memory is analysed (``peak/input``).
MEMORY_IMPLS = ("ours", "upstream")


@dataclass
class Result:
    """Median ms per implementation (``None`` = skipped), notes on skips and mismatches, the
    cell's input and output bytes, ``peak/input`` of the compiled call per implementation, and
    the quartiles [25 %, 50 %, 75 %] of the per-round ratio fastest peer / ours (``None``
    without a peer)."""

    ms: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    input_bytes: int = 0
    output_bytes: int = 0
    peak: dict[str, float] = field(default_factory=dict)
    best_peer_quartiles: list[float] | None = None


def _prepare(
    impl: str, cell: Cell, inputs: Inputs, dtype: Any, rules: UpstreamRules
) -> tuple[Callable[[], Any], Callable, Callable]:
    """The timed call of ``impl`` on ``cell``, the function extracting its KL value, and the
    function giving its peak/input (``None`` where not analysed)."""
    if impl == "torch":
        return _torch_runner(cell, inputs, cell.mode)

    return _jax_runner(_jax_kl_fn(impl, cell, dtype, rules), inputs, cell.mode)


def _check_values(ref: np.ndarray, got: np.ndarray, dtype: str, ref_impl: str) -> str | None:
    """A note if ``got`` disagrees with ``ref`` by more than a loose tolerance."""
    tol = 1e-3 if dtype == "float32" else 1e-8
    ref = np.broadcast_to(np.asarray(ref, np.float64), np.shape(got))
    rel = np.max(np.abs(np.asarray(got, np.float64) - ref) / np.maximum(np.abs(ref), 1e-30))
    return None if rel <= tol else f"value differs from {ref_impl} by {rel:.1e}"


# Before each timed batch of a round: a pause, then one untimed call. After a call, thread pools
# busy-wait for the next one and take the two cores from whatever runs next: the OpenBLAS that
# jaxlib's LAPACK calls come from (scipy's; upstream, TFP and distrax) spins for 2^28 cycles,
# about 0.1 s, and ours, timed right after upstream at K = 512 with a shared q, read 1.6-1.8×
# its back-to-back time on each of five calls (``benchmarks/interleave_cost.py``). Making the
# pools sleep instead (OPENBLAS_THREAD_TIMEOUT=4, OMP_WAIT_POLICY=PASSIVE) removes that but
# slows every library that calls LAPACK in a loop: upstream with a q per guide at K = 32 3.2×.
# The pause lets every library run in its default configuration with no other library's
# threads on the cores; the untimed call absorbs what the first call after an idle pause costs
# (1.2-1.3× here). Also ends libgomp's (PyTorch's) shorter spin.
SETTLE_S = 0.2


def time_cell(
    cell: Cell,
    impls: Sequence[str],
    dtype: str,
    rules: UpstreamRules,
    budget_s: float,
    min_rounds: int,
    progress: Callable[[str], None] = lambda _: None,
) -> Result:
    """Times every implementation of ``cell`` in interleaved rounds; returns medians in ms.

    ``progress(impl)`` is called before each implementation starts a compile or a timed batch,
    so that a watchdog can tell which one stalls.
    """
    import jax.numpy as jnp

    result = Result()
    inputs = make_inputs(cell, dtype)
    result.input_bytes, result.output_bytes = cell_bytes(cell, inputs)
    calls: dict[str, Callable[[], Any]] = {}
    inner: dict[str, int] = {}
    ref_value: np.ndarray | None = None
    ref_impl = ""
    for impl in impls:
        progress(impl)
        try:
            if impl == READ:
                (call, value, peak_ratio), form = _fastest_read(cell, inputs)
                result.notes[READ] = f"fastest form: {form}"
            else:
                call, value, peak_ratio = _prepare(impl, cell, inputs, jnp.dtype(dtype), rules)
            out = call()  # compile
            out = call()  # warm up
            start = time.perf_counter()
            out = call()
            est = time.perf_counter() - start
        except Skip as skip:
            result.ms[impl], result.notes[impl] = None, str(skip)
            continue
        except Exception as err:  # an implementation that fails is reported, not fatal
            result.ms[impl] = None
            result.notes[impl] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            continue
        v = value(out)
        if impl == READ:  # not a KL: nothing to compare
            pass
        elif ref_value is None:
            ref_value, ref_impl = v, impl
        else:
            note = _check_values(ref_value, v, dtype, ref_impl)
            if note:
                result.notes[impl] = note
        if impl in MEMORY_IMPLS and (peak := peak_ratio()) is not None:
            result.peak[impl] = peak
        calls[impl] = call
        inner[impl] = max(1, min(200, int(0.02 / max(est, 1e-6))))
    samples: dict[str, list[float]] = {impl: [] for impl in calls}
    order = list(calls)
    timed = 0.0  # seconds of timed batches: the budget leaves out the pauses
    rounds = 0
    while order and (rounds < min_rounds or (timed < budget_s and rounds < 200)):
        # Rotate the order every round, so that no implementation always follows the same one.
        for impl in order[rounds % len(order) :] + order[: rounds % len(order)]:
            call = calls[impl]
            progress(impl)
            time.sleep(SETTLE_S)  # the previous batch's spinning thread pools go idle
            call()  # untimed: the first call after a pause runs cold
            t0 = time.perf_counter()
            for _ in range(inner[impl]):
                call()
            elapsed = time.perf_counter() - t0
            timed += elapsed
            samples[impl].append(elapsed / inner[impl] * 1e3)
        rounds += 1
    for impl, times in samples.items():
        result.ms[impl] = statistics.median(times)
    peers = [i for i in calls if i not in ("ours", "upstream", READ)]
    result.best_peer_quartiles = _best_peer_quartiles(samples, _fastest_peer(result.ms, peers))
    return result


def _best_peer_quartiles(samples: dict[str, list[float]], best: str | None) -> list[float] | None:
    """Quartiles [25 %, 50 %, 75 %] of fastest peer ``best`` / ours over the rounds; each
    round's two times were taken seconds apart, so the ratio's spread is the noise the comparison
    itself sees (a slow round of the machine slows both). Its median need not equal the ratio of
    the two medians."""
    if best is None or not samples.get("ours"):
        return None
    ratios = [p / o for p, o in zip(samples[best], samples["ours"], strict=True)]
    return statistics.quantiles(ratios, n=4, method="inclusive")


# --------------------------------------------------------------------------------------------
# Worker process with a stall watchdog
#
# jaxlib 0.10.2 can deadlock on CPU when one jitted computation runs two independent batched
# LAPACK calls (e.g. two batched triangular solves) at once: each occupies a thread of the
# intra-op pool (2 threads here) and waits for batch chunks queued on the same, exhausted pool.
# A hung call never returns, so cells run in a child process; a cell that stops reporting
# progress is killed and retried in a fresh process, and every stall is reported.

STALL_S = 40.0
ATTEMPTS = 4


def _worker_main(conn: Any, dtype: str) -> None:
    """Child process: times the cells it receives until it gets ``None``."""
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    rules = UpstreamRules()
    while (msg := conn.recv()) is not None:
        if msg == "rates":
            conn.send(("done", measure_rates(dtype)))
            continue
        cell, impls, budget, min_rounds = msg
        res = time_cell(
            cell, impls, dtype, rules, budget, min_rounds, lambda i: conn.send(("progress", i))
        )
        conn.send(("done", res))


class Worker:
    """A child process running ``time_cell``; restarted after a stall."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.proc: Any = None
        self.conn: Any = None

    def _start(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.dtype), daemon=True)
        self.proc.start()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        self.proc = self.conn = None

    def close(self) -> None:
        if self.proc is not None:
            self.conn.send(None)
            self.proc.join(timeout=10)
            self.kill()

    def rates(self) -> Rates:
        """This machine's copy and GEMM rates, measured in the worker (see ``measure_rates``)."""
        out = self._request("rates")
        if not isinstance(out, Rates):
            raise RuntimeError(f"measuring the machine's rates stalled in {out}")
        return out

    def run(self, cell: Cell, impls: Sequence[str], budget: float, min_rounds: int) -> Any:
        """The cell's ``Result``, or the name of the implementation that stalled."""
        return self._request((cell, list(impls), budget, min_rounds))

    def _request(self, msg: Any) -> Any:
        """Sends ``msg`` and waits for the answer; a stall kills the worker and names the stage."""
        if self.proc is None:
            self._start()
        self.conn.send(msg)
        current = "start-up"
        while self.conn.poll(STALL_S if current != "start-up" else 4 * STALL_S):
            kind, payload = self.conn.recv()
            if kind == "done":
                return payload
            current = payload
        self.kill()
        return current


def run_cell(
    worker: Worker, cell: Cell, impls: Sequence[str], budget: float, min_rounds: int
) -> tuple[Result, list[str]]:
    """Times ``cell``, retrying after stalls; the second return lists the stalls seen."""
    stalls: list[str] = []
    todo = list(impls)
    for attempt in range(ATTEMPTS):
        out = worker.run(cell, todo, budget, min_rounds)
        if isinstance(out, Result):
            for impl in impls:
                if impl not in todo:
                    out.ms[impl] = None
                    out.notes[impl] = "stalled (deadlock); dropped from this cell"
            return out, stalls
        stalls.append(out)
        print(f"    stalled in {out} (attempt {attempt + 1}); restarting", file=sys.stderr)
        if out in todo and out not in ("ours", "upstream"):
            todo.remove(out)  # a peer that stalls once is dropped from the cell
    res = Result({i: None for i in impls}, {"ours": "stalled in every attempt"})
    return res, stalls


# --------------------------------------------------------------------------------------------
# Report


def available_peers() -> tuple[list[str], list[str]]:
    """Peers that import, and a note for each that does not."""
    modules = {  # the peer columns, in order
        "TFP": "tensorflow_probability.substrates.jax",
        "distrax": "distrax",
        "torch": "torch",
    }
    ok, notes = [], []
    for name, module in modules.items():
        try:
            __import__(module)
            ok.append(name)
        except Exception as err:
            notes.append(f"{name} skipped: {type(err).__name__}: {err}")
    return ok, notes


def build_cells(quick: bool, grad_q: bool = False) -> list[Cell]:
    """The grid of full-vs-full cells (q shared and not) plus the structure rows, both modes;
    with ``grad_q`` only the cells with a full q, in mode ``GRAD_PQ``."""
    grid = QUICK_GRID if quick else FULL_GRID
    structure = STRUCTURE_SIZES_QUICK if quick else STRUCTURE_SIZES_FULL
    cells = []
    for mode in (GRAD_PQ,) if grad_q else MODES:
        for shared in (True, False):
            if quick and not shared:
                continue
            cells += [Cell("full", "full", k, b, shared, mode) for k, b in grid.items()]
        for k, b in structure.items():
            cells += [
                Cell("diag", "full", k, b, True, mode),
                Cell("full", "std", k, b, True, mode),
                Cell("full", "stdvec", k, b, True, mode),
                Cell("full", "diag", k, b, True, mode),
                Cell("lowrank", "std", k, b, True, mode),
            ]
    return [c for c in cells if c.q_kind == "full"] if grad_q else cells


def cell_modes(cells: Sequence[Cell]) -> list[str]:
    """The modes of ``cells``, in order of appearance."""
    return list(dict.fromkeys(c.mode for c in cells))


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


def _fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _fastest_peer(ms: dict[str, float | None], peers: Sequence[str]) -> str | None:
    """The peer with the lowest median time in ``ms``, or ``None`` if none was timed."""
    timed = [p for p in peers if ms.get(p) is not None]
    return min(timed, key=lambda p: ms[p]) if timed else None


def _best_peer(res: Result, peers: Sequence[str]) -> float | None:
    best = _fastest_peer(res.ms, peers)
    return None if best is None else res.ms[best]


def _fmt_quartiles(q: list[float] | None) -> str:
    return "—" if q is None else f"{q[1]:.2f}× ({q[0]:.2f}–{q[2]:.2f})"


def _fmt_peak(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}"


def table_rows(
    cells: Sequence[Cell], results: Sequence[Result], peers: Sequence[str], rates: Rates
) -> list:
    """One row of strings per cell."""
    rows = []
    for cell, res in zip(cells, results, strict=True):
        best = _best_peer(res, peers)
        limit = cell_limit_ms(cell, res, rates)
        qb = "()" if cell.q_shared else f"({cell.batch},)"
        rows.append(
            [
                cell.pair,
                str(cell.k),
                str(cell.batch),
                qb,
                cell.mode,
                *(_fmt_ms(res.ms.get(i)) for i in ("ours", "upstream", *peers)),
                _fmt_ratio(_ratio(res.ms.get("upstream"), res.ms.get("ours"))),
                _fmt_ratio(_ratio(best, res.ms.get("ours"))),
                _fmt_quartiles(res.best_peer_quartiles),
                f"{limit:.3g}",
                _fmt_ms(res.ms.get(READ)),
                _fmt_ratio(_ratio(res.ms.get("ours"), limit)),
                _fmt_ratio(_ratio(res.ms.get(READ), limit)),
                _fmt_ratio(_ratio(res.ms.get("ours"), res.ms.get(READ))),
                *(_fmt_peak(res.peak.get(i)) for i in MEMORY_IMPLS),
            ]
        )
    return rows


def target_lines(
    cells: Sequence[Cell], results: Sequence[Result], peers: Sequence[str], rates: Rates
) -> list[str]:
    """Issue 6's three targets: cells meeting each, per mode, and the cells that miss."""
    checks: dict[str, Callable[[Cell, Result], bool | None]] = {
        "≥ 2× faster than the fastest peer": lambda c, r: (
            None if (x := _ratio(_best_peer(r, peers), r.ms.get("ours"))) is None else x >= 2.0
        ),
        "within 3× of the limit": lambda c, r: (
            None
            if (x := _ratio(r.ms.get("ours"), cell_limit_ms(c, r, rates))) is None
            else x <= 3.0
        ),
        "peak memory ≤ 2× the inputs": lambda c, r: (
            None if "ours" not in r.peak else r.peak["ours"] <= 2.0
        ),
    }
    lines = []
    for name, check in checks.items():
        parts, misses = [], []
        for mode in cell_modes(cells):
            outcomes = [
                (c, check(c, r)) for c, r in zip(cells, results, strict=True) if c.mode == mode
            ]
            judged = [(c, ok) for c, ok in outcomes if ok is not None]
            parts.append(f"{mode} {sum(ok for _, ok in judged)}/{len(judged)}")
            misses += [
                f"{c.pair} K={c.k} q {'()' if c.q_shared else 'B'} {mode}"
                for c, ok in judged
                if not ok
            ]
        shown = "; ".join(misses[:6]) + (f"; … {len(misses) - 6} more" if len(misses) > 6 else "")
        lines.append(
            f"Target {name}: {', '.join(parts)} cells meet it"
            + (f" (missed: {shown})" if misses else "")
        )
    lines.append(_read_line(cells, results, rates))
    lines.append(_noise_line(results))
    return lines


def _read_line(cells: Sequence[Cell], results: Sequence[Result], rates: Rates) -> str:
    """In how many memory-bound cells (bytes, not flops, set the limit) the read pass itself is
    within 3× of the limit: where it is not, even a pass that only reads the inputs misses that
    target on this machine."""
    ratios = []
    for c, r in zip(cells, results, strict=True):
        nbytes = r.input_bytes + r.output_bytes
        memory_bound = rates.limit_ms(nbytes, 0.0) >= rates.limit_ms(0.0, cell_flops(c))
        if memory_bound and (x := _ratio(r.ms.get(READ), cell_limit_ms(c, r, rates))):
            ratios.append(x)
    if not ratios:
        return "Read pass: not timed in a memory-bound cell"
    within = sum(x <= 3.0 for x in ratios)
    return (
        f"Read pass (every input read once) within 3× of the limit: {within}/{len(ratios)} "
        f"memory-bound cells (read/limit {min(ratios):.2f}–{max(ratios):.2f}×)"
    )


def _noise_line(results: Sequence[Result]) -> str:
    """How many cells' per-round interquartile range of fastest peer / ours lies wholly at or
    above 2×, wholly below it, or spans it (the median's verdict there is within the noise)."""
    iqrs = [r.best_peer_quartiles for r in results if r.best_peer_quartiles is not None]
    above = sum(q[0] >= 2.0 for q in iqrs)
    below = sum(q[2] < 2.0 for q in iqrs)
    return (
        f"Per-round ratio fastest peer / ours, interquartile range: wholly ≥ 2× in {above}, "
        f"wholly < 2× in {below}, spanning 2× in {len(iqrs) - above - below} of {len(iqrs)} cells"
    )


def plot_vs_k(
    path: str, cells: Sequence[Cell], results: Sequence[Result], impls: Sequence[str], rates: Rates
) -> None:
    """Median time against K, full vs full, one panel per mode (log–log); the limit in black,
    the read pass in gray."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = cell_modes(cells)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    colors = dict(zip(impls, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, mode in zip(axes, modes, strict=True):
        for shared, style in ((True, "-"), (False, "--")):
            sel = [
                (c, r)
                for c, r in zip(cells, results, strict=True)
                if c.mode == mode and c.q_shared == shared and c.p_kind == c.q_kind == "full"
            ]
            ks = [c.k for c, _ in sel]
            for impl in impls:
                pts = [(c.k, r.ms[impl]) for c, r in sel if r.ms.get(impl) is not None]
                if not pts:
                    continue
                if impl == READ:  # a floor, drawn like the limit
                    look: dict[str, Any] = {"color": "gray", "lw": 1, "label": "read pass"}
                else:
                    look = {"marker": "o", "ms": 3, "color": colors[impl], "label": impl}
                if not shared:
                    look["label"] = None
                ax.plot(*zip(*pts, strict=True), style, **look)
            ax.plot(
                ks,
                [cell_limit_ms(c, r, rates) for c, r in sel],
                style,
                color="black",
                lw=1,
                label="limit" if shared else None,
            )
        ax.set(xscale="log", yscale="log", xlabel="K (batch B shrinks with K)", title=mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median ms per call")
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        loc="center right",
        title="solid: q shared\ndashed: q per guide",
        fontsize=8,
        title_fontsize=8,
    )
    fig.suptitle(f"KL(full ‖ full), {rates.dtype}, CPU; B = {dict(FULL_GRID)}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=120)


def geomean_lines(cells: Sequence[Cell], results: Sequence[Result]) -> list[str]:
    """Geometric-mean speed-up over upstream, overall and per mode / pair family."""
    groups: dict[str, list[float]] = {"all cells": []}
    for cell, res in zip(cells, results, strict=True):
        r = _ratio(res.ms.get("upstream"), res.ms.get("ours"))
        if r is None:
            continue
        family = "full vs full" if cell.p_kind == cell.q_kind == "full" else "structured pairs"
        for key in ("all cells", f"{cell.mode}", f"{family}, {cell.mode}"):
            groups.setdefault(key, []).append(r)
    lines = []
    for key, values in groups.items():
        if not values:  # upstream not among --impls
            continue
        gm = math.exp(statistics.fmean(math.log(v) for v in values))
        lines.append(
            f"Geometric-mean speed-up over upstream NumPyro ({key}, {len(values)}): {gm:.2f}×"
        )
    return lines


def note_lines(cells: Sequence[Cell], results: Sequence[Result]) -> list[str]:
    """Skips and value mismatches, one line each, deduplicated."""
    seen: dict[str, list[str]] = {}
    for cell, res in zip(cells, results, strict=True):
        for impl, note in res.notes.items():
            where = f"{cell.pair} K={cell.k} q batch {'()' if cell.q_shared else 'B'} {cell.mode}"
            seen.setdefault(f"{impl}: {note}", []).append(where)
    return [f"{msg} ({len(where)} cells, e.g. {where[0]})" for msg, where in seen.items()]


def save_run(path: str, run: dict[str, Any]) -> None:
    """Writes a run (see ``load_run``) as JSON."""
    data = dict(run)
    data["rates"] = dataclasses.asdict(run["rates"])
    data["cells"] = [dataclasses.asdict(c) for c in run["cells"]]
    data["results"] = [dataclasses.asdict(r) for r in run["results"]]
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


def load_run(path: str) -> dict[str, Any]:
    """A run saved by ``save_run``: rates, cells, results, impls, peers and the report's notes."""
    with open(path) as fh:
        data = json.load(fh)
    data["rates"] = Rates(**data["rates"])
    data["cells"] = [Cell(**c) for c in data["cells"]]
    data["results"] = [Result(**r) for r in data["results"]]
    return data


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (a few cells)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed calls per cell (the pauses not counted)",
    )
    parser.add_argument(
        "--only", default=None, help="run only the cells whose 'pair K' label contains this"
    )
    parser.add_argument(
        "--impls",
        default=None,
        help="time only these implementations (comma-separated: ours,TFP,read); all by default",
    )
    parser.add_argument(
        "--grad-q",
        action="store_true",
        help="time the gradient with respect to q's parameters too (cells with a full q only)",
    )
    parser.add_argument("--plot", default=None, help="write the time-against-K figure here")
    parser.add_argument("--json", default=None, help="save the run as JSON here")
    parser.add_argument("--load", default=None, help="render a run saved with --json; time nothing")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Measures the machine's rates, then every cell; the run as ``save_run`` stores it."""
    import jax

    peers, peer_notes = available_peers()
    impls = ["ours", "upstream", *peers, READ]
    if args.impls is not None:
        wanted = args.impls.split(",")
        impls = [i for i in impls if i in wanted]
        peers = [p for p in peers if p in wanted]
    budget = args.budget if args.budget is not None else (0.4 if args.quick else 1.5)
    min_rounds = 3 if args.quick else 5
    cells = build_cells(args.quick, args.grad_q)
    if args.only is not None:
        cells = [c for c in cells if args.only in f"{c.pair} K={c.k}"]
    results = []
    stall_notes = []
    worker = Worker(args.dtype)
    load_start = os.getloadavg()[0]
    cpu_start = cpu_times()
    t_start = time.perf_counter()
    rates = worker.rates()
    print(
        f"rates: copy {rates.copy_gbps:.1f} GB/s, GEMM {rates.gflops:.0f} GFLOP/s ({rates.dtype})",
        file=sys.stderr,
    )
    for i, cell in enumerate(cells):
        print(
            f"[{i + 1}/{len(cells)}] {cell.pair} K={cell.k} B={cell.batch} "
            f"q_shared={cell.q_shared} {cell.mode}",
            file=sys.stderr,
            flush=True,
        )
        res, stalls = run_cell(worker, cell, impls, budget, min_rounds)
        results.append(res)
        if stalls:
            where = f"{cell.pair} K={cell.k} q batch {'()' if cell.q_shared else 'B'} {cell.mode}"
            stall_notes.append(f"stalled (hung, process restarted) in {', '.join(stalls)}: {where}")
    worker.close()
    elapsed = time.perf_counter() - t_start
    steal = steal_share(cpu_start, cpu_times())
    stolen = "" if steal is None else f", CPU steal {100 * steal:.0f}% (hypervisor) during it"
    machine = machine_line(
        f"a {SETTLE_S * 1e3:.0f} ms pause and an untimed call before each timed batch; "
        f"dtype {args.dtype}, JAX backend {jax.default_backend()}, load average "
        f"{load_start:.1f} at the start, run took {elapsed:.0f} s{stolen}"
    )
    return {
        "machine": machine,
        "rates": rates,
        "cells": cells,
        "results": results,
        "impls": impls,
        "peers": peers,
        "notes": peer_notes + stall_notes,
    }


def report(run: dict[str, Any], markdown: bool) -> None:
    """Prints the machine, the rates, the table, the targets and the notes of ``run``."""
    rates, cells, results = run["rates"], run["cells"], run["results"]
    peers = run["peers"]
    header = [
        "pair",
        "K",
        "B",
        "q batch",
        "mode",
        *(f"{i} ms" for i in ("ours", "upstream", *peers)),
        "upstream/ours",
        "best peer/ours",
        "per round: median (IQR)",
        "limit ms",
        "read ms",
        "ours/limit",
        "read/limit",
        "ours/read",
        *(f"peak/input {i}" for i in MEMORY_IMPLS),
    ]
    print(run["machine"])
    print()
    print(
        f"Measured rates ({rates.dtype}, jit, median): copy {rates.copy_gbps:.1f} GB/s "
        f"(read + written), GEMM {rates.gflops:.0f} GFLOP/s (1024²)"
    )
    print()
    print(render_table(header, table_rows(cells, results, peers, rates), markdown))
    print()
    lines = target_lines(cells, results, peers, rates) + geomean_lines(cells, results)
    lines += run["notes"] + note_lines(cells, results)
    lines.append(
        "Upstream on a pair other than full vs full: both sides rewritten as MultivariateNormal "
        "(NumPyro has no rule for the pair). Ratios > 1: ours faster; ours/limit < 1 would beat "
        "the bound. peak/input: XLA's buffer assignment, (arguments + outputs + temporaries) / "
        "arguments."
    )
    for line in lines:
        print(f"- {line}" if markdown else line)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run = load_run(args.load) if args.load else measure(args)
    if args.json:
        save_run(args.json, run)
    report(run, args.markdown)
    if args.plot:
        plot_vs_k(args.plot, run["cells"], run["results"], run["impls"], run["rates"])


if __name__ == "__main__":
    main()
