"""The replayer's backpressure (LagGate) on the embedded cluster: it waits
while the gated group is further behind than its limit, in messages or, with
max_bytes, in bytes at the mean message size, and goes on once the group
has caught up."""

import threading

from monolith_jax.stream import kafka as K
from tests.stream.kafka_util import commit_offsets, producer


def test_the_gate_waits_while_the_group_is_behind_its_limit_and_goes_on_once_it_caught_up():
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {"t": 2})
        prod = producer(bs)
        for i in range(1000):
            prod.produce("t", b"v" * 99, b"k", partition=i % 2)
        assert prod.flush(30) == 0
        # Every second message counted, the gate checks the group's lag.
        gate = K.LagGate(bs, "readers", ["t"], max_lag=5000, check_every=2, max_bytes=50_000)
        try:
            assert gate.limit() == 5000                  # no message counted yet: max_lag alone
            gate.step(1, nbytes=100)                     # 100 bytes a message: 500 fit in 50,000
            assert gate.limit() == 500 and gate.lag() == 1000 and gate.waited_s == 0
            stop = threading.Event()
            threading.Timer(0.3, stop.set).start()
            gate.step(1, stop=stop, nbytes=100)          # checks: 1000 behind > 500, waits until stopped
            assert gate.waited_s >= 0.25
            commit_offsets(bs, "readers", "t", {0: 300, 1: 300})  # the group read 600 of the 1000
            assert gate.lag() == 400
            waited = gate.waited_s
            gate.step(1, nbytes=100)
            gate.step(1, nbytes=100)                     # checks: 400 <= 500, goes on at once
            assert gate.waited_s - waited < 0.2
            gate.step(1, nbytes=2100)                    # larger messages: fewer fit (5 of 500 bytes on average)
            assert gate.limit() == 100
            plain = K.LagGate(bs, "readers", ["t"], max_lag=450, check_every=2)
            plain.step(1, nbytes=10**6)                  # without max_bytes, sizes do not matter
            assert plain.limit() == 450
            plain.close()
        finally:
            gate.close()


def test_a_producer_through_the_gate_never_gets_further_ahead_than_its_limit_and_one_check():
    """The lag is measured on the gate's thread and a check trusts the newest
    measurement plus what was counted since; a group that reads nothing
    still holds the producer to limit + check_every."""
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {"t": 2})
        prod = producer(bs)
        gate = K.LagGate(bs, "idle-readers", ["t"], max_lag=700, check_every=25)
        stop = threading.Event()
        timer = threading.Timer(1.5, stop.set)
        timer.start()
        sent = 0
        try:
            while not stop.is_set() and sent < 5000:
                prod.produce("t", b"v" * 20, b"k", partition=sent % 2)
                sent += 1
                gate.step(1, prod, stop, 21)
            assert prod.flush(30) == 0
            assert 700 <= sent <= 700 + 25       # it stopped at the limit, not before it
            assert gate.lag() == sent and gate.waited_s >= 1.0
        finally:
            timer.cancel()
            gate.close()
