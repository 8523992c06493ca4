"""A trainer process killed with SIGKILL mid-stream resumes from its snapshots
and ends where an uninterrupted run ends; a serving PS killed during syncing
is back with the trainer's rows within one sync interval of its restart."""

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

from monolith_jax.stream import kafka as K
from monolith_jax.examples.movielens import replay as R
from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.examples.movielens.loop import movielens_trainer
from monolith_jax.stream.messages import encode_example
from monolith_jax.serving.sync import SyncPusher
from monolith_jax.snapshot import Snapshots
from tests.examples.streams import synthetic_ratings
from tests.serving.test_serving_ps import DIM, lookup, start_server, trainer_table

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}
BATCH = 128
N_EXAMPLES = BATCH * 150


def produce_examples(bootstrap, topic, n):
    """n examples (one per Kafka message) in one partition, in a fixed order."""
    from confluent_kafka import Producer

    K.ensure_topics(bootstrap, {topic: 1})
    stream = R.MovieLensStream(synthetic_ratings(n, users=3000, items=500, seed=5), impressions=0.0, seed=1)
    prod = Producer(K.producer_config(bootstrap))
    rng = np.random.default_rng(0)
    sent = 0
    for kind, rid, value, t in stream.messages():
        if kind != "features":
            continue
        K.produce(prod, topic, encode_example(value, float(rng.random() < 0.3), 1.0, t), "k")
        sent += 1
        if sent == n:
            break
    prod.flush(30)
    return sent


def trainer_cmd(bootstrap, topic, group, snap_dir, summary, full_every=1):
    return [sys.executable, "-m", "monolith_jax.online.train", "--job", "monolith_jax.examples.movielens.job:job", "--bootstrap", bootstrap, "--group", group,
            "--topic-examples", topic, "--batch", str(BATCH), "--max-wait", "30", "--idle-timeout", "4",
            "--snapshot-dir", str(snap_dir), "--snapshot-every-steps", "10", "--snapshot-every-s", "0",
            "--summary", str(summary), "--no-warmup", "--snapshot-full-every", str(full_every)]


def snapshot_steps(folder) -> list:
    """Steps of the complete snapshots in a folder (Orbax renames a finished one to its step)."""
    return [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []


def final_state(snap_dir):
    trainer = movielens_trainer(out=lambda *a, **k: None)
    meta = Snapshots(str(snap_dir)).restore(trainer)
    return trainer, meta


def snapshot_kinds(folder) -> set:
    """"full" / "delta" of the snapshots in a folder, from their metas."""
    kinds = set()
    for step in snapshot_steps(folder):
        with open(os.path.join(folder, str(step), "meta", "metadata")) as f:
            kinds.add(json.load(f).get("kind", "full"))
    return kinds


def test_sigkilled_trainer_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    """Killed and resumed from full snapshots (full_every=1) and from a
    chain of incremental ones (full_every=4: a full one, then 3 deltas of
    the rows changed); both end where one uninterrupted run ends (the
    snapshot cadence does not change what is trained)."""
    from monolith_jax.stream.broker import BrokerProcess

    topic = "examples-resume"
    with BrokerProcess() as bootstrap:
        assert produce_examples(bootstrap, topic, N_EXAMPLES) == N_EXAMPLES
        done = subprocess.run(trainer_cmd(bootstrap, topic, "whole", tmp_path / "whole", tmp_path / "whole.json"),
                              capture_output=True, text=True, timeout=300, env=ENV)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        for full_every in (1, 4):
            # Killed with SIGKILL once a few snapshots are complete, then restarted.
            name = f"killed-{full_every}"
            cmd = trainer_cmd(bootstrap, topic, name, tmp_path / name, tmp_path / f"{name}.json", full_every)
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
            deadline = time.monotonic() + 120
            while max(snapshot_steps(tmp_path / name), default=0) < 30:
                assert proc.poll() is None and time.monotonic() < deadline, "the trainer ended before it could be killed"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
            if full_every > 1:
                assert "delta" in snapshot_kinds(tmp_path / name)
            again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
            assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    whole, whole_meta = final_state(tmp_path / "whole")
    for full_every in (1, 4):
        name = f"killed-{full_every}"
        resumed = json.loads((tmp_path / f"{name}.json").read_text())
        assert resumed["resumed_from"] is not None and 30 <= resumed["resumed_from"] < N_EXAMPLES // BATCH, name
        killed, killed_meta = final_state(tmp_path / name)
        # Every example produced was trained, once.
        assert whole_meta["examples"] == killed_meta["examples"] == N_EXAMPLES
        assert whole.step_count == killed.step_count == N_EXAMPLES // BATCH
        assert whole_meta["offsets"] == killed_meta["offsets"] == {topic: {"0": N_EXAMPLES}}
        for x, y in zip(jax.tree.leaves(whole.params), jax.tree.leaves(killed.params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
        a, b = whole.tables["ids"].dump(), killed.tables["ids"].dump()
        oa, ob = np.argsort(a["keys"]), np.argsort(b["keys"])
        np.testing.assert_array_equal(a["keys"][oa], b["keys"][ob])
        np.testing.assert_allclose(a["values"][oa], b["values"][ob], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a["slots"][oa], b["slots"][ob], rtol=1e-4, atol=1e-5)


def test_killed_serving_ps_is_back_with_the_trainers_rows_within_one_sync_interval():
    interval = 0.5
    proc, port = start_server()
    table = trainer_table()
    keys = np.arange(1, 5001, dtype=np.uint64)
    table.lookup_host(keys)
    pusher = SyncPusher({"ids": table}, f"127.0.0.1:{port}", "t0", interval_s=interval, timeout_s=2)
    pusher.start()
    stop = threading.Event()
    rng = np.random.default_rng(0)

    def train():
        step = 0
        while not stop.is_set():  # the trainer keeps touching rows
            step += 1
            k = rng.choice(keys, 200, replace=False)
            table.apply_gradients_host(k, rng.normal(0, 0.1, (k.size, DIM)).astype(np.float32), step=step)
            time.sleep(0.01)

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        time.sleep(3 * interval)
        assert pusher.stats["pushes"] >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        time.sleep(2 * interval)   # a push waits for the server (or fails and keeps its rows)
        proc, port2 = start_server(port)
        restarted = time.monotonic()
        stub = pbg.ServingPSStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        while not stub.Version(pb.VersionRequest()).applied.get("t0"):
            assert time.monotonic() - restarted < 10, "no push reached the restarted server"
            time.sleep(0.01)
        back = time.monotonic() - restarted
        # Within a sync interval plus the channel's reconnect backoff (at
        # most 1 s, `wire.channel`) and scheduling slack on a busy machine.
        assert back <= interval + 1.5, f"back after {back:.2f} s"
        assert dict(stub.Version(pb.VersionRequest()).rows) == {"ids": keys.size}
        stop.set()
        trainer.join()
        time.sleep(2 * interval + 0.2)  # the last touched rows go out with the next push
        values, found = lookup(stub, keys)
        assert found.all() and np.array_equal(values, table.find(keys)[0])
        assert pusher.stats["full_copies"] == 2   # the restarted server got a full copy, then deltas
    finally:
        stop.set()
        trainer.join()
        pusher.stop(final_push=False)
        proc.terminate()
        proc.wait(10)


def test_sigterm_takes_a_last_snapshot_and_commits_its_offsets(tmp_path):
    from confluent_kafka import Consumer, TopicPartition

    from monolith_jax.stream.broker import BrokerProcess

    topic, n = "examples-term", BATCH * 20
    with BrokerProcess() as bootstrap:
        produce_examples(bootstrap, topic, n)
        cmd = trainer_cmd(bootstrap, topic, "term", tmp_path / "snaps", tmp_path / "term.json")
        cmd[cmd.index("--snapshot-every-steps") + 1] = "100000"   # no periodic snapshot
        cmd[cmd.index("--idle-timeout") + 1] = "120"
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        lines, trained = [], threading.Event()

        def read():   # the trainer's report lines (every 5 s): SIGTERM once it has trained all n
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("trainer {") and json.loads(line[len("trainer "):])["examples"] >= n:
                    trained.set()

        reading = threading.Thread(target=read, daemon=True)
        reading.start()
        reader = Consumer(K.consumer_config(bootstrap, "term"))
        deadline = time.monotonic() + 240   # compiling and 20 batches, however busy the machine is
        while not trained.wait(0.5):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            assert not snapshot_steps(tmp_path / "snaps"), "a snapshot before SIGTERM"
        assert not snapshot_steps(tmp_path / "snaps"), "a snapshot before SIGTERM"
        assert reader.committed([TopicPartition(topic, 0)], timeout=10)[0].offset < 0, "nothing committed yet"
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        reading.join(10)
        assert proc.returncode == 0, "".join(lines)[-3000:]
        assert snapshot_steps(tmp_path / "snaps") == [n // BATCH]
        assert reader.committed([TopicPartition(topic, 0)], timeout=10)[0].offset == n
        reader.close()
    _, meta = final_state(tmp_path / "snaps")
    assert meta["examples"] == n and meta["offsets"] == {topic: {"0": n}}
