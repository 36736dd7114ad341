"""KL rules and ``TraceAnalytic_ELBO`` under ``jax.sharding``, on 4 forced host devices.

One child interpreter (``--xla_force_host_platform_device_count=4``, CPU, float64) runs
everything and prints JSON; the parent compares it with the dense float64 references built here.

- KL: a batch of p split over a 1-D mesh (q replicated where it is shared by the batch, split
  with p where it is not) gives the single-device values and the dense reference, the compiled
  program has no collective (no all-gather of q's factor or of anything else, no array of the
  global batch size; a low-rank/full pair all-reduces one boolean, its exact-path switch), and
  the output stays split over the mesh.
- ELBO: loss and gradient with the observations (the data plate) split over the devices give the
  single-device ones; the compiled program all-reduces the sums and gathers no data.
"""

from __future__ import annotations

import json
import pathlib
import textwrap

import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS, built_kl, random_gaussian, rng_for, run_python

DEVICES = 4
B, K = 12, 6  # B divisible by DEVICES; K above linalg.SHARED_SOLVE_MIN_K (shared-factor path)
N = 64  # observations, divisible by DEVICES

# (name, p structure, q structure, q shared by the batch)
PAIRS = (
    ("full_full_shared", "scale_tril", "scale_tril", True),
    ("full_full_unshared", "covariance_matrix", "scale_tril", False),
    ("full_diag_prior", "scale_tril", "diag", True),
    ("lowrank_diag", "lowrank3", "diag", False),
    ("lowrank_full_shared", "lowrank3", "scale_tril", True),
)
# One boolean all-reduced, nothing gathered: a low-rank/full pair decides for the whole batch
# whether to take the exact path (kl._exact_when_close, a lax.cond on any(f < tol)), a full p
# against a diagonal q whether p's upper triangle let a NaN into its masked sum of squares
# (linalg.strict_lower_sq_sum, a lax.cond on all(isfinite)).
ONE_BOOLEAN = {"lowrank_full_shared", "full_diag_prior"}

CHILD = textwrap.dedent(
    r"""
    import json, re, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import numpyro
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from numpyro.distributions.kl import kl_divergence
    from numpyro.infer import SVI

    sys.path.insert(0, sys.argv[2])
    from conftest import make_dist
    from numpyro_gkl import TraceAnalytic_ELBO
    from numpyro_gkl.models import (
        full_rank_guide, linear_regression, make_regression_data, make_vae_data, vae_guide,
        vae_model)

    pairs = json.loads(sys.argv[3])
    arrays = np.load(sys.argv[1])
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    split = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    COLLECTIVE = re.compile(
        r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)")

    def collectives(text):
        return sorted(set(COLLECTIVE.findall(text)))

    def all_reduce_types(text):
        return sorted(set(re.findall(r"= (\S+) all-reduce(?:-start)?\(", text)))

    def params(prefix):
        return {k[len(prefix):]: arrays[k] for k in arrays.files if k.startswith(prefix)}

    out = {"devices": len(jax.devices()), "kl": {}, "elbo": {}}
    for name, sp, sq, shared in pairs:
        pp, pq = params(name + "/p/"), params(name + "/q/")
        f = jax.jit(lambda a, b, sp=sp, sq=sq: kl_divergence(make_dist(sp, a), make_dist(sq, b)))
        args = (jax.device_put(pp, split), jax.device_put(pq, replicated if shared else split))
        compiled = f.lower(*args).compile()
        sharded, text = compiled(*args), compiled.as_text()
        batch = next(iter(pp.values())).shape[0]
        out["kl"][name] = {
            "sharded": np.asarray(sharded).tolist(),
            "single": np.asarray(f(pp, pq)).tolist(),
            "collectives": collectives(text),
            "all_reduce_types": all_reduce_types(text),
            "global_batch_arrays": sorted(set(re.findall(rf"f64\[{batch}[,\]]", text))),
            "output_split": sharded.sharding.spec == PartitionSpec("batch"),
            "output_devices": len(sharded.sharding.device_set),
        }

    n = int(sys.argv[4])
    problems = {
        "linreg_full_rank": (linear_regression, full_rank_guide, make_regression_data(n, 3)),
        "vae_local_latents": (vae_model, vae_guide, (make_vae_data(n),)),
    }
    for name, (model, guide, data) in problems.items():
        elbo = TraceAnalytic_ELBO(num_particles=2)
        svi = SVI(model, guide, numpyro.optim.Adam(0.1), elbo)
        # svi.init under jit: one compilation instead of one per eager operation
        theta = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(0), *data))
        key = jax.random.PRNGKey(1)
        f = jax.jit(jax.value_and_grad(
            lambda th, *d, m=model, g=guide, e=elbo: e.loss(key, th, m, g, *d)))
        args = (jax.device_put(theta, replicated), *jax.device_put(data, split))
        compiled = f.lower(*args).compile()
        (loss, grad), text = compiled(*args), compiled.as_text()
        loss1, grad1 = f(theta, *data)
        out["elbo"][name] = {
            "sharded": [float(loss), {k: np.asarray(v).tolist() for k, v in grad.items()}],
            "single": [float(loss1), {k: np.asarray(v).tolist() for k, v in grad1.items()}],
            "collectives": collectives(text),
            "global_data_arrays": sorted(set(re.findall(rf"f64\[{n}[,\]]", text))),
        }
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> tuple[dict, dict]:
    """The child's JSON, and the float64 reference KL of each pair (dense NumPy)."""
    arrays, reference = {}, {}
    for name, sp, sq, shared in PAIRS:
        rng = rng_for("sharding", name)
        p = random_gaussian(rng, sp, K, (B,))
        q = random_gaussian(rng, sq, K, () if shared else (B,))
        arrays.update({f"{name}/p/{k}": v for k, v in p.params.items()})
        arrays.update({f"{name}/q/{k}": v for k, v in q.params.items()})
        reference[name] = built_kl(p, q)
    path = tmp_path_factory.mktemp("sharding") / "pairs.npz"
    np.savez(path, **arrays)
    out = run_python(
        CHILD,
        str(path),
        str(pathlib.Path(__file__).parent),
        json.dumps(PAIRS),
        str(N),
        env={
            "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={DEVICES}",
            "JAX_PLATFORMS": "cpu",
        },
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == DEVICES
    return result, reference


@pytest.mark.parametrize("name", [pair[0] for pair in PAIRS])
def test_sharded_kl_equals_single_device_and_dense_reference(child, name):
    result, reference = child
    got = result["kl"][name]
    sharded, single = np.asarray(got["sharded"]), np.asarray(got["single"])
    np.testing.assert_allclose(sharded, single, rtol=1e-12, atol=0)
    np.testing.assert_allclose(sharded, reference[name], rtol=1e-10, atol=0)
    # each device computes its own block of the batch from its rows of p and a copy of q: no
    # collective of any kind (but one boolean, ONE_BOOLEAN), nothing of the global batch size
    if name in ONE_BOOLEAN:
        assert got["collectives"] == ["all-reduce"], got["collectives"]
        assert got["all_reduce_types"] == ["pred[]"], got["all_reduce_types"]
    else:
        assert got["collectives"] == [], got["collectives"]
    assert got["global_batch_arrays"] == [], got["global_batch_arrays"]
    assert got["output_split"] and got["output_devices"] == DEVICES


@pytest.mark.parametrize("name", ["linreg_full_rank", "vae_local_latents"])
def test_sharded_elbo_equals_single_device_and_gathers_no_data(child, name):
    got = child[0]["elbo"][name]
    (loss, grad), (loss1, grad1) = got["sharded"], got["single"]
    np.testing.assert_allclose(loss, loss1, rtol=1e-12)
    assert grad.keys() == grad1.keys()
    for k in grad:
        g, g1 = np.asarray(grad[k]), np.asarray(grad1[k])
        assert np.all(np.isfinite(g)) and np.max(np.abs(g1)) > 0, k
        np.testing.assert_allclose(g, g1, rtol=1e-12, atol=1e-12 * np.max(np.abs(g1)), err_msg=k)
    # the sums over the data plate are all-reduced (so the plate really was split); no data moves
    assert got["collectives"] == ["all-reduce"], got["collectives"]
    assert got["global_data_arrays"] == [], got["global_data_arrays"]
