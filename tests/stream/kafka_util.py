"""Helpers for the stream tests: read a whole topic, produce with keys."""

from monolith_jax.stream import kafka as K


def read_topic(bootstrap: str, topic: str, max_polls: int = 2000) -> list:
    """Every message of `topic` (each partition read to its end), in
    partition order. Bounded: at most `max_polls` polls of 10 ms."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    c = Consumer(K.consumer_config(bootstrap, "reader", **{"enable.auto.commit": False,
                                                            "enable.partition.eof": True}))
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, 0) for p in parts])  # offset 0: from the start
    ends, got = set(), []
    for _ in range(max_polls):
        for m in c.consume(500, 0.01):
            if m.error() is None:
                got.append(m)
            elif m.error().code() == KafkaError._PARTITION_EOF:
                ends.add(m.partition())
        if len(ends) == len(parts):
            break
    c.close()
    return sorted(got, key=lambda m: (m.partition(), m.offset()))


def producer(bootstrap: str, **extra):
    from confluent_kafka import Producer

    return Producer(K.producer_config(bootstrap, **extra))


def commit_offsets(bootstrap: str, group: str, topic: str, offsets: dict) -> None:
    """Commits {partition: offset} of `topic` for `group`, as a consumer of
    that group that stopped there would have."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(K.consumer_config(bootstrap, group, **{"enable.auto.commit": False}))
    c.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    c.close()


def low_watermark(bootstrap: str, topic: str, partition: int) -> int:
    """The oldest offset the cluster still holds in a partition."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(K.consumer_config(bootstrap, "watermarks"))
    low = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[0]
    c.close()
    return low
