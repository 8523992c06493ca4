"""The dense step data parallel over several local devices (4 CPU devices
forced in a fresh interpreter: the flag must be set before JAX starts, and
importing monolith_jax sets none): equal to one device on the same global
batch, params replicated on the devices between steps."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import dataclasses, json
    import jax
    import numpy as np
    import monolith_jax  # must not change the device count
    from tests.test_placement import _batches, _state, _trainer

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("batch",))
    batches = _batches(_trainer(), 6)
    one = _trainer(placement="host", overlap=False)
    stepped = _trainer(mesh=mesh)
    fitted = _trainer(mesh=mesh, overlap=True)
    assert stepped.step_placement() == "host"
    shardings = []
    for b in batches:
        one.train_step(b)
        stepped.train_step(b)
        for leaf in jax.tree.leaves(stepped.params) + jax.tree.leaves(stepped.opt_state):
            s = leaf.sharding
            shardings.append((len(s.device_set), bool(s.is_fully_replicated)))
    fitted.fit(batches)
    for leaf in jax.tree.leaves(fitted.params):
        shardings.append((len(leaf.sharding.device_set), bool(leaf.sharding.is_fully_replicated)))
    diffs = {}
    (l1, t1) = _state(one)
    for name, t in (("stepped", stepped), ("fitted", fitted)):
        l2, t2 = _state(t)
        diffs[name] = {
            "params": max(float(np.max(np.abs(a - b), initial=0)) for a, b in zip(l1, l2)),
            "rows": max(float(np.max(np.abs(t1[n]["values"] - t2[n]["values"]), initial=0)) for n in t1),
            "same_keys": all(np.array_equal(t1[n]["keys"], t2[n]["keys"]) for n in t1),
            "steps": t.step_count,
        }
    try:
        stepped.train_step(dataclasses.replace(batches[0], weights=np.ones(63, np.float32)))
        odd = "accepted"
    except ValueError as e:
        odd = str(e)
    print(json.dumps({"shardings": sorted(set(shardings)), "diffs": diffs, "odd": odd,
                      "pred": float(np.max(np.abs(one.predict(batches[0]) - fitted.predict(batches[0]))))}))
""")


def test_mesh_step_equals_one_device_and_keeps_params_on_the_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["shardings"] == [[4, True]]  # every param and optimizer leaf replicated on the 4 devices
    for name in ("stepped", "fitted"):
        d = r["diffs"][name]
        assert d["same_keys"] and d["steps"] == 6
        assert d["params"] < 1e-5 and d["rows"] < 1e-5, d  # the sums' order differs, nothing else
    assert r["pred"] < 1e-5
    assert "does not split over the mesh's 4 devices" in r["odd"]


def test_importing_monolith_jax_sets_no_device_flags():
    code = "import os; import monolith_jax; print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stderr
