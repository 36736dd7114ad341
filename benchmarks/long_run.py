"""Long float32 SVI runs with ``TraceAnalytic_ELBO`` on the examples' models, and checkpoints.

For each problem of ``numpyro_gkl.suite`` (the five examples' models on their full data, eight
schools in four variants) and each estimator (``kl="analytic"`` with one particle, ``"adaptive"``
with four), ``--steps`` steps of Adam at the problem's step size, in float32 (x64 off), as two
halves of one compiled ``lax.scan``. Printed per run: the number of NaN or infinite losses, the
final ELBO (minus the mean loss of the last 1000 steps), the run time (compilation excluded), and
the checkpoint check: the ``SVIState`` after the first half is pickled, unpickled into a new
object (and, unless ``--no-fresh-process``, in a fresh interpreter that builds the SVI object
anew, as a restarted job would), and the next step is taken from the original and from each
copy with the same compiled step; the new states (params, optimizer state, rng key) and losses
must be bitwise identical.

    PYTHONPATH=. python benchmarks/long_run.py [--steps 20000] [--problems a,b] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial

import jax
import numpy as np
import numpyro
from _common import machine_line, render_table
from numpyro.infer import SVI
from numpyro.infer.svi import SVIState
from tqdm.auto import tqdm

from numpyro_gkl import TraceAnalytic_ELBO
from numpyro_gkl.suite import Problem, problems

ESTIMATORS = {"analytic": 1, "adaptive": 4}  # kl mode -> particles
LAST = 1000  # the final ELBO is the mean over this many last steps


@dataclass(frozen=True)
class Setup:
    """An SVI object with its data and the compiled programs that run it."""

    svi: SVI
    args: tuple
    kwargs: dict

    def init(self) -> SVIState:
        return self.svi.init(jax.random.PRNGKey(0), *self.args, **self.kwargs)

    def step(self, state: SVIState) -> tuple[SVIState, jax.Array]:
        return _step(self.svi, state, self.args, self.kwargs)


def setup(problem: Problem, kl: str) -> Setup:
    args, kwargs = problem.data(False)
    elbo = TraceAnalytic_ELBO(num_particles=ESTIMATORS[kl], kl=kl)
    svi = SVI(
        problem.model, problem.make_guide(problem.model), numpyro.optim.Adam(problem.lr), elbo
    )
    return Setup(svi, args, kwargs)


@partial(jax.jit, static_argnums=0)
def _step(svi: SVI, state: SVIState, args: tuple, kwargs: dict) -> tuple[SVIState, jax.Array]:
    """One SVI step: one compiled program per SVI object, for original and restored states."""
    return svi.update(state, *args, **kwargs)


@partial(jax.jit, static_argnums=(0, 4))
def _scan(svi: SVI, state: SVIState, args: tuple, kwargs: dict, steps: int):
    """``steps`` SVI steps in one ``lax.scan``; returns the state and the losses."""
    return jax.lax.scan(lambda s, _: svi.update(s, *args, **kwargs), state, None, length=steps)


def bitwise_equal(a, b) -> bool:
    """Whether two pytrees have the same structure and the same bytes in every leaf."""
    la, ta = jax.tree.flatten(jax.device_get(a))
    lb, tb = jax.tree.flatten(jax.device_get(b))
    return ta == tb and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb, strict=True)
    )


def fresh_process_step(name: str, kl: str, blob: bytes) -> bytes:
    """The pickled (state, loss) of one step from the pickled state ``blob``, in a new process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pkl")
        with open(path, "wb") as f:
            f.write(blob)
        subprocess.run(
            [sys.executable, __file__, "--resume", path, "--problems", name, "--kl", kl],
            check=True,
            env={**os.environ, "JAX_ENABLE_X64": "0"},
        )
        with open(path + ".next", "rb") as f:
            return f.read()


def resume(path: str, name: str, kl: str) -> None:
    """Child of ``fresh_process_step``: rebuild the SVI object, unpickle, step, pickle."""
    (problem,) = [p for p in problems() if p.name == name]
    run = setup(problem, kl)
    run.init()  # sets the guide up, as a restarted job does before loading its checkpoint
    with open(path, "rb") as f:
        state = pickle.load(f)
    with open(path + ".next", "wb") as f:
        pickle.dump(jax.device_get(run.step(state)), f)


def long_run(problem: Problem, kl: str, steps: int, fresh: bool) -> dict:
    """One run of ``steps`` steps with the checkpoint check after ``steps // 2``."""
    run = setup(problem, kl)
    state = run.init()
    half = steps // 2
    start = time.perf_counter()
    compiled = _scan.lower(run.svi, state, run.args, run.kwargs, half).compile()
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    middle, first = jax.block_until_ready(compiled(state, run.args, run.kwargs))
    elapsed = time.perf_counter() - start
    blob = pickle.dumps(middle)
    reference = run.step(middle)
    restored = {"in process": run.step(pickle.loads(blob))}
    if fresh:
        restored["fresh process"] = pickle.loads(fresh_process_step(problem.name, kl, blob))
    start = time.perf_counter()
    end, second = jax.block_until_ready(compiled(middle, run.args, run.kwargs))
    elapsed += time.perf_counter() - start

    losses = np.concatenate([np.asarray(first), np.asarray(second)])
    params = run.svi.get_params(end)
    return {
        "bad": int(np.sum(~np.isfinite(losses))),
        "params_finite": all(bool(np.all(np.isfinite(v))) for v in jax.tree.leaves(params)),
        "elbo": -float(np.mean(losses[-LAST:])),
        "run_s": elapsed,
        "compile_s": compile_s,
        "checkpoint": {k: bitwise_equal(v, reference) for k, v in restored.items()},
        "dtype": str(losses.dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--problems", default=None, help="comma-separated names (default all)")
    parser.add_argument("--kl", default=",".join(ESTIMATORS), help="comma-separated estimators")
    parser.add_argument("--no-fresh-process", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--resume", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resume:
        resume(args.resume, args.problems, args.kl)
        return
    chosen = [p for p in problems() if args.problems is None or p.name in args.problems.split(",")]
    cells = [(p, kl) for p in chosen for kl in args.kl.split(",")]
    rows = []
    for problem, kl in tqdm(cells, desc="runs"):
        r = long_run(problem, kl, args.steps, fresh=not args.no_fresh_process)
        checks = ", ".join(
            f"{k}: {'identical' if v else 'DIFFERENT'}" for k, v in r["checkpoint"].items()
        )
        rows.append(
            [
                problem.name,
                f"{kl} ({ESTIMATORS[kl]})",
                r["dtype"],
                str(r["bad"]) + ("" if r["params_finite"] else ", params not finite"),
                f"{r['elbo']:.6g}",
                f"{r['run_s']:.2f}",
                f"{r['compile_s']:.1f}",
                checks,
            ]
        )
    header = [
        "model",
        "kl (particles)",
        "dtype",
        "NaN/inf losses",
        f"final ELBO (last {LAST})",
        "run s",
        "compile s",
        f"next step after restoring step {args.steps // 2}",
    ]
    print(machine_line(f"{args.steps} steps per run"))
    print(render_table(header, rows, args.markdown))


if __name__ == "__main__":
    main()
