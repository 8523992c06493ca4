"""Training PS shards (their own processes) behind a ShardedTable: a trainer
on two shards trains exactly as one on a local table; misrouted keys and a
shard that is down are handled."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import jax
import numpy as np
import pytest

from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.examples.movielens.loop import movielens_trainer
from monolith_jax.distributed.training_ps import ShardedTable, shard_of
from monolith_jax.sparse.config import config_to_dict
from tests.serving.test_predictor import make_batch

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def start_shard(shard, shards, tables_path, port=0):
    proc = subprocess.Popen([sys.executable, "-m", "monolith_jax.distributed.training_ps", "--shard", str(shard),
                             "--shards", str(shards), "--tables", str(tables_path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc, int(line.rsplit(":", 1)[1])


@pytest.fixture
def two_shards(tmp_path):
    trainer = movielens_trainer(dim=4, hidden=(8,), out=lambda *a, **k: None)
    path = tmp_path / "tables.json"
    path.write_text(json.dumps([config_to_dict(t.config) for t in trainer.tables.values()]))
    procs = [start_shard(s, 2, path) for s in range(2)]
    yield path, procs
    for proc, _ in procs:
        proc.terminate()
        proc.wait(10)


def test_shard_of_is_stable_and_spreads_keys():
    keys = np.arange(1, 100_001, dtype=np.uint64)
    s = shard_of(keys, 4)
    assert np.array_equal(s, shard_of(keys, 4)) and set(np.unique(s)) == {0, 1, 2, 3}
    assert np.all(np.abs(np.bincount(s) / keys.size - 0.25) < 0.01)
    assert shard_of(np.array([2**64 - 1], np.uint64), 3)[0] in (0, 1, 2)


def test_trainer_on_two_shards_trains_as_on_a_local_table(two_shards):
    _, procs = two_shards
    local = movielens_trainer(dim=4, hidden=(8,), out=lambda *a, **k: None)
    remote = movielens_trainer(dim=4, hidden=(8,), out=lambda *a, **k: None)
    sharded = ShardedTable(remote.tables["ids"].config, [f"127.0.0.1:{p}" for _, p in procs])
    remote.collection.tables["ids"] = sharded
    rng = np.random.default_rng(0)
    for step in range(6):
        batch = make_batch(local, rng)
        local.train_step(batch, stamp=step)
        remote.train_step_host(batch, stamp=step)
    for x, y in zip(jax.tree.leaves(local.params), jax.tree.leaves(remote.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    keys, values = local.tables["ids"].export()
    got, found = sharded.find(keys)
    assert found.all() and len(sharded) == keys.size
    np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-6)
    # Evaluation reads through the shards too, creating nothing.
    probe = make_batch(local, rng, fresh="user")
    np.testing.assert_allclose(remote.predict(probe), local.predict(probe), rtol=1e-5, atol=1e-6)
    assert len(sharded) == keys.size
    sharded.close()


def test_a_shard_refuses_keys_it_does_not_own(two_shards):
    _, procs = two_shards
    keys = np.arange(1, 200, dtype=np.uint64)
    foreign = keys[shard_of(keys, 2) == 1]
    stub = pbg.TrainingPSStub(grpc.insecure_channel(f"127.0.0.1:{procs[0][1]}"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Lookup(pb.ShardLookupRequest(table="ids", keys=foreign.tobytes()), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "belong to other shards" in err.value.details()
    assert stub.Info(pb.ShardInfoRequest(), timeout=10).rows["ids"] == 0


def test_training_waits_for_a_shard_that_is_down_and_goes_on_when_it_is_back(two_shards, caplog):
    path, procs = two_shards
    trainer = movielens_trainer(dim=4, hidden=(8,), out=lambda *a, **k: None)
    sharded = ShardedTable(trainer.tables["ids"].config, [f"127.0.0.1:{p}" for _, p in procs], timeout_s=0.5,
                           retry_log_s=0.2)
    trainer.collection.tables["ids"] = sharded
    rng = np.random.default_rng(1)
    trainer.train_step_host(make_batch(trainer, rng), stamp=0)
    rows_shard0 = pbg.TrainingPSStub(grpc.insecure_channel(f"127.0.0.1:{procs[0][1]}")).Info(
        pb.ShardInfoRequest(), timeout=10).rows["ids"]
    proc1, port1 = procs[1]
    proc1.send_signal(signal.SIGKILL)
    proc1.wait(10)
    done = threading.Event()
    t = threading.Thread(target=lambda: (trainer.train_step_host(make_batch(trainer, rng), stamp=1), done.set()))
    t.start()
    time.sleep(1.5)
    assert not done.is_set(), "training went on without shard 1"
    procs[1] = start_shard(1, 2, path, port1)   # back, empty (no --snapshot-dir; test_scale_out restores one)
    t.join(30)
    assert done.is_set()
    assert any("does not answer" in r.getMessage() for r in caplog.records)
    # Shard 0 lost nothing.
    after = pbg.TrainingPSStub(grpc.insecure_channel(f"127.0.0.1:{procs[0][1]}")).Info(
        pb.ShardInfoRequest(), timeout=10).rows["ids"]
    assert after >= rows_shard0
    sharded.close()
