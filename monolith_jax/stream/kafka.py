"""Kafka plumbing: the embedded cluster, client settings, topics, backpressure.

With no `bootstrap.servers`, `EmbeddedKafka()` starts librdkafka's built-in
cluster inside this process (through confluent-kafka; it speaks the real
Kafka protocol on a 127.0.0.1 port), so clients in other processes reach it
by its `bootstrap` address. It lives as long as the object. With
`bootstrap.servers` set, the same code talks to that cluster instead.

Topic names have defaults (`TOPICS`); every component takes them as
arguments. On the embedded cluster a topic is created by asking for it and
has 4 partitions; on a real cluster `ensure_topics` creates the missing ones
with the partition count asked for.

The embedded cluster is for one consumer per group: its group coordinator
refuses offset commits during a rebalance (REBALANCE_IN_PROGRESS) and did
not always hand a revoked member's partitions back, so several trainers
sharing a group there trained examples twice. `is_embedded` recognises it
(by the cluster id in its metadata), and the launcher refuses several
trainers on it; use a Kafka broker (`monolith_jax.stream.broker`, or a real
cluster) for that. Dead letters: `monolith_jax.stream.dead_letters`.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

log = logging.getLogger("monolith_jax.stream")

TOPICS = {"features": "features", "actions": "actions", "examples": "examples", "dead_letters": "dead-letters"}
EMBEDDED_PARTITIONS = 4
# What librdkafka's built-in cluster keeps of a partition: its newest ~5 MB
# (measured: 90,000 values of 50 bytes, 23,824 of 200, 5,150 of 1,000); older
# messages are deleted as new ones arrive.
EMBEDDED_PARTITION_BYTES = 5_000_000
# librdkafka's default `message.max.bytes`: the most a producer sends in one message.
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
# What a producer adds around a value (record and batch framing, headers'
# lengths): values are kept this far under `message.max.bytes`.
PROTOCOL_HEADROOM = 4096
# The id librdkafka's built-in cluster gives itself in its metadata.
EMBEDDED_CLUSTER_ID_PREFIX = "mockCluster"


def max_message_bytes(conf: Mapping | None) -> int:
    """`message.max.bytes` of a client's settings (librdkafka's default if unset)."""
    value = (conf or {}).get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)
    return int(value)


def __getattr__(name):  # DeadLetters lives in its own module; `K.DeadLetters` still works
    if name == "DeadLetters":
        from monolith_jax.stream.dead_letters import DeadLetters

        return DeadLetters
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EmbeddedKafka:
    """librdkafka's built-in cluster, alive until `close()` (or exit)."""

    def __init__(self, brokers: int = 1):
        from confluent_kafka import Producer

        self._owner = Producer({"test.mock.num.brokers": brokers, "log_level": 3})
        md = self._owner.list_topics(timeout=10)
        self.bootstrap = ",".join(f"{b.host}:{b.port}" for b in sorted(md.brokers.values(), key=lambda b: b.id))

    def close(self) -> None:
        self._owner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# A librdkafka properties file (`key=value` lines, `#` comments) whose
# settings every client of every process takes: security (SASL, TLS),
# client ids, `debug=cgrp` for a stuck group. Named by this environment
# variable so that the processes a launcher starts inherit it.
CONFIG_ENV = "MONOLITH_KAFKA_CONFIG"


def user_config(path: str | None = None) -> dict:
    """The properties of the file named by `MONOLITH_KAFKA_CONFIG` ({} when
    unset). A line that is not `key=value` raises ValueError naming it."""
    import os

    path = path if path is not None else os.environ.get(CONFIG_ENV)
    if not path:
        return {}
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as err:
        raise ValueError(f"{CONFIG_ENV}={path}: {err.strerror}") from None
    conf = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{n}: expected key=value, got {line[:80]!r}")
        conf[key.strip()] = value.strip()
    return conf


def client_config(bootstrap: str, tunables: Mapping | None = None, **extra) -> dict:
    """Settings of a client, in order of precedence: `tunables` (our
    defaults), then the user's file (`MONOLITH_KAFKA_CONFIG`), then
    `bootstrap` and `extra` (Kafka property names with dots: what the calling
    component needs to be correct, such as its group and offset handling)."""
    conf = {"log_level": 3, **(tunables or {})}
    conf.update(user_config())
    conf.update({"bootstrap.servers": bootstrap, **extra})
    return conf


def producer_config(bootstrap: str, **extra) -> dict:
    # Batches of up to 10 ms: throughput without holding messages long.
    return client_config(bootstrap, {"linger.ms": 10, "batch.num.messages": 10000,
                                     "queue.buffering.max.messages": 1_000_000}, **extra)


def consumer_config(bootstrap: str, group: str, **extra) -> dict:
    tunables = {
        "auto.commit.interval.ms": 1000,
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 300000,
        "fetch.wait.max.ms": 10,
        "max.partition.fetch.bytes": 4 << 20,   # fewer, larger fetches: less broker and client CPU per message
    }
    return client_config(bootstrap, tunables, **{
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,   # offsets are stored once their messages are used
        # Measured: with partition EOF events on, consume() hands over queued
        # messages ~40x faster (75 k/s -> 3 M/s on the embedded cluster).
        "enable.partition.eof": True,
        "partition.assignment.strategy": "range",  # co-partitioned topics go to one member
        **extra})


def is_embedded(bootstrap: str, timeout_s: float = 10.0) -> bool:
    """Whether `bootstrap` is librdkafka's built-in cluster (`EmbeddedKafka`):
    its metadata names it (cluster id `mockCluster...`). False when no
    broker answers there."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        md = AdminClient(client_config(bootstrap, log_level=0)).list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    return str(md.cluster_id or "").startswith(EMBEDDED_CLUSTER_ID_PREFIX)


class BrokerUnreachable(ConnectionError):
    """No Kafka broker answered at the bootstrap address in time."""


def check_reachable(bootstrap: str, timeout_s: float = 15.0) -> None:
    """Raises BrokerUnreachable, naming the address, unless a broker at
    `bootstrap` answers a metadata request within `timeout_s`. Its probe
    logs nothing (librdkafka would print a line per failed connect)."""
    from confluent_kafka import KafkaException, Producer

    errors: list = []
    probe = Producer(client_config(bootstrap, log_level=0, error_cb=errors.append,
                                   **{"socket.connection.setup.timeout.ms": max(int(timeout_s * 1000), 1000)}))
    try:
        probe.list_topics(timeout=timeout_s)
    except KafkaException as err:
        why = errors[-1].str() if errors else str(err)
        raise BrokerUnreachable(f"no Kafka broker answers at {bootstrap!r} within {timeout_s:g} s ({why}); "
                                "start one, or point bootstrap.servers at a running cluster") from None
    finally:
        probe.flush(0)


def ensure_topics(bootstrap: str, topics: Mapping[str, int], timeout_s: float = 15.0) -> dict:
    """Create missing topics ({name: partitions}); returns {name: partitions}
    as the cluster has them."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(client_config(bootstrap))
    have = admin.list_topics(timeout=timeout_s).topics
    missing = [NewTopic(t, n, 1) for t, n in topics.items() if t not in have]
    if missing:
        futures = admin.create_topics(missing, operation_timeout=5, request_timeout=5)
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout_s)
            except KafkaException as err:
                code = err.args[0].code() if err.args else None
                from confluent_kafka import KafkaError

                if code == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                # The embedded cluster has no controller: a metadata request
                # for the topic creates it there instead.
                log.debug("create_topics(%s) failed (%s); creating it by metadata request", name, err)
    deadline = time.monotonic() + timeout_s
    out = {}
    for name in topics:
        while True:
            md = admin.list_topics(topic=name, timeout=timeout_s).topics.get(name)
            if md is not None and md.error is None and md.partitions:
                out[name] = len(md.partitions)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name!r} did not appear on {bootstrap} within {timeout_s} s")
            time.sleep(0.1)
    return out


def produce(producer, topic: str, value: bytes, key: bytes | str | None = None, **kwargs) -> None:
    """produce() (kwargs: partition, headers), waiting for room when the
    local queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)


class LagGate:
    """Backpressure for a producer that can outrun its consumers: `wait()`
    blocks while consumer group `group` is more than `max_lag` messages
    behind on `topics` (high watermark minus committed offset, summed over
    partitions). The embedded cluster keeps only the newest ~5 MB of each
    partition (EMBEDDED_PARTITION_BYTES), so an unpaced replay must not run
    further ahead than that; a real cluster's retention is the same limit,
    longer. With `max_bytes`, the limit is also that many bytes: max_bytes
    over the mean size of the messages counted so far (`step`'s nbytes),
    so large messages get fewer in flight than small ones."""

    def __init__(self, bootstrap: str, group: str, topics, max_lag: int, check_every: int = 5000,
                 max_bytes: int | None = None):
        from confluent_kafka import Consumer

        self.topics = list(topics)
        self.max_lag = max_lag
        self.max_bytes = max_bytes
        self._counted = self._bytes = 0
        self.check_every = check_every
        self.waited_s = 0.0
        self._since = 0
        self._consumer = Consumer(client_config(bootstrap, **{"group.id": group, "enable.auto.commit": False}))
        self._parts = None

    def lag(self) -> int:
        from confluent_kafka import TopicPartition

        if self._parts is None:
            md = self._consumer.list_topics(timeout=10).topics
            self._parts = [TopicPartition(t, p) for t in self.topics for p in md[t].partitions]
        committed = self._consumer.committed(self._parts, timeout=10)
        total = 0
        for tp in committed:
            low, high = self._consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            done = tp.offset if tp.offset >= 0 else low
            total += max(high - max(done, low), 0)
        return total

    def limit(self) -> int:
        """Messages the group may fall behind: max_lag, or fewer where
        max_bytes says so at the mean message size so far."""
        if self.max_bytes is None or self._bytes <= 0:
            return self.max_lag
        return max(1, min(self.max_lag, int(self.max_bytes * self._counted / self._bytes)))

    def step(self, n: int = 1, producer=None, stop=None, nbytes: int = 0) -> None:
        """Count `n` messages produced (of `nbytes` in all: keys and values);
        every `check_every`, wait for room."""
        self._since += n
        self._counted += n
        self._bytes += nbytes
        if self._since < self.check_every:
            return
        self._since = 0
        t0 = time.monotonic()
        while not (stop is not None and stop.is_set()):
            # What the producer still holds (queued, in flight) counts as
            # lag: it will be in the topic before the consumers read it.
            held = 0
            if producer is not None:
                producer.poll(0)
                held = len(producer)
            if self.lag() + held <= self.limit():
                break
            time.sleep(0.01)
        self.waited_s += time.monotonic() - t0

    def close(self) -> None:
        self._consumer.close()
