"""Incremental snapshots (`Snapshots(full_every=K)`): a full snapshot and the
deltas after it restore to the table state each was taken from, rows
expired or erased between snapshots included; a corrupt delta falls back to
the newest whole point of its chain and its orphans are set aside, never
loaded; chains are kept whole. The table's own change record
(`dump_changes`) is checked against a plain dict of the rows."""

import glob
import os

import numpy as np
import optax
import pytest
from flax import nnx

from monolith_jax.models import DeepFM
from monolith_jax.snapshot import Snapshots
from monolith_jax.sparse import Adagrad, EmbeddingTable, Normal, TableConfig
from monolith_jax.training import Trainer
from tests.online.test_snapshot import _xor_table_data, assert_same_state, folder_listing
from tests.test_models_training import DENSE, FEATS, QUIET, _small_batches

ROW_FIELDS = ("values", "slots", "last_update", "update_count", "touched")


def trainer_with_expiry(seed=0):
    """A small two-feature job (not MovieLens) whose rows expire after 3 steps."""
    model = DeepFM(["user", "item"], 4, len(DENSE), (8,), rngs=nnx.Rngs(seed))
    return Trainer(model, [TableConfig("ids", 5, Normal(0, 0.05), Adagrad(0.05), expire_after=3)], FEATS, DENSE,
                   optax.adam(3e-3), **QUIET)


def rows(dump) -> dict:
    """{key: (values, slots, last_update, update_count, touched)} of a dump."""
    return {int(k): tuple(np.asarray(dump[f][i]).tobytes() for f in ROW_FIELDS) for i, k in enumerate(dump["keys"])}


def table(**kw):
    return EmbeddingTable(TableConfig("t", 4, Normal(0, 0.1), Adagrad(0.1), **kw))


def test_dump_changes_against_a_dict_of_the_rows():
    t = table(expire_after=5)
    rng = np.random.default_rng(0)
    assert t.dump_changes() is None and not t.changes_tracked  # nothing to be relative to yet
    ref = rows(t.dump_base())
    assert t.changes_tracked
    for step in range(1, 30):
        ids = rng.integers(0, 400, 64).astype(np.uint64)
        t.apply_gradients_host(ids, rng.normal(size=(64, 4)).astype(np.float32), step=step)
        if step % 4 == 0:
            t.expire()
        if step % 5 == 0:
            t.erase(rng.integers(0, 400, 30).astype(np.uint64))
        if step % 3 == 0:
            t.drain_touched()  # the sync's marks: a drained row's touched mark is in the next changes
        if step % 2 == 0:
            c = t.dump_changes()
            assert c["removed"].dtype == np.uint64
            for k in c["removed"].tolist():
                ref.pop(k, None)
            ref.update(rows(c))
            assert ref == rows(t.dump()), step
            assert c["clock"] == t.dump()["clock"]
            np.testing.assert_array_equal(c["filter"], t.dump()["filter"])
    assert t.stats()["expired"] > 0
    # A load (or clear) leaves no record to be relative to: a full dump is needed.
    u = table(expire_after=5)
    u.load(t.dump())
    assert u.dump_changes() is None
    u.dump_base()
    t.clear()
    assert t.dump_changes() is None


def test_apply_changes_is_the_dump_after_them():
    t = table()
    t.apply_gradients_host(np.arange(100, dtype=np.uint64), np.ones((100, 4), np.float32), step=1)
    base = t.dump_base()
    t.erase(np.arange(10, dtype=np.uint64))
    t.apply_gradients_host(np.arange(5, 20, dtype=np.uint64), np.ones((15, 4), np.float32), step=2)
    merged = EmbeddingTable.apply_changes(base, t.dump_changes())
    assert rows(merged) == rows(t.dump()) and merged["clock"] == 2


@pytest.mark.parametrize("keep_dump_memory", [True, False])
def test_a_chain_restores_the_state_of_every_snapshot_expiry_included(tmp_path, keep_dump_memory):
    trainer = trainer_with_expiry()
    batches = _small_batches(n=3000, size=100)
    snaps = Snapshots(str(tmp_path), every_s=None, full_every=4, keep=5, keep_dump_memory=keep_dump_memory)
    kinds, expired_between = [], 0
    for k, batch in enumerate(batches[:14]):
        trainer.train_step(batch, stamp=k + 1)
        if k % 3 == 2:
            expired_between += trainer.tables["ids"].expire()
        assert snaps.save(trainer.step_count, trainer, {"mark": k})
        kinds.append(snaps.wait()["kind"])
        # What a reader restores now (the newest snapshot: full + deltas) is this state.
        reader = trainer_with_expiry(seed=1)
        assert Snapshots(str(tmp_path), read_only=True).restore(reader)["mark"] == k
        assert_same_state(trainer, reader)
    snaps.close()
    assert kinds == ["full", "delta", "delta", "delta"] * 3 + ["full", "delta"]
    assert expired_between > 0
    # No Orbax count: chains (a full one and its deltas) are kept whole.
    assert Snapshots(str(tmp_path), read_only=True).steps() == list(range(1, 15))


def test_old_chains_go_whole(tmp_path):
    trainer = trainer_with_expiry()
    snaps = Snapshots(str(tmp_path), every_s=None, full_every=3, keep=2)
    for k, batch in enumerate(_small_batches(n=1000, size=100)):
        trainer.train_step(batch, stamp=k + 1)
        snaps.save(trainer.step_count, trainer, {})
        snaps.wait()
    snaps.close()
    # 10 snapshots: fulls at 1, 4, 7, 10; the two newest chains are 7-9 and 10.
    assert snaps.steps() == [7, 8, 9, 10]
    fresh = trainer_with_expiry(seed=1)
    assert Snapshots(str(tmp_path)).restore(fresh)["step"] == 10
    assert_same_state(trainer, fresh)


def test_a_corrupt_delta_falls_back_to_the_newest_whole_point(tmp_path, caplog):
    trainer = trainer_with_expiry()
    snaps = Snapshots(str(tmp_path), every_s=None, full_every=10)
    states = {}
    for k, batch in enumerate(_small_batches(n=500, size=100)):
        trainer.train_step(batch, stamp=k + 1)
        snaps.save(trainer.step_count, trainer, {"mark": k})
        snaps.wait()
        states[trainer.step_count] = trainer.state_dict()
    snaps.close()
    assert snaps.steps() == [1, 2, 3, 4, 5]
    _xor_table_data(tmp_path, 3)  # a delta in the middle of the chain
    # A reader skips the corrupt one and its orphans, and changes nothing.
    before = folder_listing(tmp_path)
    reader = trainer_with_expiry(seed=1)
    assert Snapshots(str(tmp_path), read_only=True).restore(reader)["step"] == 2
    assert folder_listing(tmp_path) == before
    # The writer sets the corrupt delta aside, and the ones after it (their chain has a hole).
    fresh = trainer_with_expiry(seed=1)
    writer = Snapshots(str(tmp_path), every_s=None, full_every=10)
    assert writer.restore(fresh)["step"] == 2
    expected = trainer_with_expiry(seed=2)
    expected.load_state_dict(states[2])
    assert_same_state(expected, fresh)
    assert glob.glob(str(tmp_path / "3.corrupt-*"))
    assert glob.glob(str(tmp_path / "4.orphaned-*")) and glob.glob(str(tmp_path / "5.orphaned-*"))
    assert writer.steps() == [1, 2]
    # Training on from there: the next snapshot is full (the restored tables track no changes).
    fresh.train_step(_small_batches(n=100, size=100, seed=3)[0], stamp=9)
    assert writer.save(fresh.step_count, fresh, {})
    assert writer.wait()["kind"] == "full"
    writer.close()


def test_a_corrupt_full_snapshot_falls_back_to_the_chain_before(tmp_path):
    trainer = trainer_with_expiry()
    snaps = Snapshots(str(tmp_path), every_s=None, full_every=2)
    for k, batch in enumerate(_small_batches(n=500, size=100)):
        trainer.train_step(batch, stamp=k + 1)
        snaps.save(trainer.step_count, trainer, {})
        snaps.wait()
    snaps.close()
    # Fulls 1, 3, 5; deltas 2, 4. Full 5 corrupt: delta 4 (on full 3) is the newest whole point.
    _xor_table_data(tmp_path, 5)
    fresh = trainer_with_expiry(seed=1)
    assert Snapshots(str(tmp_path)).restore(fresh)["step"] == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_full_every_must_be_a_positive_int(tmp_path, bad):
    with pytest.raises(ValueError, match="full_every must be an int >= 1"):
        Snapshots(str(tmp_path), full_every=bad)
    assert not os.listdir(tmp_path)


def test_combined_changes_apply_as_the_deltas_in_order():
    t = table(expire_after=4)
    rng = np.random.default_rng(3)
    base = t.dump_base()
    deltas = []
    for step in range(1, 16):
        ids = rng.integers(0, 200, 40).astype(np.uint64)
        t.apply_gradients_host(ids, rng.normal(size=(40, 4)).astype(np.float32), step=step)
        t.erase(rng.integers(0, 200, 5).astype(np.uint64))
        if step % 3 == 0:
            t.expire()
        deltas.append(t.dump_changes())
    net, one_by_one = deltas[0], base
    for d in deltas[1:]:
        net = EmbeddingTable.combine_changes(net, d)
    for d in deltas:
        one_by_one = EmbeddingTable.apply_changes(one_by_one, d)
    assert rows(EmbeddingTable.apply_changes(base, net)) == rows(one_by_one) == rows(t.dump())
