"""`Trainer.train_step(scores=True)`: the batch's scores from the step's own
forward pass, before its update, as `predict` gives them; on the shop job
(one head) and the shop's two-head job. The online trainer's prequential log
takes them from there on the in-jit step."""

import dataclasses

import numpy as np

import monolith_jax as mj
from tests.jobs import shop, shop_tasks


def _batches(job, tmp_path, n=1200):
    path = str(tmp_path / "log.parquet")
    (shop_tasks if job.heads else shop).make_log(path, n=n)
    return list(job.batches([path], batch_size=200))


def _assert_same(got, want):
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def _check(job, tmp_path):
    # Zero initial rows: a row the step creates reads as predict's absent row does.
    zeros = dataclasses.replace(job, tables=tuple(dataclasses.replace(t, initializer=mj.Zeros())
                                                  for t in job.tables))
    trainer = zeros.make_trainer(0, log_every=0, out=None)
    assert trainer.step_placement() == "in_jit"
    batches = _batches(job, tmp_path)
    for batch in batches:
        before = trainer.predict(batch)
        loss, scores = trainer.train_step(batch, scores=True)
        _assert_same(scores, before)
        assert np.isfinite(float(loss))
    # Every id present (a second pass): the scores are predict's with any initializer.
    trainer = job.make_trainer(0, log_every=0, out=None)
    for batch in batches:
        trainer.train_step(batch)
    for batch in batches:
        before = trainer.predict(batch)
        _, scores = trainer.train_step(batch, scores=True)
        _assert_same(scores, before)
    # The same update with scores as without.
    a, b = job.make_trainer(0, log_every=0, out=None), job.make_trainer(0, log_every=0, out=None)
    for batch in batches[:3]:
        a.train_step(batch)
        b.train_step(batch, scores=True)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa["params"]:
        np.testing.assert_array_equal(sa["params"][k], sb["params"][k])
    da, db = sa["tables"]["ids"], sb["tables"]["ids"]
    assert da.keys() == db.keys()
    for k in da:
        if isinstance(da[k], np.ndarray):
            np.testing.assert_array_equal(da[k], db[k])


def test_step_scores_are_the_scores_before_the_update(tmp_path):
    _check(shop.job, tmp_path)


def test_step_scores_per_head(tmp_path):
    _check(shop_tasks.make_job(), tmp_path)


def test_host_step_scores_with_predict_first(tmp_path):
    trainer = shop.job.make_trainer(0, log_every=0, out=None, placement="host")
    for batch in _batches(shop.job, tmp_path, n=600):
        before = trainer.predict(batch)
        _, scores = trainer.train_step(batch, scores=True)
        np.testing.assert_array_equal(scores, before)


def test_online_prequential_log_holds_each_batch_scored_before_its_update():
    """The in-jit online trainer's log (its step's own scores, logged one
    step later) equals scoring each batch with `predict` before training on
    it, batch for batch, on the shop job from the examples topic."""
    from monolith_jax.online.trainer import OnlineTrainer
    from monolith_jax.stream import kafka as K
    from monolith_jax.stream.messages import encode_example, encode_features
    from tests.stream.kafka_util import producer

    job = dataclasses.replace(shop.job, tables=tuple(dataclasses.replace(t, initializer=mj.Zeros())
                                                     for t in shop.job.tables))
    rng = np.random.default_rng(3)
    n = 500
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {"shop-examples": 1, **{t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()}})
        prod = producer(bs)
        for i in range(n):
            sparse = {"user": [int(rng.integers(0, 40))], "item": [int(rng.integers(0, 40))],
                      "category": [int(rng.integers(0, 5))], "recent_items": rng.integers(0, 40, 3).tolist()}
            f = encode_features(f"q{i}", 1_000 + i, sparse, {"price": float(rng.uniform(1, 100))})
            prod.produce("shop-examples", encode_example(f, float(rng.random() < 0.3), 1.0, 2_000 + i), "k")
        assert prod.flush(30) == 0
        trainer = job.make_trainer(0, log_every=0, out=None)
        assert trainer.step_placement() == "in_jit"
        online = OnlineTrainer(trainer, bs, topics={"examples": "shop-examples"}, group="scores", batch_size=64,
                               max_wait_s=1.0, out=lambda *a, **k: None)
        seen = []
        online.on_batch = lambda o, batch, info: seen.append((batch, info["rows"], int(info["event_time_ms"].max())))
        got = online.run(idle_timeout_s=2.0, max_seconds=120, report_every_s=0)
    assert got["examples"] == n
    y, s, _ = online.log.arrays()
    assert y.size == n
    again = job.make_trainer(0, log_every=0, out=None)
    want = []
    for batch, rows, _ in seen:
        want.append(again.predict(batch)[:rows])
        again.train_step(batch)
    np.testing.assert_allclose(s, np.concatenate(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y, np.concatenate([np.asarray(b.labels)[:r] for b, r, _ in seen]))
