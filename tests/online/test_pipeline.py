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


def test_two_trainers_share_the_stream_across_a_rebalance(tansu_broker):
    """Trainer B joins while A trains: A gives up partitions mid-stream, and
    together they train every example, repeating at most the one batch
    whose commit may still be in flight when the rebalance begins. On the
    separate broker: the embedded cluster's group coordinator refuses
    commits for about a second before members learn of a rebalance, and
    did not always give a revoked member partitions back."""
    from confluent_kafka import Producer

    from monolith_jax.examples.movielens.replay import movielens_features
    from monolith_jax.stream.joiner import ExampleGrouper
    from monolith_jax.stream.messages import encode_example, encode_features

    bs = tansu_broker
    K.ensure_topics(bs, {"examples": 4})
    total = 12_000
    stop = threading.Event()

    def produce():  # ~1,000 examples/s for 12 s, in groups of 8
        prod = Producer(K.producer_config(bs))
        grouper = ExampleGrouper(prod, "examples", group_size=8, linger_s=0.005)
        rng = np.random.default_rng(0)
        none = {f.source: [] for f in movielens_features()}  # a record carries every feature the job reads
        for i in range(total):
            f = encode_features(f"q{i}", i, {**none, "user": [int(rng.integers(0, 500))], "movie": [i % 97]})
            grouper.add(f"q{i}", encode_example(f, float(i % 3 == 0), 1.0, i))
            if i % 100 == 99:
                grouper.flush()
                prod.poll(0)
                time.sleep(0.1)
            if stop.is_set():
                break
        grouper.flush()
        prod.flush(10)

    args = ["--bootstrap", bs, "--group", "shared", "--idle-timeout", "6", "--max-seconds", "120",
            "--max-wait", "0.1", "--batch", "256"]
    a = _start([sys.executable, "-m", "monolith_jax.online.train", "--job", "monolith_jax.examples.movielens.job:job", *args])
    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(5)
    b = _start([sys.executable, "-m", "monolith_jax.online.train", "--job", "monolith_jax.examples.movielens.job:job", *args])
    try:
        ra, rb = _done_line(a, "trainer done "), _done_line(b, "trainer done ")
    finally:
        stop.set()
        producer.join(30)
    assert ra["examples"] > 0 and rb["examples"] > 0, (ra["examples"], rb["examples"])
    assert total <= ra["examples"] + rb["examples"] <= total + 256
