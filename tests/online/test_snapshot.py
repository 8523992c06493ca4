"""Snapshots: a trainer's whole state round-trips; a corrupt newest snapshot
(arrays or meta) falls back to the one before, a transient error does not
set it aside, a newer format is skipped; readers never change the folder,
so a reader opening it mid-save leaves the writer's save alone; a refused
restore changes nothing; one written before per-feature key spaces is
refused."""

import asyncio
import dataclasses
import gc
import glob
import json
import logging
import os
import resource
import shutil
import threading
import time
import tracemalloc  # noqa: F401  (imported now: pytest's hooks import it, which EMFILE would refuse)

import jax
import numpy as np
import pytest

from monolith_jax.examples.movielens import job as J
from monolith_jax.examples.movielens.loop import movielens_trainer
from monolith_jax.serving.serving_ps import ServingTables
from monolith_jax.snapshot import (FORMAT_VERSION, META_CRC_ITEM, KeySchemeMismatch, SnapshotUnreadable, Snapshots,
                                   canonical_json, meta_crc)
from monolith_jax.sparse import KEY_SCHEME, SGD, Normal, TableConfig
from tests.serving.test_predictor import make_batch


def small_trainer(seed=0):
    return movielens_trainer(seed=seed, dim=4, hidden=(8,), out=lambda *a, **k: None)


def folder_listing(folder):
    """Every path under `folder` with its size and modification time."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def saved_steps(folder, steps, trainer=None):
    """Snapshots `steps` of a trainer trained one batch before each; the
    table dumps after each step."""
    trainer = trainer or small_trainer()
    rng = np.random.default_rng(1)
    snaps = Snapshots(str(folder), every_s=None)
    kept = {}
    for step in steps:
        trainer.train_step(make_batch(trainer, rng), stamp=step)
        snaps.save(trainer.step_count, trainer, {"mark": step, "offsets": {"examples": {"0": 100 * step}}})
        snaps.wait()
        kept[trainer.step_count] = {n: t.dump() for n, t in trainer.tables.items()}
    snaps.close()
    return trainer, kept


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


def _xor_table_data(folder, step):
    for f in glob.glob(str(folder / str(step) / "tables" / "**" / "d" / "*"), recursive=True):
        data = bytearray(open(f, "rb").read())
        for i in range(0, len(data), 7):
            data[i] ^= 0x5A
        open(f, "wb").write(bytes(data))


def _remove(folder, step, pattern):
    paths = glob.glob(str(folder / str(step) / pattern), recursive=True)
    assert paths
    for path in paths:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


DAMAGE = {
    "table data flipped": _xor_table_data,
    "table data file missing": lambda f, s: _remove(f, s, "tables/**/d/*"),
    "table metadata missing": lambda f, s: _remove(f, s, "tables/_METADATA"),
    "dense item missing": lambda f, s: _remove(f, s, "dense"),
    "meta file missing": lambda f, s: _remove(f, s, "meta/metadata"),
    "meta cut short": lambda f, s: open(f / str(s) / "meta" / "metadata", "r+b").truncate(40),
    "meta checksum missing": lambda f, s: _remove(f, s, META_CRC_ITEM),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_newest_snapshot_falls_back_to_the_previous(tmp_path, caplog, damage):
    trainer, kept = saved_steps(tmp_path, (1, 2))
    DAMAGE[damage](tmp_path, 2)
    # A reader skips it and leaves the folder as it is.
    before = folder_listing(tmp_path)
    with caplog.at_level(logging.ERROR, logger="monolith_jax.snapshot"):
        found = Snapshots(str(tmp_path), read_only=True).load()
    assert found[0] == 1 and found[3]["mark"] == 1
    assert folder_listing(tmp_path) == before
    # The writer sets it aside and resumes from the one before.
    fresh = small_trainer()
    with caplog.at_level(logging.ERROR, logger="monolith_jax.snapshot"):
        meta = Snapshots(str(tmp_path)).restore(fresh)
    assert meta["mark"] == 1 and fresh.step_count == 1
    assert any("snapshot 2" in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)
    assert glob.glob(str(tmp_path / "2.corrupt-*")) and not os.path.exists(tmp_path / "2")
    values = fresh.tables["ids"].find(kept[1]["ids"]["keys"])[0]
    np.testing.assert_array_equal(values, kept[1]["ids"]["values"])


def _edit_meta(folder, step, edit, checksum="keep"):
    """Edits a snapshot's meta on disk. checksum: "keep" the stored one (the
    edit is damage), "recompute" it (as its writer would have written it),
    or "drop" it (as a version before meta checksums wrote it)."""
    path = os.path.join(folder, str(step), "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    if checksum == "drop":
        meta.pop("meta_checksum", None)
        shutil.rmtree(os.path.join(folder, str(step), META_CRC_ITEM))
    elif checksum == "recompute":
        meta["meta_checksum"] = META_CRC_ITEM
        os.makedirs(os.path.join(folder, str(step), META_CRC_ITEM), exist_ok=True)
        with open(os.path.join(folder, str(step), META_CRC_ITEM, "metadata"), "w") as f:
            json.dump({"crc32": meta_crc(meta)}, f)
    with open(path, "w") as f:
        json.dump(meta, f)


def test_a_meta_whose_offsets_changed_fails_its_checksum(tmp_path, caplog):
    """The offsets of snapshot 2 edited from 200 to 900 on disk: restoring
    it would skip 700 examples of the stream. Its meta fails its CRC-32, so
    the one before is used (offsets 100) and it is set aside."""
    saved_steps(tmp_path, (1, 2))
    with open(tmp_path / "2" / META_CRC_ITEM / "metadata") as f:
        stored = json.load(f)["crc32"]
    with open(tmp_path / "2" / "meta" / "metadata") as f:
        assert stored == meta_crc(json.load(f))        # the checksum of the canonical JSON, beside it
    _edit_meta(tmp_path, 2, lambda m: m["offsets"]["examples"].update({"0": 900}))
    with caplog.at_level(logging.ERROR, logger="monolith_jax.snapshot"):
        assert Snapshots(str(tmp_path), read_only=True).load()[3]["offsets"] == {"examples": {"0": 100}}
        assert os.path.isdir(tmp_path / "2")          # a reader leaves it
        fresh = small_trainer()
        meta = Snapshots(str(tmp_path)).restore(fresh)
    assert meta["offsets"] == {"examples": {"0": 100}} and fresh.step_count == 1
    assert any("snapshot 2" in r.getMessage() and "fails its CRC-32" in r.getMessage() for r in caplog.records)
    assert glob.glob(str(tmp_path / "2.corrupt-*"))
    # A snapshot from before meta checksums (none stored) still restores.
    _edit_meta(tmp_path, 1, lambda m: None, checksum="drop")
    assert Snapshots(str(tmp_path)).restore(small_trainer())["offsets"] == {"examples": {"0": 100}}
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_a_newer_format_is_skipped_and_left_in_place(tmp_path, caplog):
    saved_steps(tmp_path, (1, 2))
    newer = FORMAT_VERSION + 1
    _edit_meta(tmp_path, 2, lambda m: m.update(format_version=newer), checksum="recompute")
    before = folder_listing(tmp_path)
    fresh = small_trainer()
    with caplog.at_level(logging.WARNING, logger="monolith_jax.snapshot"):
        meta = Snapshots(str(tmp_path)).restore(fresh)
    assert meta["mark"] == 1 and fresh.step_count == 1
    assert any("snapshot 2" in r.getMessage() and "left in place" in r.getMessage() and f"format {newer}" in r.getMessage()
               for r in caplog.records)
    assert folder_listing(tmp_path) == before and not glob.glob(str(tmp_path / "*.corrupt-*"))


def _fill_fds():
    """Opens /dev/null until every descriptor number up to the highest one
    in use is taken; returns them (to close) and the next free number.
    First waits (at most 5 s) for the descriptors in use to hold still:
    clients an earlier test left to be collected (a Kafka client's
    sockets) close theirs from their own threads, and a number freed after
    the fill would let the read this test starves through."""
    gc.collect()
    seen, still_since, t0 = None, time.monotonic(), time.monotonic()
    while time.monotonic() - t0 < 5.0:
        now = set(os.listdir("/proc/self/fd"))
        if now != seen:
            seen, still_since = now, time.monotonic()
        elif time.monotonic() - still_since > 0.3:
            break
        time.sleep(0.02)
    top = max(int(x) for x in os.listdir("/proc/self/fd"))
    fds = []
    try:
        while not fds or fds[-1] <= top:
            fds.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds, fds[-1] + 1


# Orbax's event loops, refused their self-pipe by EMFILE, complain when
# collected: noise of the fault this test makes, not of the code under test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::RuntimeWarning")
def test_too_many_open_files_fails_loudly_and_sets_nothing_aside(tmp_path, caplog):
    """A real EMFILE while reading the newest snapshot: retried, then
    SnapshotUnreadable naming it; the snapshot is not moved, no older one is
    used, the trainer is unchanged; once descriptors are back it restores."""
    saved_steps(tmp_path, (1, 2))
    snaps = Snapshots(str(tmp_path))
    fresh = small_trainer()
    params = [np.asarray(x) for x in jax.tree.leaves(fresh.params)]
    before = folder_listing(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds, limit = _fill_fds()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        with caplog.at_level(logging.WARNING, logger="monolith_jax.snapshot"), \
                pytest.raises(SnapshotUnreadable, match=r"snapshot 2 in .* could not be read \(OSError: \[Errno 24\] "
                                                        r"Too many open files.* in 3 tries.*left in place"):
            snaps.restore(fresh)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in fds:
            os.close(fd)
    assert sum("trying again" in r.getMessage() for r in caplog.records) == 2
    assert folder_listing(tmp_path) == before
    assert fresh.step_count == 0 and len(fresh.tables["ids"]) == 0
    for a, b in zip(params, jax.tree.leaves(fresh.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert snaps.restore(fresh)["mark"] == 2
    caplog.clear()  # its records hold the errors, and they the event loops EMFILE broke:
    gc.collect()    # those go now, under this test's filter


def test_an_error_that_passes_is_retried(tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    saved_steps(tmp_path, (1, 2))
    real, calls = ocp.CheckpointManager.restore, []

    def flaky(self, *args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self, *args, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
    assert Snapshots(str(tmp_path)).restore(small_trainer())["mark"] == 2
    assert os.path.isdir(tmp_path / "2") and not glob.glob(str(tmp_path / "*.corrupt-*"))


def trainer_with(optimizer):
    """small_trainer's model, its table stepped by another optimizer (other slots)."""
    job = dataclasses.replace(J.job, tables=(TableConfig("ids", 5, Normal(0.0, 0.01), optimizer),),
                              model=lambda rngs: J.model(rngs, 4, (8,)))
    return job.make_trainer(0, out=lambda *a, **k: None)


def test_a_refused_restore_changes_nothing(tmp_path):
    """The dense params fit, the table (Adagrad slots into an SGD table)
    does not: refused, naming it, and the trainer keeps its own params,
    optimizer state, rows and counters."""
    saved_steps(tmp_path, (1,))
    other = trainer_with(SGD(0.05))
    other.train_step(make_batch(other, np.random.default_rng(5)), stamp=7)
    dense = [np.array(x) for x in jax.tree.leaves(other.params) + jax.tree.leaves(other.opt_state)]
    rows = other.tables["ids"].dump()
    with pytest.raises(ValueError, match=r"snapshot 1 does not fit table 'ids': .*dump slots must be "
                                         r"float32\(\d+, 0\).*nothing was restored"):
        Snapshots(str(tmp_path)).restore(other)
    for a, b in zip(dense, jax.tree.leaves(other.params) + jax.tree.leaves(other.opt_state)):
        np.testing.assert_array_equal(a, np.asarray(b))
    after = other.tables["ids"].dump()
    for field in rows:
        np.testing.assert_array_equal(np.asarray(rows[field]), np.asarray(after[field]), err_msg=field)
    assert other.step_count == 1 and os.path.isdir(tmp_path / "1")


@pytest.fixture
def finalize_held(monkeypatch):
    """Holds every Orbax save at its last stage (the rename of its
    temporary folder) until released: (entered, release) events."""
    from orbax.checkpoint._src.path import atomicity

    entered, release = threading.Event(), threading.Event()
    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def held(self, *args, **kw):
        entered.set()
        await asyncio.to_thread(release.wait)
        return await real(self, *args, **kw)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held)
    yield entered, release
    release.set()


def test_a_reader_opening_the_folder_mid_save_leaves_the_save_alone(tmp_path, finalize_held):
    """The README's layout: the trainer writes snapshots into the folder the
    serving PS reads. With the writer's save of step 2 in flight (its
    temporary folder on disk), readers open the folder and load the newest
    finished snapshot; the temporary folder stays and the save completes."""
    entered, release = finalize_held
    release.set()
    trainer, kept = saved_steps(tmp_path, (1,))   # finished, with nothing held
    entered.clear()
    release.clear()
    writer = Snapshots(str(tmp_path), every_s=None)
    trainer.train_step(make_batch(trainer, np.random.default_rng(9)), stamp=2)
    assert writer.save(2, trainer, {"mark": 2})
    assert entered.wait(60)
    in_flight = glob.glob(str(tmp_path / "2.orbax-checkpoint-tmp*"))
    assert in_flight
    before = folder_listing(tmp_path)
    reader = Snapshots(str(tmp_path), read_only=True)
    assert reader.load(tables_only=True)[0] == 1
    state = ServingTables({"ids": 5})
    assert state.load_snapshot(str(tmp_path)) == 1           # the serving PS's --snapshot-dir
    with pytest.raises(RuntimeError, match="read-only"):
        reader.save(3, trainer, {})
    assert folder_listing(tmp_path) == before                # nothing written, moved or deleted
    release.set()
    assert writer.wait()["mark"] == 2
    writer.close()
    assert Snapshots(str(tmp_path), read_only=True).load()[0] == 2
    assert Snapshots(str(tmp_path / "none"), read_only=True).load() is None
    assert not os.path.exists(tmp_path / "none")             # a reader creates nothing either


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


def test_a_snapshot_of_raw_id_keys_is_refused_not_loaded_or_set_aside(tmp_path):
    trainer = small_trainer()
    trainer.train_step(make_batch(trainer, np.random.default_rng(4)), stamp=1)
    snaps = Snapshots(str(tmp_path), every_s=None)
    snaps.save(1, trainer, {})
    assert snaps.wait()["key_scheme"] == KEY_SCHEME
    snaps.close()
    _edit_meta(tmp_path, 1, lambda m: m.pop("key_scheme"), checksum="drop")   # as an earlier version wrote it
    fresh = small_trainer()
    with pytest.raises(KeySchemeMismatch, match=r"snapshot 1 in .* predates per-feature key spaces: its table "
                                                r"keys are raw ids.*Re-train, or re-export"):
        Snapshots(str(tmp_path)).restore(fresh)
    assert len(fresh.tables["ids"]) == 0 and fresh.step_count == 0
    assert os.path.isdir(tmp_path / "1") and not glob.glob(str(tmp_path / "1.corrupt-*"))
    # The serving PS and training PS shards read snapshots through the same path.
    with pytest.raises(KeySchemeMismatch, match="predates per-feature key spaces"):
        ServingTables({"ids": 5}).load_snapshot(str(tmp_path))
    _edit_meta(tmp_path, 1, lambda m: m.update(key_scheme="slot-48/1"), checksum="recompute")
    with pytest.raises(KeySchemeMismatch, match="keys its tables by 'slot-48/1'"):
        Snapshots(str(tmp_path)).restore(fresh)


def _shop_trained(tmp_path):
    """The shop job's trainer after one pass over a log of 700 rows."""
    from tests.jobs import shop

    log = tmp_path / "log.parquet"
    shop.make_log(str(log), n=700, part=0)
    trainer = shop.job.make_trainer(0, log_every=0)
    trainer.fit(shop.job.batches(str(log)))
    return trainer


@pytest.mark.parametrize("keep", [True, False])
def test_a_restore_faults_in_the_next_snapshots_memory_meanwhile(tmp_path, keep):
    """After a restore, each table's memory for the next full dump is faulted
    in on a thread of its own (keep_dump_memory), so that snapshot does not
    block training on fresh pages; the snapshot it then takes holds the
    restored state. Not with keep_dump_memory=False. On the shop job."""
    import time

    from tests.jobs import shop

    first = _shop_trained(tmp_path)
    snaps = Snapshots(str(tmp_path / "s"), every_s=None)
    snaps.save(first.step_count, first, {})
    snaps.close()

    second = shop.job.make_trainer(0, log_every=0)
    snaps = Snapshots(str(tmp_path / "s"), every_s=None, keep_dump_memory=keep)
    assert snaps.restore(second) is not None
    kept = lambda: [t.stats()["bytes_dump_kept"] for t in second.tables.values()]  # noqa: E731
    deadline = time.monotonic() + 30
    while keep and min(kept()) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = {n: len(t) for n, t in second.tables.items()}
    assert all(rows.values())
    if keep:  # keys, values, slots, last_update, update_count, touched of every row
        assert all(k >= rows[n] * (8 + 4 * t.dim * 2 + 9) for (n, t), k in zip(second.tables.items(), kept()))
    else:
        assert kept() == [0] * len(rows)
    second.step_count += 1  # as a step trained meanwhile would
    assert snaps.save(second.step_count, second, {})
    snaps.close()
    third = shop.job.make_trainer(0, log_every=0)
    snaps = Snapshots(str(tmp_path / "s"), every_s=None)
    assert snaps.restore(third)["step"] == second.step_count
    snaps.close()
    assert_same_state(second, third)


def test_a_growing_tables_next_dump_memory_is_faulted_in_after_each_write(tmp_path):
    """After a full snapshot's write, each table's memory for the next one is
    faulted in off the training thread, sized for the rows growing as they
    did since the snapshot before (and 1/32 more). On the shop job."""
    from tests.jobs import shop

    trainer = _shop_trained(tmp_path)
    (name, table), = trainer.tables.items()
    row_bytes = 8 + 4 * table.dim * 2 + 9  # keys, values, Adagrad slots, last_update, update_count, touched
    snaps = Snapshots(str(tmp_path / "s"), every_s=None)
    first = len(table)
    snaps.save(1, trainer, {})
    snaps.wait()
    table.lookup_host(np.arange(1, first + 1, dtype=np.uint64) * np.uint64(7919) + np.uint64(2**40))
    second = len(table)
    assert second == 2 * first
    snaps.save(2, trainer, {})
    snaps.wait()
    # The next dump may hold 3x the first snapshot's rows (and 1/32 of the second's).
    assert table.stats()["bytes_dump_kept"] >= (second + (second - first) + second // 32) * row_bytes
    snaps.close()
    restored = shop.job.make_trainer(0, log_every=0)
    snaps = Snapshots(str(tmp_path / "s"), every_s=None, keep_dump_memory=False)
    assert snaps.restore(restored)["step"] == 2 and len(restored.tables[name]) == second
    snaps.save(3, restored, {})
    snaps.wait()
    assert restored.tables[name].stats()["bytes_dump_kept"] == 0
    snaps.close()
