"""Commits that wait for nothing (`stream.delivery`): DeliveryMarks against a
reference of holds, a group's sends (its halves, retries and dead letters)
holding its token until the last report, and a joiner killed mid-stream
whose successor in the group loses no request."""

import os
import random
import signal
import subprocess
import sys
import time

from monolith_jax.stream import kafka as K
from monolith_jax.stream.dead_letters import DeadLetters
from monolith_jax.stream.delivery import DeliveryMarks
from monolith_jax.stream.join_state import JoinConfig
from monolith_jax.stream.joiner import ExampleGrouper, Joiner
from monolith_jax.stream.messages import encode_action, encode_example, encode_features
from tests.stream.kafka_util import producer
from tests.stream.test_joiner import T0, examples_out


def test_a_mark_is_settled_exactly_when_no_token_below_it_is_held():
    rng = random.Random(0)
    marks, holds, taken = DeliveryMarks(), {}, []
    for _ in range(5000):
        r = rng.random()
        if r < 0.3 or not holds:
            holds[marks.open()] = 1
        elif r < 0.45:
            t = rng.choice(list(holds))
            marks.hold(t)
            holds[t] += 1
        else:
            t = rng.choice(list(holds))
            marks.settle(t)
            holds[t] -= 1
            if not holds[t]:
                del holds[t]
        if rng.random() < 0.1:
            taken.append(marks.mark())
        for m in taken[-8:]:
            assert marks.settled(m) == all(t >= m for t in holds), (m, sorted(holds)[:5])
    assert marks.in_flight == len(holds)


class Deferred:
    """A producer whose delivery reports wait for `deliver`, and whose broker
    refuses values over `limit` on the examples topic."""

    def __init__(self, limit):
        self.limit, self.reports, self.delivered = limit, [], []

    def list_topics(self, topic, timeout=None):
        from types import SimpleNamespace

        return SimpleNamespace(topics={topic: SimpleNamespace(partitions={0: None, 1: None})})

    def produce(self, topic, value=None, key=None, partition=None, headers=None, on_delivery=None):
        self.reports.append((topic, value, on_delivery))

    def poll(self, timeout=0):
        return 0

    def deliver(self, keep=lambda value: False) -> int:
        """Reports what was produced so far, but for values `keep` holds back
        (what the reports' callbacks produce waits for the next call)."""
        now = [r for r in self.reports if not keep(r[1])]
        self.reports = [r for r in self.reports if keep(r[1])]
        from confluent_kafka import KafkaError

        for topic, value, report in now:
            ok = topic != "examples" or len(value) <= self.limit
            if ok:
                self.delivered.append(topic)
            report(None if ok else KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
        return len(now)


def test_a_group_settles_after_its_halves_and_its_dead_letter_are_reported():
    prod = Deferred(50_000)
    dead = DeadLetters(prod, "dead-letters")
    grouper = ExampleGrouper(prod, "examples", group_size=64, dead=dead)
    grouper.marks = dead.marks = marks = DeliveryMarks()
    for i in range(40):
        size = 60_000 if i == 7 else 4_000  # example 7 is over the broker's limit by itself
        grouper.add(f"r{i}", encode_example(encode_features(f"r{i}", i, {"user": [0] * (size // 8)}), 0.0, 1.0, i))
    grouper.flush()
    point = marks.mark()
    grouper.add("late", encode_example(encode_features("late", 99, {"user": [1]}), 0.0, 1.0, 99))
    grouper.flush()  # a group sent after the point: never waited for by it
    later = marks.mark()
    rounds = 0
    while not marks.settled(point):
        assert prod.deliver(keep=lambda v: b"late" in v) > 0, "a token is held with nothing in flight"
        rounds += 1
    assert rounds >= 3, "the halves, then the lone example, then its dead letter"
    assert "dead-letters" in prod.delivered and grouper.failed == 1
    assert [r for r in prod.reports if b"late" not in r[1]] == [], "settled only once nothing before it is in flight"
    assert not marks.settled(later)
    prod.deliver()
    assert marks.settled(later) and marks.in_flight == 0


def committed(bootstrap, group, topics) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(K.client_config(bootstrap, **{"group.id": group, "enable.auto.commit": False}))
    try:
        parts = [TopicPartition(t, p) for t in topics for p in range(K.EMBEDDED_PARTITIONS)]
        return sum(max(tp.offset, 0) for tp in c.committed(parts, timeout=10))
    finally:
        c.close()


def test_a_joiner_killed_mid_stream_loses_no_request_to_its_successor(tansu_broker, tmp_path):
    bs, n, group = tansu_broker, 6000, "killed-joiner"
    K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
    prod = producer(bs)
    for i in range(n):  # every request clicked: each must leave as an example, at least once
        rid, t = f"k{i}", T0 + i * 10
        prod.produce("features", encode_features(rid, t, {"user": [i % 97], "item": [i % 31]}), rid)
        prod.produce("actions", encode_action(rid, t + 5, "click"), rid)
    assert prod.flush(30) == 0
    cmd = [sys.executable, "-m", "monolith_jax.cli", "join", "--bootstrap", bs, "--group", group, "--window", "1",
           "--lateness", "0", "--negative-rate", "1", "--idle-flush", "60", "--report-every", "0",
           "--emit-positives", "at_window_end"]  # the last second's requests wait: the stream's end is not committed
    conf = tmp_path / "kafka.properties"  # the dead member leaves the group sooner
    conf.write_text("session.timeout.ms=4000\nheartbeat.interval.ms=500\n")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, K.CONFIG_ENV: str(conf)})
    try:
        deadline = time.monotonic() + 90
        while committed(bs, group, ["features", "actions"]) == 0:  # some offsets committed, not all
            assert time.monotonic() < deadline and first.poll() is None, "the first joiner committed nothing"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert committed(bs, group, ["features", "actions"]) < 2 * n, "killed before the end of the stream"
    joiner = Joiner(bs, JoinConfig(window_s=1, lateness_s=0, negative_rate=1.0, emit_positives="at_window_end"),
                    group=group,
                    consumer_extra={"session.timeout.ms": 6000})
    try:
        stats = joiner.run(idle_flush_s=2.0, exit_when_idle=True, max_seconds=120, report_every_s=0)
    finally:
        joiner.close()
    rids, _ = examples_out(bs)
    assert set(rids) == {f"k{i}" for i in range(n)}, "every request's example, from one joiner or the other"
    assert stats["features"] > 0 and committed(bs, group, ["features", "actions"]) == 2 * n
