"""Helpers shared by the benchmark scripts: machine description, machine rates, tables."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The checkout these scripts belong to comes first on the path, so that they always measure its
# numpyro_gkl (an environment with an older editable install elsewhere once took precedence and
# a whole run timed stale code); ``machine_line`` prints where it was imported from.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PEER_PACKAGES = {
    "jax": "jax",
    "numpyro": "numpyro",
    "TFP": "tfp-nightly",
    "distrax": "distrax",
    "torch": "torch",
}


def cpu_model() -> str:
    """The ``Model name`` line of ``lscpu`` (falls back to ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_times() -> tuple[int, int] | None:
    """(busy, steal) CPU time in clock ticks since boot, all cores, from Linux's ``/proc/stat``
    (busy: user, nice, system, irq, softirq; steal: time the hypervisor ran other guests while
    this one was ready to run); ``None`` elsewhere."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal


def steal_share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """The share of CPU time stolen by the hypervisor between two ``cpu_times`` readings,
    steal / (busy + steal); ``None`` without readings or CPU time between them."""
    if start is None or end is None:
        return None
    busy, steal = end[0] - start[0], end[1] - start[1]
    return steal / (busy + steal) if busy + steal > 0 else None


def package_version(dist: str) -> str | None:
    """Installed version of the distribution ``dist``, or ``None``.

    ``tfp-nightly`` and ``tensorflow-probability`` are both looked up for TFP.
    """
    names = [dist]
    if dist == "tfp-nightly":
        names.append("tensorflow-probability")
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine_line(extra: str = "") -> str:
    """One line describing the machine and the library versions."""
    versions = []
    for label, dist in PEER_PACKAGES.items():
        version = package_version(dist)
        versions.append(f"{label} {version if version else 'not installed'}")
    cores = os.cpu_count()
    load = os.getloadavg()[0]
    line = (
        f"Machine: {cpu_model()}, {cores} cores, 1-min load average {load:.1f} at the end "
        f"(other processes share the machine), Python {platform.python_version()}; "
        + ", ".join(versions)
        + f"; {code_line()}"
    )
    return f"{line}; {extra}" if extra else line


def code_line() -> str:
    """Where ``numpyro_gkl`` was imported from and the checkout's commit (``-dirty`` if edited)."""
    import numpyro_gkl

    where = Path(numpyro_gkl.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    inside = where.is_relative_to(REPO_ROOT)
    return f"numpyro_gkl {'at' if inside else 'NOT from this checkout:'} {where} ({commit or '?'})"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """A markdown table, or a plain table with aligned columns."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Rates:
    """What this machine sustains right now, measured under ``jax.jit`` in one dtype.

    ``copy_gbps``: bytes read plus bytes written per second (1e9) by an in-place elementwise
    pass over an array larger than the caches; ``gflops``: floating-point operations per second
    (1e9) of a square GEMM (2n³ flops). Both are medians over repeated calls, so they carry the
    machine's current load.
    """

    dtype: str
    copy_gbps: float
    gflops: float

    def limit_ms(self, nbytes: float, flops: float) -> float:
        """The roofline bound: the larger of moving ``nbytes`` and doing ``flops``, in ms."""
        return max(nbytes / (self.copy_gbps * 1e9), flops / (self.gflops * 1e9)) * 1e3


def _median_s(call: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``call()`` in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_rates(dtype: str, copy_mib: int = 128, gemm_n: int = 1024, repeats: int = 15) -> Rates:
    """Copy bandwidth (``x * 2`` in place over ``copy_mib`` MiB) and GEMM rate (n × n) in ``dtype``.

    The copy donates its input, so XLA writes into the same, already mapped buffer: a fresh
    output of that size would measure the kernel's page faults (3–5 GB/s here) instead of the
    memory. Runs in the calling process's JAX configuration (``float64`` needs x64 enabled); every
    call is compiled and warmed up first and waited for with ``block_until_ready``.
    """
    import jax
    import jax.numpy as jnp

    item = jnp.dtype(dtype).itemsize
    buf = [jnp.ones(copy_mib * 2**20 // item, dtype)]
    nbytes = buf[0].nbytes
    scale = jax.jit(lambda v: v * 2, donate_argnums=0)
    a = jax.random.normal(jax.random.PRNGKey(0), (gemm_n, gemm_n), dtype)
    gemm = jax.jit(jnp.matmul)

    def copy() -> None:
        buf[0] = jax.block_until_ready(scale(buf[0]))

    def matmul() -> None:
        jax.block_until_ready(gemm(a, a))

    for _ in range(2):
        copy()
        matmul()
    t_copy = _median_s(copy, repeats)
    t_gemm = _median_s(matmul, repeats)
    return Rates(dtype, 2 * nbytes / t_copy / 1e9, 2 * gemm_n**3 / t_gemm / 1e9)


def inner_calls(call: Callable[[], None], seconds: float = 0.02) -> int:
    """How many back-to-back calls of ``call`` (already compiled and warm) fill about ``seconds``,
    between 1 and 100: one timing sample averages that many, so that fast calls are not
    timer-sized."""
    start = time.perf_counter()
    call()
    return max(1, min(100, int(seconds / max(time.perf_counter() - start, 1e-6))))


def rotated_medians(
    calls: dict[str, Callable[[], None]], inner: dict[str, int], rounds: int
) -> dict[str, float]:
    """Median ms per call of every entry of ``calls``: each round calls each in turn (``inner``
    times back to back, averaged), in an order rotated every round, so that a slow stretch of
    the machine hits all of them alike."""
    samples: dict[str, list[float]] = {n: [] for n in calls}
    order = list(calls)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            start = time.perf_counter()
            for _ in range(inner[name]):
                calls[name]()
            samples[name].append((time.perf_counter() - start) / inner[name] * 1e3)
    return {n: statistics.median(v) for n, v in samples.items()}
