"""Dead letters: too large ones are truncated with their size, and one that
cannot be written is counted, never raised."""

from confluent_kafka import KafkaError, KafkaException

from monolith_jax.stream import kafka as K
from monolith_jax.stream.dead_letters import DeadLetters


class FakeProducer:
    """Records produce() calls; `refuse` raises as librdkafka does, `fail`
    reports a failed delivery."""

    def __init__(self, refuse=None, fail=None):
        self.sent, self.refuse, self.fail = [], refuse, fail

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        if self.refuse is not None:
            raise KafkaException(KafkaError(self.refuse))
        self.sent.append((topic, value, key, dict(headers)))
        if on_delivery is not None:
            on_delivery(KafkaError(self.fail) if self.fail is not None else None, None)

    def poll(self, timeout):
        return 0


def test_a_dead_letter_too_large_carries_a_truncated_value_its_size_and_reason():
    prod = FakeProducer()
    dead = DeadLetters(prod, "dead", max_bytes=1_000_000)
    value = b"v" * 3_000_000
    assert dead.send_value(value, b"k", "unreadable: " + "x" * 5000, ("examples", 2, 41))
    topic, sent, key, headers = prod.sent[0]
    assert topic == "dead" and key == b"k" and value.startswith(sent)
    assert len(sent) + len(key) + sum(len(a) + len(b) for a, b in headers.items()) <= 1_000_000 - K.PROTOCOL_HEADROOM
    assert len(sent) > 900_000, "as much of the value as fits"
    assert headers["truncated"] == b"1" and headers["original.size"] == b"3000000"
    assert headers["reason"].startswith(b"unreadable: ") and len(headers["reason"]) <= 1000
    assert (headers["source.topic"], headers["source.partition"], headers["source.offset"]) == (b"examples", b"2", b"41")
    assert dead.count == dead.truncated == 1 and dead.by_reason == {"unreadable": 1}
    # A small one is kept whole, without those headers.
    dead.send_value(b"small", None, "bad")
    assert prod.sent[1][1] == b"small" and "truncated" not in prod.sent[1][3]


def test_a_dead_letter_that_cannot_be_produced_or_delivered_is_counted_not_raised():
    refused = DeadLetters(FakeProducer(refuse=KafkaError.MSG_SIZE_TOO_LARGE), "dead")
    assert refused.send_value(b"x", None, "bad") is False
    assert refused.count == 1 and refused.failed == 1
    undelivered = DeadLetters(FakeProducer(fail=KafkaError.TOPIC_AUTHORIZATION_FAILED), "dead")
    assert undelivered.send_value(b"x", None, "bad") is True
    assert undelivered.count == 1 and undelivered.failed == 1


def test_a_full_queue_is_waited_for_a_while_then_counted():
    class Full(FakeProducer):
        def produce(self, *a, **k):
            raise BufferError("queue full")

    dead = DeadLetters(Full(), "dead", queue_wait_s=0.0)
    assert dead.send_value(b"x", None, "bad") is False and dead.failed == 1
