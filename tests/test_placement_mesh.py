"""The dense step data parallel over several local devices (4 CPU devices
forced in a fresh interpreter: the flag must be set before JAX starts, and
importing monolith_jax sets none): equal to one device on the same global
batch (one that does not split evenly too), params replicated on the
devices between steps."""

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
    pred = float(np.max(np.abs(one.predict(batches[0]) - fitted.predict(batches[0]))))
    # A batch that does not split over 4 devices (a file's last batch): padded
    # with weight-0 examples, the same update as one device on it.
    from tests.serving.test_predictor import make_batch
    odd = make_batch(one, np.random.default_rng(7), b=63, pool=300)
    one.train_step(odd)
    stepped.train_step(odd)
    (l1, t1), (l2, t2) = _state(one), _state(stepped)
    odd = {"params": max(float(np.max(np.abs(a - b), initial=0)) for a, b in zip(l1, l2)),
           "rows": max(float(np.max(np.abs(t1[n]["values"] - t2[n]["values"]), initial=0)) for n in t1),
           "same_keys": all(np.array_equal(t1[n]["keys"], t2[n]["keys"]) for n in t1)}
    print(json.dumps({"shardings": sorted(set(shardings)), "diffs": diffs, "odd": odd,
                      "pred": pred}))
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
    odd = r["odd"]   # 63 examples on 4 devices
    assert odd["same_keys"] and odd["params"] < 1e-5 and odd["rows"] < 1e-5, odd


def test_importing_monolith_jax_sets_no_device_flags():
    code = "import os; import monolith_jax; print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stderr


def test_host_mesh_says_why_when_jax_started_with_fewer_devices():
    """`monolith train --host-devices N` asks for the devices before JAX
    starts; a process whose JAX started first (here: this one, with its
    default single CPU device) gets an error naming the cause, not a
    smaller mesh."""
    import jax
    import pytest

    from monolith_jax.placement import HostDevicesError, host_mesh

    n = jax.device_count()
    assert host_mesh(n).devices.size == n
    with pytest.raises(HostDevicesError, match="started before"):
        host_mesh(n + 1)
