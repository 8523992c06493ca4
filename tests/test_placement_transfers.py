"""The host-tables step's transfers: rows sent and gradients fetched as one
buffer each (`pack_transfers`) or one per table, inputs donated to the
program or not, on one device or a mesh of two: the same training, bit for
bit on one device, and a donated step leaves the model it was given intact."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from flax import nnx

from experiments.placement import run as W2


def _w2(**kwargs):
    kwargs.setdefault("pack_transfers", True)
    return W2.make_trainer(4, (8,), **kwargs)


def _state(t):
    leaves = [np.asarray(x) for x in jax.tree.leaves(t.params) + jax.tree.leaves(t.opt_state)]
    tables = {}
    for name, table in t.tables.items():
        d = table.dump()
        o = np.argsort(d["keys"])
        tables[name] = (d["keys"][o], d["values"][o], d["slots"][o])
    return leaves, tables


def test_packed_and_donated_steps_equal_per_table_and_kept_ones():
    raw = W2.stream(5, 64, seed=3)
    batches = [W2.to_batch(r) for r in raw]
    arms = {"packed": _w2(placement="host", overlap=True, donate=True),
            "per_table": _w2(placement="host", overlap=True, pack_transfers=False, donate=True),
            "kept": _w2(placement="host", overlap=False, donate=False),
            "one_by_one": _w2(placement="host", donate=False)}
    assert len(arms["packed"].tables) == 26
    for name, t in arms.items():
        if name == "one_by_one":
            for b in batches:
                t.train_step_host(b)
        else:
            t.fit(batches)
    ref_leaves, ref_tables = _state(arms["one_by_one"])
    for name in ("packed", "per_table", "kept"):
        leaves, tables = _state(arms[name])
        for x, y in zip(leaves, ref_leaves):
            np.testing.assert_array_equal(x, y, err_msg=name)
        for n in ref_tables:
            for a, b in zip(tables[n], ref_tables[n]):
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {n}")
    # A donated step takes over the trainer's buffers, never those of the model it was given.
    ref = arms["packed"]
    model = W2.W2Model(4, (8,), rngs=nnx.Rngs(0))
    t = W2.Trainer(model, [table.config for table in ref.tables.values()], ref.features, ref.dense_features,
                   placement="host", overlap=True, log_every=0, out=None, donate=True)
    t.fit(batches[:2])
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(nnx.state(model)))
    old = t.params
    t.fit(batches[2:3])
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))  # donated: its buffers now the new params'


SCRIPT = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    from tests.test_placement_transfers import _state, _w2, W2

    assert jax.device_count() == 2
    mesh = jax.make_mesh((2,), ("batch",))
    batches = [W2.to_batch(r) for r in W2.stream(4, 64, seed=4)]
    one = _w2(placement="host", donate=False)
    for b in batches:
        one.train_step_host(b)
    out = {}
    for name, kw in (("packed", {}), ("per_table", {"pack_transfers": False})):
        t = _w2(mesh=mesh, overlap=True, donate=True, **kw)
        t.fit(batches)
        leaves, tables = _state(t)
        l1, t1 = _state(one)
        out[name] = {"params": max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, l1)),
                     "rows": max(float(np.max(np.abs(tables[n][1] - t1[n][1]))) for n in t1),
                     "replicated": all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 2
                                       for leaf in jax.tree.leaves(t.params))}
    print(json.dumps(out))
""")


def test_packed_rows_over_a_mesh_equal_one_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("packed", "per_table"):
        assert r[name]["replicated"] and r[name]["params"] < 1e-5 and r[name]["rows"] < 1e-5, r
