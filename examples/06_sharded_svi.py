"""Example: SVI with the data split across devices (``jax.sharding``), against one device.

Run from the repository root (docs page: docs/examples/sharded_svi.md)::

    python examples/06_sharded_svi.py [--quick] [--steps 2000] [--model logistic|vae]

Fits a model with ``TraceAnalytic_ELBO`` twice from the same key: once with the data plate split
over a 1-D device mesh (each device holds its rows of the data, their local latents and a copy of
the parameters and optimizer state), once on a single device. Two models: a logistic regression
on 40,000 synthetic points with ``AutoMultivariateNormal`` (one global latent, closed-form
entropy and prior term), and the VAE of ``numpyro_gkl.vae`` on scikit-learn's digits (one latent
per image, closed-form ``LowRankMultivariateNormal``–``Normal`` KL per image, split with the
images). Prints the devices, the collectives in the compiled SVI step (an all-reduce of the
sums over the plate, no all-gather of data), time per step, and the losses and the distance
between the two runs' parameters at a few steps, next to the distance that a float32 rounding
error in the initial parameters alone produces (a third run, on one device).

With several GPUs the mesh is made of them. On a CPU the script asks XLA for 4 host devices
(``--xla_force_host_platform_device_count=4``) before importing jax, unless ``XLA_FLAGS`` is
already set; 4 host devices share the machine's cores, so on CPU this shows that the sharded
program computes the same thing, not a speed-up.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import argparse
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoMultivariateNormal

from numpyro_gkl import TraceAnalytic_ELBO, vae
from numpyro_gkl.models import logistic_regression, make_classification_data

COLLECTIVES = r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"


def problems(quick: bool) -> dict[str, tuple[str, Callable, Callable, tuple, float]]:
    """name -> (description, model, guide factory, data arrays split along axis 0, step size)."""
    n = 4000 if quick else 40000
    return {
        "logistic": (
            f"logistic regression, {n} points, 10 weights, AutoMultivariateNormal",
            logistic_regression,
            AutoMultivariateNormal,
            tuple(a.astype("float32") for a in make_classification_data(n, 10)),
            0.01,
        ),
        "vae": (
            "VAE on the digits, LowRankMultivariateNormal posterior per image",
            vae.model,
            lambda model: vae.guide,
            (vae.load_data(quick),),
            0.01,
        ),
    }


def fit(
    model: Callable,
    guide: Callable,
    data: tuple,
    lr: float,
    mesh: Mesh,
    checkpoints: list[int],
    nudge: bool = False,
) -> tuple[list[tuple[dict, float]], float, set[str]]:
    """Adam with the rows of ``data`` split over ``mesh``'s devices, up to each checkpoint step.

    Returns, per checkpoint, the params and the mean loss of the steps since the previous one;
    the seconds per step (compilation excluded) and the collectives of the compiled program.
    ``nudge`` multiplies the initial params by 1 + 2⁻²³ (a float32 rounding error), to show how
    far two runs drift apart from a difference of that size alone.
    """
    rows = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    data = jax.device_put(data, rows)
    svi = SVI(model, guide, numpyro.optim.Adam(lr), TraceAnalytic_ELBO())
    state = jax.device_put(svi.init(jax.random.PRNGKey(0), *data), replicated)
    if nudge:
        state = jax.tree.map(
            lambda a: a * (1 + 2.0**-23) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
        )

    @jax.jit
    def run(state, data, n):
        def step(_, carry):
            state, total = carry
            state, loss = svi.update(state, *data)
            return state, total + loss

        state, total = jax.lax.fori_loop(0, n, step, (state, jnp.zeros((), jnp.float32)))
        return state, total / n

    compiled = run.lower(state, data, 1).compile()  # one program for every number of steps
    collectives = set(re.findall(COLLECTIVES, compiled.as_text()))
    out, done, seconds = [], 0, 0.0
    for stop in checkpoints:
        start = time.perf_counter()
        state, mean_loss = jax.block_until_ready(compiled(state, data, stop - done))
        seconds += time.perf_counter() - start
        out.append((svi.get_params(state), float(mean_loss)))
        done = stop
    return out, seconds / done, collectives


def relative_difference(a: dict, b: dict) -> float:
    """max |a − b| / max |b| over all parameters."""
    a, b = jax.device_get((a, b))
    return max(np.max(np.abs(a[k] - b[k])) for k in b) / max(np.max(np.abs(b[k])) for k in b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="less data, 300 steps")
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default 2000)")
    parser.add_argument("--model", choices=("logistic", "vae"), action="append")
    args = parser.parse_args()
    steps = args.steps or (300 if args.quick else 2000)
    checkpoints = sorted({k for k in (1, 10, 100, 1000) if k < steps} | {steps})
    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} devices: {', '.join(map(str, devices))}")
    print(f"{steps} steps of Adam, TraceAnalytic_ELBO(kl='analytic'), float32")
    for name, (title, model, make_guide, data, lr) in problems(args.quick).items():
        if args.model and name not in args.model:
            continue
        n = data[0].shape[0] - data[0].shape[0] % len(devices)  # equal blocks: drop the rest
        data = tuple(a[:n] for a in data)
        print(f"\n### {name}: {title}, {n} rows split\n")
        runs = {}
        for label, mesh_devices, nudge in (
            ("sharded", devices, False),
            ("single device", devices[:1], False),
            ("single device, init × (1 + 2⁻²³)", devices[:1], True),
        ):
            mesh = Mesh(np.array(mesh_devices), ("data",))
            runs[label] = fit(model, make_guide(model), data, lr, mesh, checkpoints, nudge)
        print("| run | devices | collectives in the compiled step | ms / step |")
        print("| --- | --- | --- | --- |")
        for (label, (_, per_step, found)), used in zip(
            runs.items(), (len(devices), 1, 1), strict=True
        ):
            found = ", ".join(sorted(found)) or "none"
            print(f"| {label} | {used} | {found} | {1e3 * per_step:.2f} |")
        (sharded, _, _), (single, _, _), (nudged, _, _) = runs.values()
        print(
            "\n| after step | mean loss since the previous row: sharded | single device "
            "| params, sharded vs single device: max abs difference / max abs value "
            "| the same, init × (1 + 2⁻²³) vs single device |"
        )
        print("| --- | --- | --- | --- | --- |")
        for stop, (params, loss), (params1, loss1), (params2, _) in zip(
            checkpoints, sharded, single, nudged, strict=True
        ):
            diff = relative_difference(params, params1)
            drift = relative_difference(params2, params1)
            print(f"| {stop} | {loss:.7g} | {loss1:.7g} | {diff:.1e} | {drift:.1e} |")
        if name == "vae":
            params, params1 = sharded[-1][0], single[-1][0]
            print(
                f"\nreconstruction MSE: sharded {vae.reconstruction_error(params, data[0]):.5f}, "
                f"single device {vae.reconstruction_error(params1, data[0]):.5f}"
            )


if __name__ == "__main__":
    main()
