"""Data-parallel trainers (`monolith_jax.distributed.data_parallel`): two processes, each
on half of every batch, end with the dense params and rows one process
gets on the whole batches (jax.distributed, gloo all-reduce on CPU)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from monolith_jax.features import SparseBatch
from monolith_jax.sparse import Keys

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}
STEPS, HALF = 6, 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(trainer, half: int, process: int | None):
    """STEPS batches of 2*half examples; the halves' ids never meet (so the
    two processes' tables hold the rows one table would). process None: the
    whole batch; 0 or 1: that half."""
    from tests.serving.test_predictor import make_batch

    rng = np.random.default_rng(7)
    for _ in range(STEPS):
        parts = [make_batch(trainer, rng, b=half) for _ in range(2)]
        shifted = SparseBatch(ids={n: Keys.from_ids(k.to_numpy() + np.uint64(10**9)) for n, k in parts[1].ids.items()},
                              lengths=parts[1].lengths, dense=parts[1].dense, labels=parts[1].labels,
                              weights=parts[1].weights)
        parts[1] = shifted
        if process is not None:
            yield parts[process]
        else:
            yield SparseBatch(ids={n: Keys(np.concatenate([p.ids[n].words for p in parts])) for n in parts[0].ids},
                              lengths={n: np.concatenate([p.lengths[n] for p in parts]) for n in parts[0].lengths},
                              dense=np.concatenate([p.dense for p in parts]),
                              labels=np.concatenate([p.labels for p in parts]),
                              weights=np.concatenate([p.weights for p in parts]))


def worker(coordinator: str, process: int, out: str) -> None:
    from monolith_jax.distributed.data_parallel import DataParallel

    dp = DataParallel(coordinator, 2, process)
    from monolith_jax.examples.movielens.loop import movielens_trainer

    trainer = movielens_trainer(seed=0, dim=4, hidden=(8,), out=lambda *a, **k: None)
    if process:  # attach() must start both from process 0's params
        trainer.params = jax.tree.map(lambda x: x + 1.0, trainer.params)
    dp.attach(trainer)
    losses = [float(trainer.train_step_host(b, stamp=i)) for i, b in enumerate(batches(trainer, HALF, process))]
    dump = trainer.tables["ids"].dump()
    np.savez(out, losses=np.array(losses), keys=dump["keys"], values=dump["values"],
             **{f"p{i}": np.asarray(v) for i, v in enumerate(jax.tree.leaves(trainer.params))})


def test_two_processes_train_as_one_on_the_whole_batch(tmp_path):
    from monolith_jax.examples.movielens.loop import movielens_trainer

    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; from tests.distributed.test_data_parallel import worker; "
                               "worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])",
                               coordinator, str(p), str(tmp_path / f"w{p}.npz")], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    one = movielens_trainer(seed=0, dim=4, hidden=(8,), out=lambda *a, **k: None)
    losses = [float(one.train_step_host(b, stamp=i)) for i, b in enumerate(batches(one, HALF, None))]
    got = [np.load(tmp_path / f"w{p}.npz") for p in range(2)]
    for g in got:
        np.testing.assert_allclose(g["losses"], losses, rtol=1e-5)
        for i, v in enumerate(jax.tree.leaves(one.params)):
            np.testing.assert_allclose(g[f"p{i}"], np.asarray(v), rtol=1e-5, atol=1e-6)
    # Each process's rows are those of the single table for its half's ids.
    dump = one.tables["ids"].dump()
    ref = dict(zip(dump["keys"].tolist(), dump["values"]))
    assert sum(len(g["keys"]) for g in got) == len(ref)
    for g in got:
        for k, v in zip(g["keys"].tolist(), g["values"]):
            np.testing.assert_allclose(v, ref[k], rtol=1e-5, atol=1e-6)


LISTENERS = """
import sys
from monolith_jax.distributed.data_parallel import DataParallel
dp = DataParallel(sys.argv[1], 1, 0, timeout_s=60)
port = "%04X" % int(sys.argv[1].rsplit(":", 1)[1])
for path in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(path).read().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(":" + port) and fields[3] == "0A":   # 0A: listening
            print("LISTEN", fields[1].rsplit(":", 1)[0])
import jax
jax.distributed.shutdown()
"""


def test_the_coordinator_listens_only_where_it_was_asked():
    # Asked for 127.0.0.1, JAX's default listened on [::] (every interface).
    coordinator = f"127.0.0.1:{free_port()}"
    run = subprocess.run([sys.executable, "-c", LISTENERS, coordinator], env=ENV, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    listening = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("LISTEN")]
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert listening and set(listening) <= loopback, listening


def test_a_coordinator_that_is_not_loopback_must_be_asked_for(monkeypatch):
    import pytest

    from monolith_jax.distributed.data_parallel import REMOTE_ENV, coordinator_bind

    monkeypatch.delenv(REMOTE_ENV, raising=False)
    assert coordinator_bind("127.0.0.1:7200") == "127.0.0.1:7200"
    with pytest.raises(ValueError, match="no authentication"):
        coordinator_bind("10.0.0.3:7200")
    assert coordinator_bind("10.0.0.3:7200", allow_remote=True) == "10.0.0.3:7200"
    monkeypatch.setenv(REMOTE_ENV, "1")
    assert coordinator_bind("10.0.0.3:7200") == "10.0.0.3:7200"
    with pytest.raises(ValueError, match="HOST:PORT"):
        coordinator_bind("7200")
