"""The dead-letter topic: where unusable messages go, with why.

A dead letter keeps the original key and value; its headers say the
reason and where the message came from (`source.topic`,
`source.partition`, `source.offset`). Sending one never stops the caller:

- a dead letter that would not fit in one Kafka message (the producer's
  `message.max.bytes`, less `kafka.PROTOCOL_HEADROOM`) carries the first
  bytes of the value that fit, and the headers `truncated: 1` and
  `original.size` (the value's size in bytes; `original.key.size` too
  when the key had to be cut);
- a dead letter that cannot be produced (refused by the client) or
  delivered (refused by the broker) is counted in `failed` and logged,
  never raised.

`count` and `by_reason` count the messages sent here (whether or not their
dead letter was delivered): the caller's accounting is
messages in = messages used + `count`.
"""

from __future__ import annotations

import logging
import time

from monolith_jax.stream.kafka import DEFAULT_MESSAGE_MAX_BYTES, PROTOCOL_HEADROOM

log = logging.getLogger("monolith_jax.stream")

MAX_REASON_BYTES = 1000
MAX_KEY_BYTES = 1024
# Per header: a varint length for the name and for the value (Kafka's record format).
_HEADER_OVERHEAD = 10


def _bytes(x) -> bytes:
    if x is None:
        return b""
    return x if isinstance(x, bytes) else str(x).encode()


def _headers_size(headers) -> int:
    return sum(len(k) + len(v) + _HEADER_OVERHEAD for k, v in headers)


class DeadLetters:
    """Sends unusable messages to `topic` through `producer` and counts
    them by reason. `max_bytes`: the producer's `message.max.bytes`."""

    def __init__(self, producer, topic: str, max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES,
                 queue_wait_s: float = 30.0):
        self.producer = producer
        self.topic = topic
        self.limit = max(int(max_bytes) - PROTOCOL_HEADROOM, 1024)
        self.queue_wait_s = queue_wait_s
        self.count = 0          # messages dead-lettered
        self.by_reason: dict[str, int] = {}
        self.truncated = 0      # of those, sent with a truncated value
        self.failed = 0         # dead letters that could not be produced or delivered
        self.marks = None       # a DeliveryMarks (delivery.py): each dead letter holds a token until reported

    def send(self, msg, reason: str) -> bool:
        """Dead-letters a consumed message; True if its dead letter was
        handed to the producer (delivery is reported later)."""
        return self.send_value(msg.value(), msg.key(), reason,
                               (msg.topic() or "", msg.partition(), msg.offset()))

    def send_value(self, value, key, reason: str, source=("", -1, -1), token: int | None = None) -> bool:
        """Dead-letters `value` (bytes or None) with `key`; `source` is
        (topic, partition, offset) of where it came from. `token`: one of
        `marks`' to hold until it is reported (None: a new one)."""
        self.count += 1
        short = reason.split(":")[0]
        self.by_reason[short] = self.by_reason.get(short, 0) + 1
        topic, partition, offset = source
        if self.count <= 10 or self.count % 1000 == 0:  # the count says the rest
            log.warning("dead letter %d from %s[%s]@%s: %s", self.count, topic, partition, offset,
                        reason[:MAX_REASON_BYTES])
        value, key = _bytes(value), (None if key is None else _bytes(key))
        headers = [("reason", reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]),
                   ("source.topic", _bytes(topic)), ("source.partition", str(partition).encode()),
                   ("source.offset", str(offset).encode())]
        size = len(value) + len(key or b"") + _headers_size(headers)
        if size > self.limit:
            extra = [("truncated", b"1"), ("original.size", str(len(value)).encode())]
            if key is not None and len(key) > MAX_KEY_BYTES:
                extra.append(("original.key.size", str(len(key)).encode()))
                key = key[:MAX_KEY_BYTES]
            headers += extra
            room = self.limit - len(key or b"") - _headers_size(headers)
            value = value[:max(room, 0)]
            self.truncated += 1
        token = self.marks.take(token) if self.marks is not None else None
        try:
            sent = self._produce(value, key, headers, token)
        except BaseException:
            self._settle(token)
            raise
        if not sent:
            self._settle(token)
        return sent

    def _produce(self, value: bytes, key, headers, token: int | None = None) -> bool:
        from confluent_kafka import KafkaException

        deadline = time.monotonic() + self.queue_wait_s
        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, headers=headers,
                                      on_delivery=lambda err, msg: self._delivered(err, msg, token))
                return True
            except BufferError:  # the local queue is full: wait for room, a while
                if time.monotonic() > deadline:
                    self._failed("the producer's queue stayed full")
                    return False
                self.producer.poll(0.05)
            except (KafkaException, ValueError, TypeError) as err:
                self._failed(str(err))
                return False

    def _settle(self, token: int | None) -> None:
        if self.marks is not None and token is not None:
            self.marks.settle(token)

    def _delivered(self, err, msg, token: int | None = None) -> None:
        try:
            if err is not None:
                self._failed(err.str() if hasattr(err, "str") else str(err))
        finally:
            self._settle(token)

    def _failed(self, why: str) -> None:
        self.failed += 1
        if self.failed <= 10 or self.failed % 1000 == 0:
            log.error("dead letter not written to %s (%d so far): %s", self.topic, self.failed, why)
