"""Exactly once across a rebalance, in this process: a trainer that gives
up partitions commits what it trained from them before they go, whether
or not the asynchronous commits after its batches reached the broker; with
the host-tables step overlapped too (the batch in flight is finished and
committed before the partitions go)."""

import dataclasses
import threading

import numpy as np
import pytest

from monolith_jax.examples.movielens.loop import movielens_trainer
from monolith_jax.examples.movielens.replay import movielens_features
from monolith_jax.online.trainer import OnlineTrainer
from monolith_jax.stream import kafka as K
from monolith_jax.stream.joiner import ExampleGrouper
from monolith_jax.stream.messages import encode_example, encode_features
from tests.stream.kafka_util import producer, read_topic

HALF = 1024


class AsyncCommitsInFlight:
    """A consumer whose asynchronous commits never reach the broker: the
    worst case of 'still in flight when the rebalance began' (or refused
    with REBALANCE_IN_PROGRESS). Everything else is the consumer's."""

    def __init__(self, consumer):
        self._consumer = consumer
        self.dropped = 0

    def commit(self, *args, asynchronous=True, **kwargs):
        if asynchronous:
            self.dropped += 1
            return None
        return self._consumer.commit(*args, asynchronous=False, **kwargs)

    def __getattr__(self, name):
        return getattr(self._consumer, name)


def produce(bootstrap, start, n):
    prod = producer(bootstrap)
    grouper = ExampleGrouper(prod, "examples", group_size=8, linger_s=0.0)
    none = {f.source: [] for f in movielens_features()}  # a record carries every feature the job reads
    for i in range(start, start + n):
        f = encode_features(f"q{i}", i, {**none, "user": [i % 50], "movie": [i % 97]})
        grouper.add(f"q{i}", encode_example(f, float(i % 3 == 0), 1.0, i))
    grouper.flush()
    assert prod.flush(30) == 0


def online(bootstrap, name, step="default"):
    if step == "default":
        trainer = movielens_trainer(dim=4, hidden=(8,), out=lambda *a, **k: None)
    else:  # the same trainer with the host-tables step, overlapped
        from monolith_jax.examples.movielens import job as J

        job = dataclasses.replace(J.job, tables=tuple(J.tables(0, 4)), model=lambda rngs: J.model(rngs, 4, (8,)))
        trainer = job.make_trainer(0, log_every=0, out=None, placement="host", overlap=True)
    o = OnlineTrainer(trainer, bootstrap, group="rebalanced" if step == "default" else f"rebalanced-{step}",
                      batch_size=256, max_wait_s=0.05, out=lambda *a, **k: None)
    assert (o.pipeline is not None) == (step == "host_overlap")
    return o


def wait_until(pred, threads, rounds=6000):
    """Bounded: until pred() or a trainer thread ended (10 ms a round)."""
    event = threading.Event()
    for _ in range(rounds):
        if pred() or not all(t.is_alive() for t in threads):
            return pred()
        event.wait(0.01)
    return pred()


@pytest.mark.parametrize("step", ["default", "host_overlap"])
def test_a_trainer_that_gives_up_partitions_commits_what_it_trained_first(tansu_broker, step):
    bs = tansu_broker
    K.ensure_topics(bs, {"examples": 4, "dead-letters": 1})
    produce(bs, 0, HALF)
    a, b = online(bs, "a", step), online(bs, "b", step)
    a.consumer = AsyncCommitsInFlight(a.consumer)
    stop, results = threading.Event(), {}
    run = lambda t, name: results.__setitem__(name, t.run(max_seconds=240, stop=stop, report_every_s=0))  # noqa: E731
    ta = threading.Thread(target=run, args=(a, "a"))
    tb = threading.Thread(target=run, args=(b, "b"))
    try:
        ta.start()
        assert wait_until(lambda: a.examples == HALF, [ta]), "A trains the first half alone"
        tb.start()
        assert wait_until(lambda: b._assigned and len(a._assigned) < 4, [ta, tb]), "B takes partitions from A"
        produce(bs, HALF, HALF)
        wait_until(lambda: a.examples + b.examples >= 2 * HALF and not (a._carry or b._carry), [ta, tb])
    finally:
        stop.set()
        ta.join(120)
        tb.join(120)
    assert a.consumer.dropped > 0, "A's asynchronous commits were lost"
    assert results["a"]["examples"] + results["b"]["examples"] == 2 * HALF, (results["a"]["examples"],
                                                                             results["b"]["examples"])
    assert results["b"]["examples"] > 0
    trained = np.concatenate([a.log.arrays()[2], b.log.arrays()[2]])
    np.testing.assert_array_equal(np.sort(trained), np.arange(2 * HALF), "each example once")
    # A restart on the group finds nothing left: each partition's commit is its end
    # (read to the end: this broker's watermark query lags behind).
    from confluent_kafka import Consumer, TopicPartition

    ends = {}
    for m in read_topic(bs, "examples"):
        ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
    c = Consumer(K.consumer_config(bs, a.group))
    committed = {tp.partition: tp.offset for tp in c.committed([TopicPartition("examples", p) for p in ends],
                                                              timeout=10)}
    c.close()
    assert committed == ends
