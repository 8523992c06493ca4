"""Partial batches are padded only to the next power of two, and every such
bucket is compiled before the first example without changing the model."""

import jax
import numpy as np

from monolith_jax.stream import kafka as K
from monolith_jax.examples.movielens.loop import movielens_trainer
from monolith_jax.online.trainer import OnlineTrainer, shrink
from tests.serving.test_predictor import make_batch


def test_shrink_pads_to_the_next_power_of_two_and_keeps_the_rows():
    trainer = movielens_trainer(dim=4, hidden=(8,), out=lambda *a, **k: None)
    batch = make_batch(trainer, np.random.default_rng(0), b=1024)
    for rows, size in [(1, 64), (64, 64), (65, 128), (300, 512), (1000, 1024), (1024, 1024)]:
        small = shrink(batch, rows, 64)
        assert small.size == size
        for name in batch.ids:
            np.testing.assert_array_equal(small.ids[name].words, batch.ids[name].words[:size])
            np.testing.assert_array_equal(small.lengths[name], batch.lengths[name][:size])
        np.testing.assert_array_equal(small.labels, batch.labels[:size])


def test_warmup_compiles_every_bucket_and_changes_nothing():
    trainer = movielens_trainer(dim=4, hidden=(8,), out=lambda *a, **k: None)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(trainer.params)]
    with K.EmbeddedKafka() as kafka:
        online = OnlineTrainer(trainer, kafka.bootstrap, batch_size=256, min_bucket=64, warmup=True)
        assert online.buckets() == [64, 128, 256] and online.warmup_s > 0
        online.consumer.close()
    after = jax.tree.leaves(trainer.params)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, after))
    assert trainer.step_count == 0
    # Only the padding key's row exists (every bucket looked it up), untouched by a zero gradient.
    assert len(trainer.tables["ids"]) == 1
    # A training step of each bucket size now runs without compiling again.
    n = trainer._train._cache_size()
    for size in (64, 128, 256):
        trainer.train_step(make_batch(trainer, np.random.default_rng(size), b=size))
    assert trainer._train._cache_size() == n
