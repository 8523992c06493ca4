"""The joiner and the trainer as separate processes, over one broker: the
embedded cluster and a broker in its own process."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

from monolith_jax.stream import kafka as K
from monolith_jax.examples.movielens import replay as R
from monolith_jax.examples.movielens.loop import joiner_command
from tests.examples.streams import synthetic_ratings

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def _start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def _done_line(proc, prefix, timeout=180):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    line = next((ln for ln in out.splitlines() if ln.startswith(prefix)), None)
    assert line is not None, out[-3000:]
    return json.loads(line[len(prefix):])


def _read_all(bootstrap, topic, n, timeout=30):
    from confluent_kafka import Consumer

    c = Consumer(K.consumer_config(bootstrap, f"reader-{time.time()}"))
    c.subscribe([topic])
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += [m for m in c.consume(100, 0.01) if m.error() is None]
    c.close()
    return got


def run_pipeline(bootstrap, n=1500, trainer_args=()):
    """Replays synthetic requests plus malformed messages, then runs a joiner
    process and a trainer process until the stream is drained."""
    from confluent_kafka import Producer

    K.ensure_topics(bootstrap, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
    ratings = synthetic_ratings(n)
    stream = R.MovieLensStream(ratings, impressions=0.5, seed=2)
    replayed = R.replay(bootstrap, stream, report_every_s=0)
    prod = Producer(K.producer_config(bootstrap))
    prod.produce("features", value=b"\x08\x01garbage", key="bad1")
    prod.produce("actions", value=b'{"event_time_ms": 5, "type": "rate"}', key="bad2")  # no request_id
    prod.produce("examples", value=b"\xff\xfe not an example", key="bad3")
    prod.flush(10)
    joiner = _start(joiner_command(bootstrap, 60.0, 0.5, "itest-joiner", idle_flush_s=4.0))
    trainer = _start([sys.executable, "-m", "monolith_jax.online.train", "--job", "monolith_jax.examples.movielens.job:job", "--bootstrap", bootstrap,
                      "--group", "itest-trainer", "--idle-timeout", "8", "--max-seconds", "150",
                      "--max-wait", "0.2", *trainer_args])
    joined = _done_line(joiner, "joiner done ")
    trained = _done_line(trainer, "trainer done ")
    return ratings, stream, replayed, joined, trained


def check_pipeline(bootstrap, ratings, stream, replayed, joined, trained):
    positives = int(np.sum(ratings.rating >= R.MIN_VALUE))
    requests = stream.n_ratings + stream.n_impressions
    assert replayed["features"] == requests and replayed["actions"] == stream.n_ratings
    # Every action's delay (<= 30 s) is inside the 60 s window: all matched.
    assert joined["positives"] == positives
    assert joined["late_actions"] == joined["orphan_actions"] == 0
    assert joined["positives"] + joined["negatives"] + joined["negatives_sampled_out"] == requests
    assert 0.35 < joined["negatives"] / (requests - positives) < 0.65  # negative rate 0.5
    assert joined["dead_letters"] == 2
    # The trainer trained every example the joiner wrote, once; the bad one went to dead letters.
    assert trained["examples"] == joined["positives"] + joined["negatives"]
    assert trained["dead_letters"] == 1
    assert np.isfinite(trained["stream_auc"])
    dead = _read_all(bootstrap, K.TOPICS["dead_letters"], 3)
    reasons = sorted(dict(m.headers())["reason"].decode() for m in dead)
    assert len(dead) == 3
    assert any("unreadable features" in r for r in reasons)
    assert any("no request_id" in r for r in reasons)
    assert any("not protobuf" in r for r in reasons)


def test_joiner_and_trainer_processes_over_the_embedded_cluster():
    """... with the trainer pushing its touched rows to a serving PS process."""
    import grpc

    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.rpc import serving_pb2_grpc as pbg
    from tests.serving.test_serving_ps import start_server

    ps, port = start_server(table="ids:9")
    try:
        with K.EmbeddedKafka() as kafka:
            result = run_pipeline(kafka.bootstrap, trainer_args=("--serving-ps", f"127.0.0.1:{port}",
                                                                  "--sync-interval", "1",
                                                                  "--dense-sync-interval", "2"))
            check_pipeline(kafka.bootstrap, *result)
        trained = result[-1]
        version = pbg.ServingPSStub(grpc.insecure_channel(f"127.0.0.1:{port}")).Version(pb.VersionRequest())
        assert trained["sync"]["full_copies"] == 1 and trained["sync"]["failures"] == 0
        assert trained["sync"]["pushes"] >= 2
        assert version.rows["ids"] == trained["table_rows"]["ids"] > 0, "serving holds every trained row"
        assert list(version.applied.values()) == [trained["sync"]["pushes"]]
        assert trained["sync"]["dense_pushes"] >= 2 and version.dense_version > 0, "dense params follow too"
    finally:
        ps.terminate()
        ps.wait(10)


def test_joiner_and_trainer_processes_over_a_broker_process(tansu_broker):
    check_pipeline(tansu_broker, *run_pipeline(tansu_broker, n=800))


class Lines:
    """A process's output lines, read in a thread; `wait_for(pred)` blocks
    until a line satisfies it or the process exits."""

    def __init__(self, proc):
        self.proc, self.lines, self.cond = proc, [], threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)  # the end
            self.cond.notify_all()

    def wait_for(self, pred) -> bool:
        with self.cond:
            while True:
                if any(ln is not None and pred(ln) for ln in self.lines):
                    return True
                if self.lines and self.lines[-1] is None:
                    return False
                self.cond.wait()

    def done(self, prefix="trainer done "):
        self.proc.wait(300)
        self.thread.join(30)
        out = "\n".join(ln for ln in self.lines if ln is not None)
        assert self.proc.returncode == 0, out[-3000:]
        line = next((ln for ln in self.lines if ln and ln.startswith(prefix)), None)
        assert line is not None, out[-3000:]
        return json.loads(line[len(prefix):])


def _has_trained(line: str) -> bool:
    return line.startswith("trainer {") and json.loads(line[len("trainer "):])["examples"] > 0


def test_two_trainers_share_the_stream_across_a_rebalance(tansu_broker, tmp_path):
    """Trainer B joins once A has trained: A gives up partitions mid-stream,
    and together they train every example exactly once (each example's
    event time is its number: none missing, none twice). Before B's first
    examples A commits, synchronously, what it trained from the partitions
    it gives up (the commits of its last batches may still be in flight),
    and drops what it fetched but did not train. On the separate broker:
    the embedded cluster's coordinator refuses commits during a rebalance
    (`monolith cluster` refuses several trainers there)."""
    from confluent_kafka import Producer

    from monolith_jax.examples.movielens.replay import movielens_features
    from monolith_jax.stream.joiner import ExampleGrouper
    from monolith_jax.stream.messages import encode_example, encode_features

    bs = tansu_broker
    K.ensure_topics(bs, {"examples": 4})
    b_trained, stop = threading.Event(), threading.Event()
    produced = []

    def produce():  # ~1,000 examples/s in groups of 8, until 3,000 after B has trained (at most 100,000)
        prod = Producer(K.producer_config(bs))
        grouper = ExampleGrouper(prod, "examples", group_size=8, linger_s=0.005)
        rng = np.random.default_rng(0)
        none = {f.source: [] for f in movielens_features()}  # a record carries every feature the job reads
        i, last = 0, 100_000
        while i < last and not stop.is_set():
            for _ in range(100):
                f = encode_features(f"q{i}", i, {**none, "user": [int(rng.integers(0, 500))], "movie": [i % 97]})
                grouper.add(f"q{i}", encode_example(f, float(i % 3 == 0), 1.0, i))
                i += 1
            grouper.flush()
            prod.poll(0)
            if b_trained.is_set():
                last = min(last, i + 3000)
            time.sleep(0.1)
        grouper.flush()
        assert prod.flush(30) == 0
        produced.append(i)

    def trainer(name):
        return _start([sys.executable, "-m", "monolith_jax.online.train", "--job",
                       "monolith_jax.examples.movielens.job:job", "--bootstrap", bs, "--group", "shared",
                       "--idle-timeout", "6", "--max-seconds", "300", "--max-wait", "0.1", "--batch", "256",
                       "--prequential-out", str(tmp_path / f"{name}.npz")])

    a = Lines(trainer("a"))
    producer = threading.Thread(target=produce)
    producer.start()
    b = None
    try:
        assert a.wait_for(_has_trained), "A trained nothing"
        b = Lines(trainer("b"))
        assert b.wait_for(_has_trained), "B trained nothing"
        b_trained.set()
        producer.join(300)
        ra, rb = a.done(), b.done()
    finally:
        stop.set()
        producer.join(30)
        for t in (a, b):
            if t is not None and t.proc.poll() is None:
                t.proc.kill()
    total = produced[0]
    assert ra["examples"] > 0 and rb["examples"] > 0, (ra["examples"], rb["examples"])
    trained = np.concatenate([np.load(tmp_path / f"{n}.npz")["event_ms"] for n in ("a", "b")])
    assert len(trained) == ra["examples"] + rb["examples"]
    dup = np.unique(trained, return_counts=True)
    assert not np.any(dup[1] > 1), f"trained twice: {dup[0][dup[1] > 1][:20]} ({int(np.sum(dup[1] > 1))} in all)"
    np.testing.assert_array_equal(np.sort(trained), np.arange(total))
