"""Offsets a consumer passed over, on the embedded cluster: messages the
cluster's retention deleted before a group read them are counted as lost
(the consumer itself resets to the earliest offset without a word), other
offsets passed over as skipped, and a normal read reports neither. The
joiner reports them with both codecs."""

import pytest

from monolith_jax.stream import kafka as K
from monolith_jax.stream.join_state import JoinConfig
from monolith_jax.stream.joiner import Joiner
from monolith_jax.stream.messages import encode_features
from monolith_jax.stream.offset_gaps import OffsetGaps
from tests.stream.kafka_util import commit_offsets, low_watermark, producer

T0 = 1_700_000_000_000
# More than the embedded cluster keeps of a partition (~5 MB): its oldest
# messages are deleted while the rest are produced.
OVER_RETENTION = 12_000
SIZE = 1000


def read_with(gaps: OffsetGaps, bootstrap: str, group: str, topic: str, until: int, start=None, known=None) -> int:
    """Reads `topic` as `group` (subscribed, or assigned at `start` offsets),
    checking each batch; returns how many messages were read once `until`
    (an offset of partition 0) is reached. Bounded."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(K.consumer_config(bootstrap, group, **{"enable.auto.commit": False}))
    if start is None:
        c.subscribe([topic], on_assign=lambda consumer, parts: gaps.assigned(consumer, parts))
    else:
        parts = [TopicPartition(topic, p, o) for p, o in start.items()]
        gaps.assigned(c, parts, known=known)
        c.assign(parts)
    read, last = 0, -1
    for _ in range(500):
        msgs = [m for m in c.consume(1000, 0.05) if m.error() is None]
        if msgs:
            gaps.batch(c, topic, [m.partition() for m in msgs], [m.offset() for m in msgs])
            read += len(msgs)
            last = max(last, max(m.offset() for m in msgs if m.partition() == 0))
        if last >= until:
            break
    c.close()
    return read


def fill(bootstrap: str, topic: str, n: int, size: int = SIZE) -> None:
    prod = producer(bootstrap)
    for i in range(n):
        prod.produce(topic, b"x" * size, partition=0)
        if i % 1000 == 0:
            prod.poll(0)
    assert prod.flush(30) == 0


def test_messages_deleted_by_retention_before_a_group_read_them_are_counted_lost():
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {"t": 1})
        commit_offsets(bs, "behind", "t", {0: 0})  # the group stopped at 0 ...
        fill(bs, "t", OVER_RETENTION)              # ... and the topic ran on past what it keeps
        low = low_watermark(bs, "t", 0)
        gaps = OffsetGaps("test")
        read = read_with(gaps, bs, "behind", "t", until=OVER_RETENTION - 1)
        fresh = OffsetGaps("test")  # a new group (no committed offset) reads what is kept: nothing lost to it
        fresh_read = read_with(fresh, bs, "new", "t", until=OVER_RETENTION - 1)
    assert 0 < low < OVER_RETENTION
    assert read == OVER_RETENTION - low == fresh_read
    assert gaps.counts() == {"offsets_lost": low, "offsets_skipped": 0} and gaps.gaps == 1
    assert fresh.counts() == {"offsets_lost": 0, "offsets_skipped": 0}


def test_offsets_passed_over_within_retention_are_skipped_and_rereads_are_not_gaps():
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {"t": 1})
        fill(bs, "t", 30, size=10)
        gaps = OffsetGaps("test")
        # A snapshot said reading goes on at 5; the consumer starts at 10.
        read = read_with(gaps, bs, "g", "t", until=29, start={0: 10}, known={("t", 0): 5})
        assert read == 20 and gaps.counts() == {"offsets_lost": 0, "offsets_skipped": 5} and gaps.gaps == 1
        # Read again from 3 (a rebalance's re-read): offsets going back are no gap.
        gaps.revoked([("t", 0)])
        gaps.expect[("t", 0)] = 30
        read_with(gaps, bs, "g", "t", until=29, start={0: 3}, known={("t", 0): 3})
        assert gaps.counts() == {"offsets_lost": 0, "offsets_skipped": 5} and gaps.gaps == 1
        restored = OffsetGaps("test")
        restored.restore(gaps.counts())
        assert restored.counts() == gaps.counts() and OffsetGaps("t").counts()["offsets_lost"] == 0


@pytest.mark.parametrize("codec", ["native", "python"])
def test_the_joiner_counts_the_features_it_lost_to_retention(codec):
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        for topic in ("features", "actions"):
            commit_offsets(bs, "late-joiner", topic, {p: 0 for p in range(K.EMBEDDED_PARTITIONS)})
        prod = producer(bs)
        for i in range(OVER_RETENTION):
            rid = f"q{i}"
            prod.produce("features", encode_features(rid, T0 + i * 10, {"user": [i % 97], "item": list(range(120))},
                                                     {"price": 1.0}), rid, partition=0)
            if i % 1000 == 0:
                prod.poll(0)
        assert prod.flush(30) == 0
        low = low_watermark(bs, "features", 0)
        joiner = Joiner(bs, JoinConfig(window_s=5, lateness_s=1), group="late-joiner", codec=codec)
        try:
            stats = joiner.run(idle_flush_s=2.0, exit_when_idle=True, max_seconds=120, report_every_s=0)
        finally:
            joiner.close()
    assert 0 < low < OVER_RETENTION
    assert stats["offsets_lost"] == low and stats["offsets_skipped"] == 0
    assert stats["positives"] + stats["negatives"] == OVER_RETENTION - low
