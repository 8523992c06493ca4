"""A data-parallel group of one process with several local devices (2 CPU
devices forced in a fresh interpreter) takes the mesh route: params and
optimizer state replicated on the devices and kept there between steps, and
the same training as one device on the same batches."""

import json
import os
import subprocess
import sys
import textwrap

from tests.distributed.test_data_parallel import free_port

SCRIPT = textwrap.dedent("""
    import json, sys
    from monolith_jax.distributed.data_parallel import DataParallel
    dp = DataParallel(sys.argv[1], 1, 0, timeout_s=60)   # before any other JAX call
    import jax
    import numpy as np
    from tests.test_placement import _batches, _state, _trainer

    assert jax.local_device_count() == 2, jax.devices()
    batches = _batches(_trainer(), 6)
    one = _trainer(placement="host", overlap=False)
    stepped, fitted = _trainer(), _trainer(overlap=True)
    for t in (stepped, fitted):
        dp.attach(t)
    shardings, kept = set(), True
    for b in batches:
        one.train_step_host(b)
        before = [leaf.sharding for leaf in jax.tree.leaves(stepped.params)]
        stepped.train_step_host(b)
        after = jax.tree.leaves(stepped.params) + jax.tree.leaves(stepped.opt_state)
        kept &= all(s == leaf.sharding for s, leaf in zip(before, after))
        shardings |= {(len(leaf.sharding.device_set), bool(leaf.sharding.is_fully_replicated)) for leaf in after}
    fitted.fit(batches)
    shardings |= {(len(leaf.sharding.device_set), bool(leaf.sharding.is_fully_replicated))
                  for leaf in jax.tree.leaves(fitted.params)}
    l1, t1 = _state(one)
    diffs = {}
    for name, t in (("stepped", stepped), ("fitted", fitted)):
        l2, t2 = _state(t)
        diffs[name] = {"params": max(float(np.max(np.abs(a - b), initial=0)) for a, b in zip(l1, l2)),
                       "rows": max(float(np.max(np.abs(t1[n]["values"] - t2[n]["values"]), initial=0)) for n in t1),
                       "same_keys": all(np.array_equal(t1[n]["keys"], t2[n]["keys"]) for n in t1),
                       "steps": t.step_count, "placement": t.step_placement(),
                       "mesh": t.mesh_dense is not None and t.mesh_dense.size, "dp": t.data_parallel is not None}
    print(json.dumps({"shardings": sorted(shardings), "kept": bool(kept), "diffs": diffs,
                      "overlapped": fitted.host_stats.get("steps")}))
    jax.distributed.shutdown()
""")


def test_one_process_group_keeps_params_on_its_devices_and_equals_one_device():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", SCRIPT, f"127.0.0.1:{free_port()}"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["shardings"] == [[2, True]] and r["kept"]  # replicated on both devices, step after step
    for name in ("stepped", "fitted"):
        d = r["diffs"][name]
        assert d["same_keys"] and d["steps"] == 6 and d["placement"] == "host"
        assert d["mesh"] == 2 and not d["dp"]  # the mesh route, nothing to all-reduce across processes
        assert d["params"] < 1e-5 and d["rows"] < 1e-5, d
    assert r["overlapped"] == 6
