"""Helpers shared by the benchmark scripts: machine description and table rendering."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence

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
    )
    return f"{line}; {extra}" if extra else line


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
