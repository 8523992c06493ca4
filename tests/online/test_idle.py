"""The idle clock counts from the first message, not from the end-of-
partition events a subscription delivers first: a trainer started before
its stream waits for it, and stops once the stream has gone quiet."""

import time

from monolith_jax.online.trainer import OnlineTrainer
from monolith_jax.stream import kafka as K
from tests.online.test_dedup import QUIET, example


def trainer(bootstrap):
    from monolith_jax.examples.movielens.loop import movielens_trainer as make

    return OnlineTrainer(make(dim=4, hidden=(8,), **QUIET), bootstrap, group="idle", batch_size=64,
                         max_wait_s=0.05, prequential=False, **QUIET)


def test_end_of_partition_events_do_not_start_the_idle_clock():
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {"examples": 2, "dead-letters": 1})
        online = trainer(bs)
        t0 = time.monotonic()
        empty = online.run(idle_timeout_s=1.0, max_seconds=6.0, report_every_s=0)
        assert empty["examples"] == 0 and time.monotonic() - t0 >= 5.5   # waited for data: max_seconds ended it
        from tests.stream.kafka_util import producer

        prod = producer(bs)
        for i in range(40):
            prod.produce("examples", example(f"q{i}", i), f"q{i}")
        assert prod.flush(30) == 0
        t0 = time.monotonic()
        got = trainer(bs).run(idle_timeout_s=1.0, max_seconds=60.0, report_every_s=0)
        assert got["examples"] == 40 and time.monotonic() - t0 < 30    # the idle clock ended it


def test_a_trainer_that_never_gets_an_example_stops_after_the_first_example_wait(monkeypatch):
    from monolith_jax.online import trainer as T

    monkeypatch.setattr(T, "FIRST_EXAMPLE_WAIT_S", 3.0)
    with K.EmbeddedKafka() as kafka:
        K.ensure_topics(kafka.bootstrap, {"examples": 2, "dead-letters": 1})
        t0 = time.monotonic()
        got = trainer(kafka.bootstrap).run(idle_timeout_s=1.0, max_seconds=60.0, report_every_s=0)
        took = time.monotonic() - t0
    assert got["examples"] == 0 and 3.0 <= took < 30, took


def test_the_rate_spans_first_to_last_example_not_the_idle_wait_that_ends_the_run():
    """examples_per_s is over the trained span: the quiet seconds after the
    last example (idle_timeout_s, which ends the run) are not in it. On the
    shop job, compiled before its first example."""
    from tests.jobs import shop
    from tests.online.test_trainer_offset_gaps import shop_examples
    from tests.stream.kafka_util import producer

    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {"examples": 2, "dead-letters": 1})
        prod = producer(bs)
        for rid, value in shop_examples(300):
            prod.produce("examples", value, rid)
        assert prod.flush(30) == 0
        online = OnlineTrainer(shop.job.make_trainer(0, log_every=0), bs, group="span", batch_size=128,
                               max_wait_s=0.05, prequential=False, warmup=True, **QUIET)
        t0 = time.monotonic()
        got = online.run(idle_timeout_s=3.0, max_seconds=60.0, report_every_s=0)
        wall = time.monotonic() - t0
    span = got["examples"] / got["examples_per_s"]
    assert got["examples"] == 300 and wall >= 3.0
    assert span < 1.5, (span, wall)   # 3 batches; before, the span ran on through the 3 s idle wait
