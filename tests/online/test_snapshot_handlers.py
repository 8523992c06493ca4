"""The snapshot's array handler: arrays are written without Orbax's deep
copy, round-trip as before, and snapshots written by Orbax's default
handler (the layout before) still restore."""

import copy

import numpy as np
import orbax.checkpoint as ocp

from monolith_jax import snapshot
from monolith_jax.snapshot import Snapshots
from tests.online.test_snapshot import small_trainer
from tests.serving.test_predictor import make_batch


def trained(steps=2, seed=0):
    trainer = small_trainer(seed)
    rng = np.random.default_rng(1)
    for step in range(steps):
        trainer.train_step(make_batch(trainer, rng), stamp=step + 1)
    return trainer


def same_tables(a, b):
    for name in a.tables:
        da, db = a.tables[name].dump(), b.tables[name].dump()
        oa, ob = np.argsort(da["keys"]), np.argsort(db["keys"])
        assert np.array_equal(da["keys"][oa], db["keys"][ob])
        assert np.array_equal(da["values"][oa], db["values"][ob])


def test_a_save_writes_its_arrays_without_a_deep_copy(tmp_path, monkeypatch):
    trainer = trained()
    copied = []
    real = copy.deepcopy

    def counting(x, *a, **k):
        if isinstance(x, np.ndarray) and x.size:
            copied.append(x.shape)
        return real(x, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", counting)
    snaps = Snapshots(str(tmp_path), every_s=None)
    snaps.save(trainer.step_count, trainer, {})
    assert snaps.wait()["step"] == trainer.step_count
    snaps.close()
    assert copied == []
    monkeypatch.setattr(copy, "deepcopy", real)
    fresh = small_trainer(seed=5)
    assert Snapshots(str(tmp_path)).restore(fresh)["step"] == trainer.step_count
    same_tables(trainer, fresh)
    for x, y in zip(jax_leaves(trainer.params), jax_leaves(fresh.params)):
        assert np.array_equal(x, y)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_snapshot_written_by_orbax_default_handler_still_restores(tmp_path, monkeypatch):
    trainer = trained()

    def default_handler(use_ocdbt, multiprocessing_options=None):  # the handler of the layout before
        return ocp.PyTreeCheckpointHandler(use_compression=False, use_ocdbt=use_ocdbt)

    monkeypatch.setattr(snapshot, "arrays_handler", default_handler)
    snaps = Snapshots(str(tmp_path), every_s=None)
    snaps.save(trainer.step_count, trainer, {"offsets": {"0": 7}})
    snaps.wait()
    snaps.close()
    monkeypatch.undo()
    fresh = small_trainer(seed=5)
    meta = Snapshots(str(tmp_path)).restore(fresh)  # the writer (this version) opens and reads it
    assert meta["offsets"] == {"0": 7} and fresh.step_count == trainer.step_count
    same_tables(trainer, fresh)
