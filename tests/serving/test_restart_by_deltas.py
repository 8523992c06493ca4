"""A restarted serving PS (`--snapshot-dir`) gets only the rows changed
since the trainer snapshot it loaded, not a full copy, and ends equal to
the trainer's tables; a snapshot of another model still gets a full copy.
Real serving PS processes; the trainer is the shop job's (not MovieLens)."""

import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np

from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.serving.sync import SyncPusher
from tests.jobs import shop

JOB = "tests.jobs.shop:job"


def start_ps(port, *args):
    proc = subprocess.Popen([sys.executable, "-m", "monolith_jax.serving.serving_ps", "--port", str(port),
                             "--table", f"ids:{shop.DIM}", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def train(trainer, batches, n):
    for _ in range(n):
        trainer.train_step_host(next(batches))


def server_rows(port, keys):
    """key -> row the serving PS holds, and the rows it holds in all."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pbg.ServingPSStub(ch)
        r = stub.Lookup(pb.LookupRequest(table="ids", keys=np.asarray(keys, np.uint64).tobytes()))
        values = np.frombuffer(r.values, np.float32).reshape(-1, r.dim)
        found = np.frombuffer(r.found, np.uint8).astype(bool)
        held = stub.Version(pb.VersionRequest()).rows["ids"]
    return {int(k): v for k, v, f in zip(keys, values, found) if f}, held


def assert_equal_to_trainer(port, table):
    keys, values = table.export()
    reference = {int(k): v for k, v in zip(keys, values)}   # the trainer's rows, by key
    served, held = server_rows(port, keys)
    assert held == len(reference) and served.keys() == reference.keys()
    for k, v in reference.items():
        np.testing.assert_array_equal(served[k], v, err_msg=f"row {k}")


def batches_of(tmp_path, name, part):
    from monolith_jax.job import load_job

    path = tmp_path / f"{name}.parquet"
    shop.make_log(str(path), n=6000, part=part)
    job = load_job(JOB)

    def forever():
        while True:
            yield from job.batches(str(path), batch_size=128)
    return load_job(JOB).make_trainer(log_every=0), forever()


def test_a_restarted_serving_ps_gets_the_rows_changed_since_its_snapshot(tmp_path):
    from monolith_jax.snapshot import Snapshots

    trainer, batches = batches_of(tmp_path, "log", 0)
    table = trainer.tables["ids"]
    snaps = Snapshots(str(tmp_path / "snaps"), every_s=None)
    train(trainer, batches, 20)
    ps, port = start_ps(0)
    pusher = SyncPusher(trainer.tables, f"127.0.0.1:{port}", "shop-0", max_rows_per_message=512)
    try:
        assert pusher.push_once() and pusher.stats["full_copies"] == 1
        full_bytes = pusher.stats["bytes"]
        train(trainer, batches, 5)
        assert pusher.push_once()
        assert snaps.save(trainer.step_count, trainer, {"offsets": {}}) and snaps.wait() is not None
        train(trainer, batches, 3)   # pushed before the restart
        assert pusher.push_once()
        stop(ps)
        train(trainer, batches, 3)   # not pushed: the server is down
        before = trainer.step_count
        ps, port2 = start_ps(port, "--snapshot-dir", str(tmp_path / "snaps"))
        assert port2 == port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            version = pbg.ServingPSStub(ch).Version(pb.VersionRequest())
        assert version.HasField("snapshot") and version.snapshot.step == snaps.steps()[-1]
        assert not version.applied
        rows_before = pusher.stats["rows"]
        assert pusher.push_once()
        # Only the rows changed since the snapshot went: no second full copy.
        assert pusher.stats["full_copies"] == 1 and pusher.stats["since_snapshot"] == 1
        sent = pusher.stats["rows"] - rows_before
        assert 0 < sent < len(table)
        assert pusher.stats["since_snapshot_bytes"] < full_bytes
        assert trainer.step_count == before
        assert_equal_to_trainer(port, table)
        # Once a push is applied the server no longer offers its snapshot.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert not pbg.ServingPSStub(ch).Version(pb.VersionRequest()).HasField("snapshot")
        train(trainer, batches, 2)
        assert pusher.push_once() and pusher.stats["full_copies"] == 1
        assert_equal_to_trainer(port, table)
    finally:
        pusher.stop(final_push=False)
        if ps.poll() is None:
            stop(ps)
        snaps.close()


def test_a_snapshot_of_another_model_or_none_gets_a_full_copy(tmp_path):
    from monolith_jax.snapshot import Snapshots

    ours, batches = batches_of(tmp_path, "ours", 0)
    other, other_batches = batches_of(tmp_path, "other", 1)
    train(ours, batches, 10)
    train(other, other_batches, 10)
    mine, theirs = Snapshots(str(tmp_path / "mine"), every_s=None), Snapshots(str(tmp_path / "theirs"), every_s=None)
    try:
        # The same step in both folders: the rows, not the step, tell the snapshot is not ours.
        assert mine.save(10, ours, {}) and mine.wait() is not None
        assert theirs.save(10, other, {}) and theirs.wait() is not None
        for args in (["--snapshot-dir", str(tmp_path / "theirs")], []):
            ps, port = start_ps(0, *args)
            pusher = SyncPusher(ours.tables, f"127.0.0.1:{port}", "shop-0")
            try:
                assert pusher.push_once()
                assert pusher.stats["full_copies"] == 1 and pusher.stats["since_snapshot"] == 0
                # Another model's snapshot is offered, and refused when its rows do not match.
                assert pusher.stats["since_snapshot_refused"] == (1 if args else 0)
                assert_equal_to_trainer(port, ours.tables["ids"])
            finally:
                pusher.stop(final_push=False)
                stop(ps)
    finally:
        mine.close(), theirs.close()


def test_a_trainer_resumed_from_the_snapshot_the_server_loaded_sends_deltas_from_its_first_push(tmp_path):
    from monolith_jax.snapshot import Snapshots

    trainer, batches = batches_of(tmp_path, "log", 0)
    train(trainer, batches, 10)
    snaps = Snapshots(str(tmp_path / "snaps"), every_s=None)
    try:
        assert snaps.save(trainer.step_count, trainer, {}) and snaps.wait() is not None
        train(trainer, batches, 2)
        ps, port = start_ps(0, "--snapshot-dir", str(tmp_path / "snaps"))
        pusher = SyncPusher(trainer.tables, f"127.0.0.1:{port}", "shop-0")
        try:
            t0 = time.monotonic()
            assert pusher.push_once(), time.monotonic() - t0
            assert pusher.stats["full_copies"] == 0 and pusher.stats["since_snapshot"] == 1
            assert pusher.stats["rows"] < len(trainer.tables["ids"])
            assert_equal_to_trainer(port, trainer.tables["ids"])
        finally:
            pusher.stop(final_push=False)
            stop(ps)
    finally:
        snaps.close()


def test_rows_fingerprint_is_order_free_additive_and_sees_one_bit():
    from monolith_jax.serving.serving_ps import rows_fingerprint

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**64, 300_000, dtype=np.uint64)   # more than one chunk
    values = rng.normal(size=(keys.size, 5)).astype(np.float32)
    whole = rows_fingerprint(keys, values)
    order = rng.permutation(keys.size)
    assert rows_fingerprint(keys[order], values[order]) == whole
    assert (rows_fingerprint(keys[:1000], values[:1000]) + rows_fingerprint(keys[1000:], values[1000:])) \
        % (1 << 64) == whole
    changed = values.copy()
    changed[7, 2] = np.nextafter(changed[7, 2], np.float32(np.inf))
    assert rows_fingerprint(keys, changed) != whole
    assert rows_fingerprint(keys[1:], values[1:]) != whole
    assert rows_fingerprint(keys[:0], values[:0]) == 0
