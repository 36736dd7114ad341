"""What one call of ours costs after other work: cold caches, idle cores or another library.

Run from the repository root::

    PYTHONPATH=. python benchmarks/interleave_cost.py [--k 32] [--q-shared] [--mode fwd]

``kl_speed.py`` times every implementation of a cell in interleaved rounds, and ours reads
slower there than timed alone (docs/performance.md, "Speed on CPU"). This script separates the
candidate causes on one cell. Each trial runs a preamble, then times the next ``--calls`` calls
of ours one by one; the table gives the median of every call position over ``--trials`` trials
and, per preamble, the first call and the mean of the rest against back to back:

- ``back to back``: three more calls of ours;
- ``sleep``: the cores idle for ``--pause-ms`` (time.sleep);
- ``spin``: one core busy for ``--pause-ms`` in a Python loop that touches no data;
- ``evict``: an in-place pass over ``--evict-mib`` MiB of NumPy memory (larger than the
  last-level cache), so the cache holds none of ours' data;
- ``after <impl>``: three calls of another implementation of the cell (one library's calls
  between ours');
- ``after <impl>, settled``: the same, then ``kl_speed.py``'s protocol before a timed batch: a
  pause of ``kl_speed.SETTLE_S`` and one untimed call of ours.

If ``evict`` costs what ``after <impl>`` does, the other library's working set evicting ours
explains the gap; if ``sleep`` costs it, the idle cores do (frequency scaling, or the
hypervisor descheduling the vCPU), not the data; if only ``after <impl>`` costs it, something
that implementation leaves running does. ``--sleeping-pools`` sets ``SLEEPING_POOLS`` (thread
pools that sleep instead of spinning after a call); the machine line gives both variables.
Implementations as in ``kl_speed.py``; the default peers are upstream and PyTorch (TFP and
distrax can deadlock under jaxlib 0.10.2 outside ``kl_speed.py``'s watchdog).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import kl_speed
import numpy as np
from _common import machine_line, render_table

# OpenBLAS's threads (scipy's, which jaxlib's LAPACK calls use) give up spinning after 2^4
# cycles instead of 2^28; libgomp's (PyTorch's) sleep at once.
SLEEPING_POOLS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _calls_of(call: Callable[[], Any], n: int = 3) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            call()

    return run


def preambles(
    calls: dict[str, Callable[[], Any]], pause_s: float, evict_mib: int
) -> dict[str, Callable[[], None]]:
    """The preamble of each row, by name (see the module docstring)."""
    buffer = np.ones(evict_mib * 2**20 // 8)

    def evict() -> None:
        buffer.__imul__(1.0)

    rows: dict[str, Callable[[], None]] = {
        "back to back": _calls_of(calls["ours"]),
        f"sleep {pause_s * 1e3:.0f} ms": lambda: time.sleep(pause_s),
        f"spin {pause_s * 1e3:.0f} ms": lambda: _spin(pause_s),
        f"evict {evict_mib} MiB": evict,
    }
    for impl, call in calls.items():
        if impl != "ours":
            rows[f"after {impl}"] = _calls_of(call)
    for impl, call in calls.items():
        if impl != "ours":
            rows[f"after {impl}, settled"] = _settled(_calls_of(call), calls["ours"])
    return rows


def _settled(preamble: Callable[[], None], ours: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        preamble()
        time.sleep(kl_speed.SETTLE_S)
        ours()

    return run


def measure(
    cell: kl_speed.Cell,
    impls: Sequence[str],
    trials: int,
    n_calls: int,
    pause_s: float,
    evict_mib: int,
) -> dict[str, list[float]]:
    """Median ms of each of the ``n_calls`` calls of ours after each preamble, over ``trials``
    trials; the preambles take turns within a trial, so a slow stretch hits all rows."""
    import jax.numpy as jnp

    inputs = kl_speed.make_inputs(cell, "float32")
    rules = kl_speed.UpstreamRules()
    calls = {}
    for impl in ("ours", *impls):
        call = kl_speed._prepare(impl, cell, inputs, jnp.float32, rules)[0]
        call()
        call()
        calls[impl] = call
    rows = preambles(calls, pause_s, evict_mib)
    samples: dict[str, list[list[float]]] = {name: [] for name in rows}
    ours = calls["ours"]
    for _ in range(trials):
        for name, pre in rows.items():
            pre()
            times = []
            for _ in range(n_calls):
                t0 = time.perf_counter()
                ours()
                times.append((time.perf_counter() - t0) * 1e3)
            samples[name].append(times)
    return {
        name: [statistics.median(t[i] for t in trial) for i in range(n_calls)]
        for name, trial in samples.items()
    }


def table(medians: dict[str, list[float]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the median of every call position, then the first call and the mean
    of the rest relative to back to back's."""
    n = len(next(iter(medians.values())))
    base = statistics.fmean(medians["back to back"])
    header = ["preamble", *(f"call {i + 1} ms" for i in range(n)), "call 1 / back to back"]
    header.append("calls 2+ / back to back")
    rows = []
    for name, meds in medians.items():
        rows.append(
            [
                name,
                *(f"{m:.3g}" for m in meds),
                f"{meds[0] / base:.2f}×",
                f"{statistics.fmean(meds[1:]) / base:.2f}×",
            ]
        )
    return header, rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=32, help="K of the full-vs-full cell")
    parser.add_argument(
        "--q-shared", action="store_true", help="a q shared by the batch (default: one per guide)"
    )
    parser.add_argument("--mode", choices=kl_speed.MODES, default="fwd")
    parser.add_argument("--impls", default="upstream,torch", help="the other implementations")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--calls", type=int, default=5, help="calls of ours timed per trial")
    parser.add_argument("--pause-ms", type=float, default=20.0)
    parser.add_argument("--evict-mib", type=int, default=256)
    parser.add_argument(
        "--sleeping-pools", action="store_true", help="set SLEEPING_POOLS (unless set)"
    )
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.sleeping_pools:  # before any pool starts: torch and scipy's LAPACK load later
        for name, value in SLEEPING_POOLS.items():
            os.environ.setdefault(name, value)
    batch = kl_speed.FULL_GRID[args.k]
    cell = kl_speed.Cell("full", "full", args.k, batch, args.q_shared, args.mode)
    peers, _ = kl_speed.available_peers()
    impls = [i for i in args.impls.split(",") if i == "upstream" or i in peers]
    start = time.perf_counter()
    medians = measure(cell, impls, args.trials, args.calls, args.pause_ms / 1e3, args.evict_mib)
    elapsed = time.perf_counter() - start
    q = "q shared" if args.q_shared else "q per guide"
    pools = ", ".join(f"{name}={os.environ.get(name)}" for name in SLEEPING_POOLS)
    where = f"cell full vs full K={args.k} B={batch} {q} {args.mode}; {pools}"
    print(machine_line(f"{where}; took {elapsed:.0f} s"))
    print()
    print(render_table(*table(medians), args.markdown))


if __name__ == "__main__":
    main()
