"""The joiner on the embedded cluster, in this process: no input stops it,
every valid message comes out (joined or counted) and every other one is
dead-lettered with its reason; grouped examples fit in a Kafka message."""

import json

import pytest

from monolith_jax.stream import kafka as K
from monolith_jax.stream import messages_pb2 as pb
from monolith_jax.stream.join_state import JoinConfig
from monolith_jax.stream.joiner import Joiner
from monolith_jax.stream.messages import encode_action, encode_features
from tests.stream.kafka_util import producer, read_topic

T0 = 1_700_000_000_000  # event times of the requests, ms


def examples_out(bootstrap):
    """The request ids of every example on the examples topic, and the values' sizes."""
    rids, sizes = [], []
    for m in read_topic(bootstrap, "examples"):
        sizes.append(len(m.value()))
        batch = pb.ExampleBatch.FromString(m.value())
        rids += [e.features.request_id for e in batch.examples] or [pb.Example.FromString(m.value()).features.request_id]
    return rids, sizes


def run_joiner(bootstrap, config, **kwargs):
    joiner = Joiner(bootstrap, config, group="test-joiner", **kwargs)
    try:
        return joiner.run(idle_flush_s=2.0, exit_when_idle=True, max_seconds=120, report_every_s=0)
    finally:
        joiner.close()


@pytest.mark.parametrize("codec", ["native", "python"])
def test_no_message_stops_the_joiner_and_each_is_joined_or_dead_lettered(codec):
    n = 60
    deep = b"[" * 50_000 + b"]" * 50_000
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        prod = producer(bs, **{"message.max.bytes": 5_000_000})  # a producer that may send what ours cannot
        for i in range(n):
            rid, t = f"q{i}", T0 + i * 1000
            prod.produce("features", encode_features(rid, t, {"user": [i], "item": [i]}, {"price": 1.0, "age": 3.0}),
                         rid)
            if i % 2 == 0:
                prod.produce("actions", encode_action(rid, t + 500, "click"), rid)
        bad = {
            "nan-age": ("features", encode_features("nan-age", T0, {"user": [1]}, {"price": 1.0, "age": float("nan")}),
                        "must hold one finite value"),
            "deep-f": ("features", b'{"request_id": "deep", "sparse": ' + deep + b"}", "unreadable features"),
            "deep-a": ("actions", b'{"request_id": "deep", "type": ' + deep + b"}", "unreadable actions"),
            "big-junk": ("features", b"\x08\x01" + b"\xff" * 1_500_000, "unreadable features"),
            "big-record": ("features", encode_features("huge", T0, {"user": list(range(200_000))}),
                           "features record too large"),
            "future": ("features", encode_features("future", 2**62, {"user": [1]}), "event time out of bounds"),
            "int64-max": ("features", encode_features("max", 2**63 - 1, {"user": [1]}), "event time out of bounds"),
            "negative": ("actions", encode_action("q1", -5, "click"), "event time out of bounds"),
        }
        for key, (topic, value, _) in bad.items():
            prod.produce(topic, value, key)
        assert prod.flush(30) == 0
        stats = run_joiner(bs, JoinConfig(window_s=5, lateness_s=1, max_in_memory=5), codec=codec)  # spills to disk
        rids, sizes = examples_out(bs)
        dead = read_topic(bs, "dead-letters")

    assert stats["spilled"] > 0
    # Valid requests in = examples out (negative rate 1): each once; clicks all matched.
    assert sorted(rids) == sorted(f"q{i}" for i in range(n))
    assert stats["positives"] == n // 2 and stats["negatives"] == n // 2
    assert stats["orphan_actions"] == stats["late_actions"] == 0
    assert stats["dead_letters"] == len(dead) == len(bad), stats["dead_letter_reasons"]
    assert stats["dead_letters_failed"] == 0 and stats["examples_failed"] == 0
    by_key = {m.key().decode(): m for m in dead}
    assert set(by_key) == set(bad)
    for key, (_, value, why) in bad.items():
        headers = dict(by_key[key].headers())
        assert why in headers["reason"].decode(), (key, headers["reason"])
        if len(value) > 1_000_000:  # too large for a dead letter: truncated, with its size
            assert headers["truncated"] == b"1" and int(headers["original.size"]) == len(value)
            assert value.startswith(by_key[key].value()) and len(by_key[key].value()) < 1_000_000
        else:
            assert by_key[key].value() == value
    assert max(sizes) < 1_000_000


def test_large_requests_are_grouped_under_the_message_limit_and_all_come_out():
    """400 requests of ~20 KB (7 features x 360 ids): 64 of them would be a
    1.3 MB message, over the producer's 1 MB."""
    n = 400
    ids = {f"f{k}": list(range(k * 1000, k * 1000 + 360)) for k in range(7)}
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        prod = producer(bs)
        for i in range(n):
            value = encode_features(f"r{i}", T0 + i, ids)
            assert 19_000 < len(value) < 21_000
            prod.produce("features", value, f"r{i}")
            if i % 3 == 0:
                prod.produce("actions", encode_action(f"r{i}", T0 + i + 1, "click"), f"r{i}")
        assert prod.flush(30) == 0
        stats = run_joiner(bs, JoinConfig(window_s=5, lateness_s=1))
        rids, sizes = examples_out(bs)
    assert stats["dead_letters"] == 0 and stats["examples_failed"] == 0
    assert sorted(rids) == sorted(f"r{i}" for i in range(n))
    assert stats["positives"] == len(range(0, n, 3))
    assert max(sizes) <= 1_000_000 - K.PROTOCOL_HEADROOM
    assert len(sizes) < n / 10, "still grouped: dozens of examples a message"


def test_the_joiner_command_passes_the_jobs_dense_features(capsys):
    """With --job, a non-finite dense value of a feature that declares a
    fill passes the joiner (the trainer's decoder fills it)."""
    from monolith_jax.stream import joiner

    sparse = {"user": [1], "item": [2], "category": [3], "recent_items": []}
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        prod = producer(bs)
        prod.produce("features", encode_features("a", T0, sparse, {"price": float("nan")}), "a")
        prod.produce("features", encode_features("b", T0 + 1, sparse, {"price": 3.5}), "b")
        assert prod.flush(30) == 0
        code = joiner.main(["--bootstrap", bs, "--job", "tests.jobs.shop:job", "--idle-flush", "2",
                            "--exit-when-idle", "--max-seconds", "120", "--report-every", "0"])
        rids, _ = examples_out(bs)
    assert code == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("joiner done "))
    stats = json.loads(line[len("joiner done "):])
    assert stats["dead_letters"] == 0 and stats["negatives"] == 2
    assert sorted(rids) == ["a", "b"]


class BrokerWithLowerLimit:
    """A producer whose broker refuses values over `limit` on the examples
    topic at delivery (its max.message.bytes below the producer's
    message.max.bytes)."""

    def __init__(self, limit):
        self.limit, self.delivered = limit, []

    def list_topics(self, topic, timeout=None):
        from types import SimpleNamespace

        return SimpleNamespace(topics={topic: SimpleNamespace(partitions={0: None, 1: None})})

    def produce(self, topic, value=None, key=None, partition=None, headers=None, on_delivery=None):
        from confluent_kafka import KafkaError

        ok = topic != "examples" or len(value) <= self.limit
        if ok:
            self.delivered.append((topic, value, dict(headers or ())))
        on_delivery(None if ok else KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)

    def poll(self, timeout=0):
        return 0


def test_a_group_the_broker_refuses_is_sent_in_halves_and_a_lone_example_dead_lettered():
    from monolith_jax.stream.dead_letters import DeadLetters
    from monolith_jax.stream.joiner import ExampleGrouper
    from monolith_jax.stream.messages import encode_example

    prod = BrokerWithLowerLimit(50_000)
    grouper = ExampleGrouper(prod, "examples", group_size=64, dead=DeadLetters(prod, "dead-letters"))
    sent = {}
    for i in range(40):
        size = 60_000 if i == 7 else 4_000  # example 7 is over the broker's limit by itself
        sent[f"r{i}"] = encode_example(encode_features(f"r{i}", i, {"user": [0] * (size // 8)}), 0.0, 1.0, i)
        grouper.add(f"r{i}", sent[f"r{i}"])
    grouper.flush()
    out = [e.features.request_id for t, v, _ in prod.delivered if t == "examples"
           for e in pb.ExampleBatch.FromString(v).examples]
    dead = [(v, h) for t, v, h in prod.delivered if t == "dead-letters"]
    assert sorted(out) == sorted(r for r in sent if r != "r7"), "each example once"
    assert grouper.failed == 1 and grouper.resent > 0 and grouper.limit <= 50_000
    assert len(dead) == 1 and b"not delivered" in dead[0][1]["reason"]
    assert pb.Example.FromString(dead[0][0]).features.request_id == "r7"


@pytest.mark.parametrize("codec", ["native", "python"])
def test_an_upstream_that_has_ended_is_decided_once_read_to_its_end(codec):
    """With `upstream_done` set after the last message is in Kafka, the
    joiner decides every waiting request as soon as it has read every
    partition to its end, not after `idle_flush_s` (here far longer than
    `max_seconds`, so only the end of the upstream can decide them); a
    pause of the upstream before that decides nothing."""
    import threading
    import time

    n = 300
    done = threading.Event()
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        prod = producer(bs)

        def upstream():
            for i in range(n):
                if i == n // 2:
                    prod.flush(30)
                    time.sleep(1.0)  # a pause: requests stay waiting (no idle flush in 1,000 s)
                rid = f"q{i}"
                prod.produce("features", encode_features(rid, T0 + i * 10, {"user": [i % 7], "item": [i]}), rid)
                if i % 4 == 0:
                    prod.produce("actions", encode_action(rid, T0 + i * 10 + 5, "click"), rid)
            assert prod.flush(30) == 0
            done.set()

        feeder = threading.Thread(target=upstream)
        feeder.start()
        joiner = Joiner(bs, JoinConfig(window_s=3600, lateness_s=1), group="ended-joiner", codec=codec)
        try:
            stats = joiner.run(idle_flush_s=1000.0, exit_when_idle=True, max_seconds=60, report_every_s=0,
                               upstream_done=done)
        finally:
            joiner.close()
            feeder.join()
        rids, _ = examples_out(bs)
    assert sorted(rids) == sorted(f"q{i}" for i in range(n))
    assert stats["positives"] == len(range(0, n, 4)) and stats["negatives"] == n - len(range(0, n, 4))
    assert stats["waiting"] == 0 and stats["dead_letters"] == 0


@pytest.mark.parametrize("codec", ["native", "python"])
def test_a_partition_read_to_its_end_holds_the_watermark_again_once_more_of_it_is_fetched(codec):
    """A partition read to its end and silent for `idle_partition_s` stops
    holding the watermark back; but a joiner held up elsewhere (its gate, a
    busy core) sees that silence while the partition's next messages are
    already fetched. Here the actions partition went quiet, then its action
    and a later request of the features partition were fetched together,
    and the features came first: the watermark must wait for the action
    (before the fix, the request was decided a negative and its positive
    action came as an orphan)."""
    import time

    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        every = {(t, p) for t in ("features", "actions") for p in range(K.EMBEDDED_PARTITIONS)}
        prod = producer(bs)
        prod.produce("features", encode_features("early", T0, {"user": [1], "item": [1]}), "early", partition=0)
        assert prod.flush(30) == 0
        joiner = Joiner(bs, JoinConfig(window_s=60, lateness_s=0, idle_partition_s=0.2), group="idle-joiner",
                        codec=codec)
        try:
            joiner.consumer.subscribe(["features", "actions"], on_assign=joiner._on_assign,
                                      on_revoke=joiner._on_revoke)
            for _ in range(500):  # every partition read to its end (all but features/0 empty)
                joiner.process(joiner.consumer.consume(100, 0.02))
                if set(joiner._idle_at) == every:
                    break
            assert set(joiner._idle_at) == every
            time.sleep(0.4)       # longer than idle_partition_s: all are idle
            prod.produce("features", encode_features("later", T0 + 120_000, {"user": [2], "item": [2]}), "later",
                         partition=0)
            prod.produce("actions", encode_action("early", T0 + 10_000, "click"), "early", partition=0)
            assert prod.flush(30) == 0
            got = []
            for _ in range(500):
                got += [m for m in joiner.consumer.consume(100, 0.02) if m.error() is None]
                if len(got) == 2:
                    break
            features = [m for m in got if m.topic() == "features"]
            actions = [m for m in got if m.topic() == "actions"]
            assert len(features) == len(actions) == 1
            joiner.process(features)          # the later request first, as a consume() may hand them over
            joiner._recheck_idle()            # what the run loop does before each advance
            joiner.state.advance()
            assert joiner.state.counts["negatives"] + joiner.state.counts["negatives_sampled_out"] == 0
            joiner.process(actions)
            joiner._recheck_idle()
            joiner.state.advance()
            joiner.state.flush()
            counts = joiner.state.counts
        finally:
            joiner.close()
    assert counts["positives"] == 1 and counts["orphan_actions"] == counts["late_actions"] == 0
    assert counts["negatives"] + counts["negatives_sampled_out"] == 1   # "later", decided at the flush
