"""The online trainer's overlapped host-tables step (the next batch fetched,
decoded and partly looked up while the device runs this one, this one's
apply while the next one runs) trains as the same trainer without overlap:
the same tables, dense params and prequential scores, every example and
offset once, a batch's offsets committed only after its update is applied,
and a stop with a snapshot (and a resume from it) losing nothing."""

import dataclasses

import jax
import numpy as np

from monolith_jax.examples.movielens import job as J
from monolith_jax.online.trainer import OnlineTrainer
from monolith_jax.snapshot import Snapshots
from monolith_jax.stream import kafka as K
from tests.online.test_trainer_bad_input import valid_examples
from tests.stream.kafka_util import producer

TOPIC = "overlap-examples"
N = 600  # 9 batches of 64 and one of 24; 50 users and 17 movies: consecutive batches share most ids
QUIET = dict(out=lambda *a, **k: None)


def _trainer(**kwargs):
    job = dataclasses.replace(J.job, tables=tuple(J.tables(0, 4)), model=lambda rngs: J.model(rngs, 4, (8,)))
    return job.make_trainer(0, log_every=0, out=None, placement="host", **kwargs)


def _online(bootstrap, group, trainer, **kwargs):
    online = OnlineTrainer(trainer, bootstrap, group=group, batch_size=64, max_wait_s=1.0, topics={"examples": TOPIC},
                           **QUIET, **kwargs)
    seen, parts = [], set()

    def on_batch(o, batch, info):
        # called once the batch's update is applied: not yet committed, and its rows' stamp in the tables
        real = info["status"] != -3
        seen.append(info["offset"][real].copy())
        parts.update(int(p) for p in info["partition"][real])
        committed = o._committed.get((TOPIC, int(info["partition"][0])))
        assert committed is None or committed.offset <= int(info["offset"][real].min())

    online.on_batch = on_batch
    return online, seen, parts


def _state(trainer):
    leaves = [np.asarray(x) for x in jax.tree.leaves(trainer.params) + jax.tree.leaves(trainer.opt_state)]
    d = trainer.tables["ids"].dump()
    o = np.argsort(d["keys"])
    return leaves, {k: d[k][o] for k in ("keys", "values", "slots", "last_update", "update_count")}


def _assert_close(a, b):
    (la, ta), (lb, tb) = _state(a), _state(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(ta["keys"], tb["keys"])
    for k in ("values", "slots"):
        np.testing.assert_allclose(ta[k], tb[k], rtol=2e-6, atol=1e-7)
    for k in ("last_update", "update_count"):
        np.testing.assert_array_equal(ta[k], tb[k])
    assert a.step_count == b.step_count and a.examples == b.examples


def _committed(bootstrap, group, partition):
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(K.consumer_config(bootstrap, group))
    try:
        return c.committed([TopicPartition(TOPIC, partition)], timeout=10)[0].offset
    finally:
        c.close()


def test_overlapped_online_training_equals_the_plain_step_and_trains_each_example_once(tmp_path):
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {TOPIC: 1, **{t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()}})
        prod = producer(bs)
        for rid, value in valid_examples(N):
            prod.produce(TOPIC, value, "k")  # one key, one partition: the same batches in every run
        assert prod.flush(30) == 0

        plain_t = _trainer(overlap=False)
        plain, plain_seen, parts = _online(bs, "plain", plain_t)
        assert plain.pipeline is None  # overlap off: one batch at a time, as before
        r_plain = plain.run(idle_timeout_s=3.0, max_seconds=120, report_every_s=0)

        over_t = _trainer(overlap=True)
        over, over_seen, over_parts = _online(bs, "over", over_t)
        assert over.pipeline is not None and over.pipeline.overlap
        r_over = over.run(idle_timeout_s=3.0, max_seconds=120, report_every_s=0)

        assert r_plain["examples"] == r_over["examples"] == N
        assert r_plain["batches"] == r_over["batches"] == 10
        _assert_close(plain_t, over_t)
        assert over_t.host_stats["steps"] == 10
        # The prequential scores: each batch scored once its rows hold every step before it.
        (y1, s1, t1), (y2, s2, t2) = plain.log.arrays(), over.log.arrays()
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)
        # Every offset trained once, in order, and all committed.
        for seen in (plain_seen, over_seen):
            np.testing.assert_array_equal(np.concatenate(seen), np.arange(N))
        assert len(parts) == 1 and over_parts == parts
        p = parts.pop()
        assert _committed(bs, "plain", p) == _committed(bs, "over", p) == N
        again_t = _trainer(overlap=True)
        again, _, _ = _online(bs, "over", again_t)
        assert again.run(idle_timeout_s=2.0, max_seconds=20, report_every_s=0)["examples"] == 0

        # Stopped mid-stream with a snapshot, then resumed from it: the same end.
        first_t = _trainer(overlap=True, staleness=0)
        snaps = str(tmp_path / "snaps")
        first, first_seen, _ = _online(bs, "snap", first_t, snapshots=Snapshots(snaps, every_s=None, every_steps=3))
        r1 = first.run(max_examples=64 * 5, idle_timeout_s=3.0, max_seconds=120, report_every_s=0)
        assert r1["examples"] == 64 * 5 and first_t.step_count == 5
        second_t = _trainer(overlap=True)
        second, second_seen, _ = _online(bs, "snap", second_t, snapshots=Snapshots(snaps, every_s=None, every_steps=3))
        assert second.resumed_from == 5
        r2 = second.run(idle_timeout_s=3.0, max_seconds=120, report_every_s=0)
        assert r2["examples"] == N
        np.testing.assert_array_equal(np.concatenate(first_seen + second_seen), np.arange(N))
        _assert_close(plain_t, second_t)
