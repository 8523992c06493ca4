"""Snapshots: a trainer's whole state round-trips; a corrupt newest snapshot
falls back to the one before; one written before per-feature key spaces is
refused."""

import glob
import json
import logging
import os

import jax
import numpy as np
import pytest

from monolith_jax.examples.movielens.loop import movielens_trainer
from monolith_jax.serving.serving_ps import ServingTables
from monolith_jax.snapshot import KeySchemeMismatch, Snapshots
from monolith_jax.sparse import KEY_SCHEME
from tests.serving.test_predictor import make_batch


def small_trainer(seed=0):
    return movielens_trainer(seed=seed, dim=4, hidden=(8,), out=lambda *a, **k: None)


def assert_same_state(a, b, exact=True):
    """Exact after a restore; to float tolerance after training on (summation
    order across threads may differ in the last bit)."""
    same = np.testing.assert_array_equal if exact else \
        (lambda x, y, err_msg="": np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=err_msg))
    for x, y in zip(jax.tree.leaves(a.params) + jax.tree.leaves(a.opt_state),
                    jax.tree.leaves(b.params) + jax.tree.leaves(b.opt_state)):
        same(np.asarray(x), np.asarray(y))
    for name in a.tables:
        da, db = a.tables[name].dump(), b.tables[name].dump()
        oa, ob = np.argsort(da["keys"]), np.argsort(db["keys"])
        for field in ("keys", "last_update", "update_count", "touched"):
            np.testing.assert_array_equal(da[field][oa], db[field][ob], err_msg=field)
        for field in ("values", "slots"):
            same(da[field][oa], db[field][ob], err_msg=field)
        np.testing.assert_array_equal(da["filter"], db["filter"])
        assert da["clock"] == db["clock"]
    assert a.step_count == b.step_count


def test_whole_trainer_round_trips(tmp_path):
    trainer = small_trainer()
    rng = np.random.default_rng(0)
    for step in range(6):
        trainer.train_step(make_batch(trainer, rng), stamp=100 + step)
    snaps = Snapshots(str(tmp_path), every_s=None)
    assert snaps.save(trainer.step_count, trainer, {"offsets": {"examples": {"0": 42}}})
    meta = snaps.wait()
    assert meta["offsets"] == {"examples": {"0": 42}} and snaps.steps() == [6]
    snaps.close()
    # Only arrays and JSON on disk.
    files = [f for f in glob.glob(str(tmp_path / "**"), recursive=True) if os.path.isfile(f)]
    assert files and not any(f.endswith((".pkl", ".pickle")) for f in files)

    fresh = small_trainer(seed=1)  # other initial params: all must come from the snapshot
    got = Snapshots(str(tmp_path)).restore(fresh)
    assert got["step"] == 6 and got["offsets"] == {"examples": {"0": 42}}
    assert_same_state(trainer, fresh)
    # Training goes on identically from the restored state (with the same
    # table config: its seed decides the initial values of new rows).
    same_config = small_trainer(seed=0)
    Snapshots(str(tmp_path)).restore(same_config)
    batch = make_batch(trainer, np.random.default_rng(7))
    trainer.train_step(batch, stamp=200)
    same_config.train_step(batch, stamp=200)
    assert_same_state(trainer, same_config, exact=False)


def test_empty_tables_and_no_snapshot(tmp_path):
    assert Snapshots(str(tmp_path / "none")).restore(small_trainer()) is None
    trainer = small_trainer()
    snaps = Snapshots(str(tmp_path / "empty"), every_s=None)
    snaps.save(0, trainer, {})
    snaps.close()
    fresh = small_trainer()
    assert Snapshots(str(tmp_path / "empty")).restore(fresh)["step"] == 0 and len(fresh.tables["ids"]) == 0


def test_corrupt_newest_snapshot_falls_back_to_the_previous(tmp_path, caplog):
    trainer = small_trainer()
    rng = np.random.default_rng(1)
    snaps = Snapshots(str(tmp_path), every_s=None)
    kept = {}
    for step in (1, 2):
        trainer.train_step(make_batch(trainer, rng), stamp=step)
        snaps.save(trainer.step_count, trainer, {"mark": step})
        snaps.wait()
        kept[step] = {n: t.dump() for n, t in trainer.tables.items()}
    snaps.close()
    # Damage every data file of the newest snapshot's tables.
    for f in glob.glob(str(tmp_path / "2" / "tables" / "**" / "d" / "*"), recursive=True):
        data = bytearray(open(f, "rb").read())
        for i in range(0, len(data), 7):
            data[i] ^= 0x5A
        open(f, "wb").write(bytes(data))
    fresh = small_trainer()
    with caplog.at_level(logging.ERROR, logger="monolith_jax.snapshot"):
        meta = Snapshots(str(tmp_path)).restore(fresh)
    assert meta["mark"] == 1 and fresh.step_count == 1
    assert any("snapshot 2" in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)
    assert glob.glob(str(tmp_path / "2.corrupt-*")) and not os.path.exists(tmp_path / "2")
    values = fresh.tables["ids"].find(kept[1]["ids"]["keys"])[0]
    np.testing.assert_array_equal(values, kept[1]["ids"]["values"])


def test_partial_snapshot_is_ignored(tmp_path):
    trainer = small_trainer()
    trainer.train_step(make_batch(trainer, np.random.default_rng(2)), stamp=1)
    snaps = Snapshots(str(tmp_path), every_s=None)
    snaps.save(1, trainer, {})
    snaps.close()
    os.makedirs(tmp_path / "5.orbax-checkpoint-tmp-123" / "tables")  # a save that never finished
    assert Snapshots(str(tmp_path)).restore(small_trainer())["step"] == 1


def test_serving_tables_start_from_a_snapshot(tmp_path):
    trainer = small_trainer()
    trainer.train_step(make_batch(trainer, np.random.default_rng(3)), stamp=1)
    snaps = Snapshots(str(tmp_path), every_s=None)
    snaps.save(1, trainer, {})
    snaps.close()
    state = ServingTables({"ids": 5})
    assert state.load_snapshot(str(tmp_path)) == 1
    keys, values = trainer.tables["ids"].export()
    got, found = state.lookup("ids", keys)
    assert found.all() and np.array_equal(got, values)


def _rewrite_meta(folder, step, edit):
    path = os.path.join(folder, str(step), "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def test_a_snapshot_of_raw_id_keys_is_refused_not_loaded_or_set_aside(tmp_path):
    trainer = small_trainer()
    trainer.train_step(make_batch(trainer, np.random.default_rng(4)), stamp=1)
    snaps = Snapshots(str(tmp_path), every_s=None)
    snaps.save(1, trainer, {})
    assert snaps.wait()["key_scheme"] == KEY_SCHEME
    snaps.close()
    _rewrite_meta(tmp_path, 1, lambda m: m.pop("key_scheme"))   # as a snapshot of an earlier version reads
    fresh = small_trainer()
    with pytest.raises(KeySchemeMismatch, match=r"snapshot 1 in .* predates per-feature key spaces: its table "
                                                r"keys are raw ids.*Re-train, or re-export"):
        Snapshots(str(tmp_path)).restore(fresh)
    assert len(fresh.tables["ids"]) == 0 and fresh.step_count == 0
    assert os.path.isdir(tmp_path / "1") and not glob.glob(str(tmp_path / "1.corrupt-*"))
    # The serving PS and training PS shards read snapshots through the same path.
    with pytest.raises(KeySchemeMismatch, match="predates per-feature key spaces"):
        ServingTables({"ids": 5}).load_snapshot(str(tmp_path))
    _rewrite_meta(tmp_path, 1, lambda m: m.update(key_scheme="slot-48/1"))
    with pytest.raises(KeySchemeMismatch, match="keys its tables by 'slot-48/1'"):
        Snapshots(str(tmp_path)).restore(fresh)
