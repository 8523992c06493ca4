"""Snapshots: Orbax checkpoints of a trainer's whole state, resumed with nothing lost.

    snaps = Snapshots("snapshots/", every_s=60, keep=3)
    meta = snaps.restore(trainer)          # latest complete, checked snapshot (None: none yet)
    snaps.save(trainer.step_count, trainer, {"offsets": {...}})   # copies, then writes in the background
    done = snaps.completed()               # the meta of a save that has finished, once

    Snapshots("snapshots/", read_only=True).load(tables_only=True)   # another process reading them

    Snapshots("snapshots/", every_s=10, full_every=30)   # incremental: a full one, then 29 deltas

Incremental snapshots (`full_every=K` > 1): every K-th snapshot is full;
the ones between are deltas, which hold only the table rows created or
changed since the snapshot before (in full: values, slots, metadata,
touched marks) and the keys removed since then (erased, expired, evicted),
beside everything else a resume needs whole (dense params and optimizer
state, admission filters, clocks, the caller's meta and `extra`). Each
table keeps its own record of what changed (`EmbeddingTable.dump_changes`,
apart from the serving sync's touched marks). A restore loads the newest
full snapshot and applies every later delta of its chain in order, and
ends with the state the last delta was taken from. A delta names its
parent (the snapshot before it); a chain with a hole (a parent missing or
set aside) is never loaded: restore uses the newest snapshot whose chain
is whole, and the writer sets the orphaned deltas aside
(`<step>.orphaned-<time>`). A snapshot that failed to write, a restore,
or a table loaded or cleared in between make the next snapshot a full one.
`keep` then counts chains (full snapshots with their deltas).

One snapshot is one Orbax checkpoint (a `CheckpointManager` step) of four
items:

    dense      the dense params and optimizer state, as arrays "0", "1", ...
               in the pytrees' flatten order
    tables     per table ("t0", "t1", ... in name order) its `dump()`: keys,
               values, optimizer slots, row metadata, touched marks, the
               admission filter's counters and the clock, as large arrays
    meta       JSON: what the caller adds (stream offsets per partition, the
               trainer's examples and event time, ...), the step, the key
               scheme of the tables' keys (`key_scheme`), for every array
               its dtype, shape and CRC-32, and `kind`: "full", or "delta"
               with its `parent` and `base` (the full one) steps
    meta_crc32 JSON beside it: the CRC-32 of the meta's canonical JSON
               (sorted keys, no spaces), so that offsets and array
               checksums are as written

One folder has one writer (the trainer, or a training PS shard) and any
number of readers (a serving PS, tools), which open it with
`read_only=True`. Readers never change the folder; the writer, when it
opens it, removes what an earlier writer left unfinished (Orbax's
`*.orbax-checkpoint-tmp-*`), so a reader opening the folder while the
writer saves does not break that save.

Orbax writes a checkpoint under a temporary name and renames it when every
item is written, so a snapshot is either complete or not listed. Restore
checks the meta and every array against their CRC-32s. What it does with a
snapshot that does not read back:

    proven corrupt   a checksum, dtype or shape that does not match, a file
                     or item of the finished snapshot that is missing or
                     truncated, a meta that is not JSON: one log line; the
                     writer moves it aside (`<step>.corrupt-<time>`), a
                     reader skips it; the one before it is used
    newer format     written by a newer version (`format_version` above
                     this one's): skipped and left in place, one log line
    any other error  (too many open files, a permission, an I/O error that
                     proves nothing) retried a few times, then raised as
                     `SnapshotUnreadable`; nothing is moved or skipped
    other key scheme  `KeySchemeMismatch` (below); left in place

Every file is arrays or JSON; nothing is pickled.

Restoring into a trainer is all or nothing: every part of the snapshot is
checked against the trainer (dense shapes and dtypes, table names, dims,
optimizer slots, finite values) before anything of the trainer changes.

Table keys are ids mapped into per-feature key spaces
(`monolith_jax.sparse.keys.KEY_SCHEME`). A snapshot written before them
(no `key_scheme` in its meta) holds raw ids as keys, which no record maps
to any more: restoring it raises `KeySchemeMismatch` (it is not moved
aside; re-train, or restore it with the version that wrote it and
re-export).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import zlib

import numpy as np

from monolith_jax.snapshot_arrays import CorruptSnapshot, pack, unpack
from monolith_jax.snapshot_handlers import arrays_handler

log = logging.getLogger("monolith_jax.snapshot")

# Format 1 since the first snapshots; the meta checksum is an added item
# that earlier readers ignore, so it did not change the format. Format 2 is
# a delta snapshot (full ones are still written as format 1, which earlier
# readers read; they skip deltas as newer).
FORMAT_VERSION = 2
FULL_FORMAT = 1
META_CRC_ITEM = "meta_crc32"
# Pauses before the 2nd, 3rd, ... try of a read that failed without proving
# the snapshot corrupt.
RETRY_DELAYS_S = (0.2, 1.0)


class NewerFormat(RuntimeError):
    """A snapshot written by a newer version of this format; skipped, left in place."""


class SnapshotUnreadable(RuntimeError):
    """A snapshot that failed to read back, repeatedly, for a reason that
    does not prove it corrupt (e.g. too many open files); left in place."""


class KeySchemeMismatch(ValueError):
    """A snapshot whose table keys follow another key scheme than this
    version's; refused, not loaded and not set aside."""


def check_key_scheme(meta: dict, where: str) -> None:
    from monolith_jax.sparse.keys import KEY_SCHEME

    scheme = meta.get("key_scheme")
    if scheme is None:
        raise KeySchemeMismatch(
            f"{where} predates per-feature key spaces: its table keys are raw ids, which records no longer "
            f"map to (ids become keys in each feature's id space, {KEY_SCHEME}). Re-train, or re-export with "
            f"the version that wrote it; the snapshot is left in place")
    if scheme != KEY_SCHEME:
        raise KeySchemeMismatch(f"{where} keys its tables by {scheme!r}; this version reads {KEY_SCHEME!r}")


def canonical_json(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def meta_crc(meta: dict) -> int:
    """CRC-32 of the meta's canonical JSON (what `meta_crc32` stores)."""
    return zlib.crc32(canonical_json(meta).encode("ascii"))


# tensorstore's status codes (the start of its errors' text) that say a file
# of the snapshot is missing, cut short or damaged.
_CORRUPT_STATUS = ("NOT_FOUND:", "DATA_LOSS:", "OUT_OF_RANGE:")


def proves_corruption(err: BaseException) -> bool:
    """Whether an error reading a finished snapshot (whose folder still
    exists) shows that the snapshot itself is damaged, as opposed to a
    condition of this process or machine (EMFILE, EACCES, EIO, ...)."""
    if isinstance(err, (CorruptSnapshot, json.JSONDecodeError)):
        return True
    if isinstance(err, FileNotFoundError) or (isinstance(err, OSError) and err.errno == errno.ENOENT):
        return True
    if isinstance(err, KeyError) and "was not found in the checkpoint" in str(err):
        return True  # Orbax: an item folder of the snapshot is missing
    return isinstance(err, ValueError) and str(err).startswith(_CORRUPT_STATUS)


def local_tables(trainer) -> list:
    """Names of the trainer's tables held in this process (a training PS
    shard snapshots its own rows)."""
    return sorted(name for name, t in trainer.tables.items() if hasattr(t, "dump"))


def trainer_arrays(trainer, kind: str = "all", reuse_buffers: bool = True) -> tuple[dict, dict, dict]:
    """(dense arrays, table arrays, names) of a Trainer, as host copies.
    kind: "all" (every row, `dump()`), "base" (every row, each table's
    change record started anew: `dump_base()`) or "changes" (the rows
    changed since: `dump_changes()`; every table must be tracking).
    reuse_buffers: full dumps copy into the memory of the table's last one
    (see `Snapshots(keep_dump_memory=)`)."""
    import jax

    if hasattr(trainer, "settle"):  # a Trainer: the in-jit steps dispatched so far, their table updates included
        trainer.settle()
    params = jax.tree_util.tree_flatten_with_path(trainer.params)[0]
    opt = jax.tree.leaves(trainer.opt_state)
    dense = {"params": {str(i): np.asarray(jax.device_get(v)) for i, (_, v) in enumerate(params)},
             "opt": {str(i): np.asarray(jax.device_get(v)) for i, v in enumerate(opt)}}
    names = local_tables(trainer)
    tables = {}
    for i, name in enumerate(names):
        table = trainer.tables[name]
        # Full dumps copy into the last one's memory (freed by its write by now).
        dump = table.dump(reuse_buffers=reuse_buffers) if kind == "all" else \
            table.dump_base(reuse_buffers=reuse_buffers) if kind == "base" else table.dump_changes()
        if dump is None:
            raise RuntimeError(f"table {name!r} has no record of its changes since the last snapshot")
        dump["clock"] = np.asarray(dump["clock"], np.int64)
        tables[f"t{i}"] = dump
    return dense, tables, {"tables": names, "params": [jax.tree_util.keystr(p) for p, _ in params],
                           "opt_leaves": len(opt)}


def table_dumps(tables: dict, meta: dict, arrays: dict, deep: bool = True) -> dict:
    """{name: dump} of a loaded snapshot's table arrays, each checked to fit
    `tables` (name -> EmbeddingTable) as `load` would; nothing is changed.
    deep=False leaves duplicate keys and NaN/Inf to `load` (which refuses
    them with that table unchanged), for a caller that can undo the tables
    loaded before it."""
    names = meta["names"]["tables"]
    if sorted(tables) != names:
        raise ValueError(f"snapshot {meta['step']} holds tables {names}, not {sorted(tables)}; nothing was restored")
    dumps = {}
    for i, name in enumerate(names):
        dump = dict(arrays[f"t{i}"])
        dump["clock"] = int(dump["clock"])
        try:
            tables[name].check_dump(dump, deep=deep)
        except (TypeError, ValueError) as err:
            raise ValueError(f"snapshot {meta['step']} does not fit table {name!r}: {err}; nothing was restored") \
                from err
        dumps[name] = dump
    return dumps


def load_tables(tables: dict, meta: dict, arrays: dict) -> None:
    """Fills `tables` (name -> EmbeddingTable) from a loaded snapshot's table
    arrays: all of them are checked before any is loaded."""
    for name, dump in table_dumps(tables, meta, arrays).items():
        tables[name].load(dump)


def _prepare_dumps(plan: list) -> None:
    """Faults in each table's memory for its next full dump, so that dump
    does not block training on fresh pages (EmbeddingTable.
    prepare_dump_buffers). plan: (table, rows or None: its rows and 1/8
    more); after a write, the caller has freed the dump's arrays, whose
    memory is kept unless the rows asked for outgrow it."""
    try:
        for t, rows in plan:
            if rows is None:
                t.prepare_dump_buffers()
            elif t.stats()["bytes_dump_kept"]:  # else its last dump's arrays live on elsewhere
                t.prepare_dump_buffers(rows)
    except Exception as err:  # the next dump faults its pages in itself
        log.warning("snapshot memory not prepared: %s", err)


class Snapshots:
    """Snapshots of a trainer in `directory`, by time (`every_s`) and/or
    steps (`every_steps`), the newest `keep` kept (with `full_every` > 1:
    the newest `keep` full ones and their deltas)."""

    def __init__(self, directory: str, every_s: float | None = 60.0, every_steps: int | None = None,
                 keep: int = 3, async_save: bool = True, read_only: bool = False, full_every: int = 1,
                 keep_dump_memory: bool = True):
        """read_only: a reader of another process's snapshots (a serving PS):
        never writes, moves or deletes anything in `directory`, so the
        writer's save in progress goes on untouched. Otherwise this is the
        folder's one writer: opening it removes unfinished saves left by an
        earlier writer, and corrupt snapshots are moved aside.
        full_every: 1 (default) makes every snapshot full; K > 1 makes every
        K-th one full and the ones between deltas (only the rows changed
        since the snapshot before; see the module docstring). Any reader
        reads both.
        keep_dump_memory: each table keeps the memory of its last full dump
        for the next one (a copy of its rows, as large as the table): the
        next dump copies into pages already faulted in, which at 10^7 rows
        blocks training for a fraction of the time fresh pages cost. That
        memory is faulted in off the training thread after a restore, and
        after a write for a table growing past it (as much as it grew since
        the snapshot before). False returns it after every write, for
        tables too large to hold twice."""
        import orbax.checkpoint as ocp

        if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1:
            raise ValueError(f"full_every must be an int >= 1 (1: every snapshot full), got {full_every!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.full_every, self.keep = full_every, keep
        self.keep_dump_memory = bool(keep_dump_memory)

        self.directory = os.path.abspath(directory)
        self.every_s, self.every_steps = every_s, every_steps
        self.read_only = read_only
        self.restored_extra: dict = {}  # the `extra` arrays of the snapshot restore() loaded
        extra = {}
        import jax

        if read_only:
            self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
                read_only=True, max_to_keep=None, create=False, cleanup_tmp_directories=False,
                enable_async_checkpointing=False))
        elif jax.distributed.is_initialized():
            # One of several data-parallel trainers: each writes its own
            # folder alone, with no barrier across the group.
            me = jax.process_index()
            mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                    barrier_sync_key_prefix=f"trainer-{me}")
            extra["multiprocessing_options"] = mp
            os.makedirs(self.directory, exist_ok=True)  # Orbax's create=True refuses active_processes
            # Orbax's own async mode signals through the group's coordination
            # service; this class already writes off the training thread.
            async_save = False
        if not read_only:
            registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
            mp = extra.get("multiprocessing_options")
            if mp is not None:
                json_handler = ocp.handlers.JsonCheckpointHandler(multiprocessing_options=mp)
                registry.add("meta", ocp.args.JsonSave, json_handler)
                registry.add("meta", ocp.args.JsonRestore, json_handler)
            for item in ("dense", "tables"):
                # Uncompressed, arrays written without Orbax's copy (see
                # snapshot_handlers); plain zarr in a data-parallel group.
                handler = arrays_handler(use_ocdbt=mp is None, multiprocessing_options=mp)
                registry.add(item, ocp.args.PyTreeSave, handler)
                registry.add(item, ocp.args.PyTreeRestore, handler)
            # Chains are kept whole by this class (_retain), not by Orbax's count.
            self.manager = ocp.CheckpointManager(self.directory, handler_registry=registry,
                                                 options=ocp.CheckpointManagerOptions(
                max_to_keep=keep if full_every == 1 else None, enable_async_checkpointing=async_save,
                create=not extra,
                # Old snapshots are removed on Orbax's own thread, not inside
                # the next save (at 10^7 rows: 1.3x faster saves, paired);
                # close() waits for it.
                enable_background_delete=True,
                cleanup_tmp_directories=True, **extra))
        self._worker = None             # the thread writing the last save
        self._warming = None            # the thread faulting in dump memory after a restore
        self._dump_rows: dict = {}      # rows of each table's last full dump
        self._done = None               # meta of a finished save not yet reported
        self._error = None
        self._last_t = time.monotonic()
        self._last_step = None
        self.saved = 0
        self.saved_deltas = 0           # of them, delta snapshots
        self.save_seconds = 0.0         # time the caller's thread spent in save()
        # The chain the next delta continues: (its parent's step, the full
        # one's step, deltas since it); None: the next snapshot is full.
        self._chain = None
        self._chain_broken = False      # a write failed: its delta's changes are lost to the chain

    # --------------------------------------------------------------- save
    @property
    def last_step(self):
        """The step of the last snapshot saved or restored (None: none yet)."""
        return self._last_step

    def due(self, step: int) -> bool:
        if self._last_step is not None and step == self._last_step:
            return False
        last = self._last_step if self._last_step is not None else 0
        if self.every_steps and step - last >= self.every_steps:
            return True
        return bool(self.every_s) and time.monotonic() - self._last_t >= self.every_s

    def mark(self, step: int) -> None:
        """Records that snapshot `step` was taken elsewhere (by the chief of
        a data-parallel group), for `due` and `last_step`."""
        self._last_step, self._last_t = step, time.monotonic()

    def save(self, step: int, trainer, meta: dict, extra: dict | None = None) -> bool:
        """Starts a snapshot of `trainer` at `step` with `meta` (JSON) and
        `extra` (a nested dict of numpy arrays of the caller's, such as the
        stream's dedup memory: `restored_extra` after a restore). The
        calling thread only takes the host copies (`dump()` of each table,
        the dense arrays): checksums and writing go on in a background
        thread. A save still running from before is waited for first. False
        if `step` is already saved. With `full_every` > 1 the snapshot is a
        delta (the tables' changed rows) unless a full one is due, the chain
        was broken (a failed write, a restore), or a table has no record of
        its changes (loaded or cleared since)."""
        if self.read_only:
            raise RuntimeError(f"snapshots in {self.directory} are opened read-only (a reader); only their "
                               f"writer saves")
        if step in self.manager.all_steps() or step == self._last_step:
            return False
        self._join()
        t0 = time.perf_counter()
        if self._warming is not None:  # a restore's: the dump copies into its memory
            self._warming.join()
            self._warming = None
        if self._chain_broken:
            self._chain, self._chain_broken = None, False
        kind = "all"
        chain = None
        if self.full_every > 1:
            kind = "base"
            if self._chain is not None and self._chain[2] + 1 < self.full_every and all(
                    trainer.tables[n].changes_tracked for n in local_tables(trainer)):
                kind = "changes"
                chain = self._chain
        dense, tables, names = trainer_arrays(trainer, kind, reuse_buffers=self.keep_dump_memory)
        if extra:
            dense["extra"] = extra
        if chain is None:
            link = {"kind": "full"}
            self._chain = (step, step, 0) if self.full_every > 1 else None
        else:
            link = {"kind": "delta", "parent": chain[0], "base": chain[1]}
            self._chain = (step, chain[1], chain[2] + 1)
            self.saved_deltas += 1
        self._last_step, self._last_t = step, time.monotonic()
        plan = []  # the next full dump's rows, if they grow as they did since the last one, and 1/32
        if self.keep_dump_memory and kind != "changes":
            for i, n in enumerate(names["tables"]):
                rows = len(tables[f"t{i}"]["keys"])
                grown = max(rows - self._dump_rows.get(n, rows), 0)
                self._dump_rows[n] = rows
                plan.append((trainer.tables[n], rows + grown + rows // 32))
        self._worker = threading.Thread(target=self._write, args=(step, dense, tables, names, meta, link, plan),
                                        name="monolith-snapshot", daemon=True)
        self._worker.start()
        self.saved += 1
        self.save_seconds += time.perf_counter() - t0
        return True

    def _write(self, step, dense, tables, names, meta, link, plan=()) -> None:
        import orbax.checkpoint as ocp

        from monolith_jax.sparse.keys import KEY_SCHEME

        try:
            dense_kept, dense_spec = pack(dense, "dense/")
            tables_kept, tables_spec = pack(tables, "tables/")
            # Orbax refuses an empty item (a training PS shard has no dense
            # params; a trainer on shards no tables): those are left out.
            items = {name: kept for name, kept in (("dense", dense_kept), ("tables", tables_kept)) if kept}
            version = FULL_FORMAT if link["kind"] == "full" else FORMAT_VERSION
            meta = {**meta, **link, "format_version": version, "key_scheme": KEY_SCHEME, "step": step,
                    "time": time.time(), "names": names, "arrays": {**dense_spec, **tables_spec},
                    "items": sorted(items), "meta_checksum": META_CRC_ITEM}
            meta = json.loads(json.dumps(meta))  # as it reads back (str keys, lists), for its checksum
            self.manager.save(step, args=ocp.args.Composite(
                **{name: ocp.args.PyTreeSave(kept) for name, kept in items.items()},
                meta=ocp.args.JsonSave(meta), **{META_CRC_ITEM: ocp.args.JsonSave({"crc32": meta_crc(meta)})}),
                force=True)
            self.manager.wait_until_finished()
            self._done = meta
        except Exception as err:  # reported by completed()/wait() on the caller's thread
            self._error = err
            self._chain_broken = True
            return
        if plan:  # the dump's arrays freed first: their memory is what the next dump reuses
            dense.clear()
            tables.clear()
            del dense_kept, tables_kept, items
            _prepare_dumps(plan)
        if self.full_every > 1:
            try:
                self._retain()
            except Exception as err:  # a snapshot too many on disk: said, not fatal
                log.warning("snapshots in %s: removing old chains failed: %s", self.directory, err)

    def _retain(self) -> None:
        """Removes every snapshot older than the `keep`-th newest full one
        (whole chains: a delta never outlives its full snapshot)."""
        fulls = [s for s in reversed(self.steps()) if self._kind(s) == "full"]
        if len(fulls) <= self.keep:
            return
        oldest_kept = fulls[self.keep - 1]
        for s in self.steps():
            if s < oldest_kept:
                self.manager.delete(s)

    def _kind(self, step: int) -> str | None:
        """"full" or "delta" from a snapshot's meta (None: unreadable)."""
        try:
            with open(os.path.join(self._step_dir(step), "meta", "metadata")) as f:
                return json.load(f).get("kind", "full")
        except (OSError, ValueError, AttributeError):
            return None

    def _join(self) -> None:
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    def completed(self) -> dict | None:
        """The meta of the last save, once it is complete on disk (else None).
        A save that failed raises here."""
        if self._worker is not None and self._worker.is_alive():
            return None
        self._join()
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"snapshot failed: {err}") from err
        meta, self._done = self._done, None
        return meta

    def wait(self) -> dict | None:
        self._join()
        return self.completed()

    def close(self) -> None:
        self._join()
        if self._warming is not None:
            self._warming.join()
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------ restore
    def steps(self) -> list:
        return sorted(self.manager.all_steps())

    def load(self, tables_only: bool = False) -> tuple[int, dict, dict, dict] | None:
        """(step, dense arrays, table arrays, meta) of the newest snapshot
        that reads back whole and passes its checks (a delta: its chain's
        full snapshot with every delta up to it applied, the meta and dense
        arrays its own); None if there is none. Proven corrupt ones are set
        aside (by the writer) or skipped (by a reader), newer-format ones
        skipped, deltas whose chain has a hole skipped (the writer sets them
        aside); KeySchemeMismatch if the newest readable one predates this
        version's key scheme; SnapshotUnreadable if one keeps failing for a
        reason that proves nothing about it."""
        skipped: set = set()  # corrupt ones a reader leaves in place
        for _ in range(3 + len(self.steps())):
            steps = [s for s in self.steps() if s not in skipped]
            again = False
            for step in reversed(steps):
                try:
                    return self._read_chain(step, tables_only, set(steps))
                except KeySchemeMismatch:
                    raise
                except NewerFormat as err:
                    log.warning("snapshot %d in %s is skipped and left in place: %s", step, self.directory, err)
                except ChainHole as err:
                    self._orphaned(step, err)
                except StepVanished:
                    again = True  # its writer removed it (keep=N) while this read it: list again
                    break
                except ChainCorrupt as err:
                    self._unusable(err.step, err.err)
                    skipped.add(err.step)
                    again = err.step != step  # later deltas of its chain lost their parent: list again
                    if again:
                        break
            if not again:
                return None
            self.manager.reload()
        return None

    def _read_chain(self, step: int, tables_only: bool, present: set):
        """Reads `step` and, for a delta, its chain back to the full one,
        then applies the deltas in order."""
        links, s = [], step
        while True:
            meta = self._guarded(s, lambda: self._read_with_retries(s, tables_only, meta_only=True))[3]
            links.append(s)
            if meta.get("kind", "full") == "full":
                break
            parent = meta.get("parent")
            if not isinstance(parent, int) or parent not in present or parent >= s:
                raise ChainHole(f"its chain lacks snapshot {parent} (delta {s}'s parent)")
            s = parent
        from monolith_jax.sparse.table import EmbeddingTable

        links.reverse()
        full = got = None
        net: dict = {}  # table -> the deltas' changes so far, merged
        for s in links:
            got = self._guarded(s, lambda: self._read_with_retries(s, tables_only or s != step))
            if full is None:
                full = got
                continue
            for name in full[2]:
                changes = got[2].get(name)
                if changes is None or "removed" not in changes:
                    raise ChainCorrupt(s, CorruptSnapshot(f"delta {s} lacks the changes of table arrays {name!r}"))
                net[name] = changes if name not in net else EmbeddingTable.combine_changes(net[name], changes)
        if got is full:
            return full
        tables = {}
        for name, dump in full[2].items():
            tables[name] = EmbeddingTable.apply_changes(dump, net[name])
            tables[name]["clock"] = np.asarray(tables[name]["clock"], np.int64)
        return got[0], got[1], tables, got[3]

    @staticmethod
    def _guarded(step: int, read):
        try:
            return read()
        except CorruptSnapshot as err:
            raise ChainCorrupt(step, err) from err

    def _orphaned(self, step: int, err: Exception) -> None:
        if self.read_only:
            log.warning("snapshot %d in %s is skipped (%s); left in place: a reader changes nothing", step,
                        self.directory, err)
            return
        log.error("snapshot %d in %s cannot be restored (%s); moving it aside and using the one before",
                  step, self.directory, err)
        path = self._step_dir(step)
        if os.path.exists(path):
            os.replace(path, f"{path}.orphaned-{int(time.time())}")
        self.manager.reload()

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _read_with_retries(self, step: int, tables_only: bool, meta_only: bool = False):
        for attempt in range(len(RETRY_DELAYS_S) + 1):
            try:
                return self._read(step, tables_only, meta_only)
            except (KeySchemeMismatch, NewerFormat):
                raise
            except Exception as err:
                if not os.path.isdir(self._step_dir(step)):
                    raise StepVanished() from err
                if isinstance(err, CorruptSnapshot):
                    raise
                if proves_corruption(err):
                    raise CorruptSnapshot(f"{type(err).__name__}: {err}") from err
                if attempt == len(RETRY_DELAYS_S):
                    raise SnapshotUnreadable(
                        f"snapshot {step} in {self.directory} could not be read ({type(err).__name__}: {err}) "
                        f"in {attempt + 1} tries; that does not show it is damaged, so it is left in place and "
                        f"no older snapshot is used instead. Fix the cause and start again") from err
                log.warning("reading snapshot %d in %s failed (%s: %s); trying again", step, self.directory,
                            type(err).__name__, err)
                time.sleep(RETRY_DELAYS_S[attempt])

    def _read(self, step: int, tables_only: bool, meta_only: bool = False):
        import orbax.checkpoint as ocp

        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict):
            raise CorruptSnapshot(f"its meta is a JSON {type(meta).__name__}, not an object")
        version = meta.get("format_version", 0)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise NewerFormat(f"written in snapshot format {version} by a newer version; this one reads "
                              f"format {FORMAT_VERSION} and older")
        if meta.get("meta_checksum") is not None or os.path.isdir(os.path.join(self._step_dir(step), META_CRC_ITEM)):
            # Written with a checksum (snapshots from before it have none).
            stored = self.manager.restore(step, args=ocp.args.Composite(
                **{META_CRC_ITEM: ocp.args.JsonRestore()}))[META_CRC_ITEM]
            if not isinstance(stored, dict) or stored.get("crc32") != meta_crc(meta):
                raise CorruptSnapshot("its meta (stream offsets, array checksums) fails its CRC-32 check")
        check_key_scheme(meta, f"snapshot {step} in {self.directory}")
        try:
            saved = set(meta.get("items", ["dense", "tables"]))
            wanted = {"tables"} if tables_only else {"tables", "dense"}
            spec = meta["arrays"]
            meta["names"]["tables"]
        except (KeyError, TypeError) as err:
            raise CorruptSnapshot(f"its meta lacks {err}") from err
        if meta_only:
            return step, {}, {}, meta
        items = {name: ocp.args.PyTreeRestore() for name in sorted(saved & wanted)}
        got = self.manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
        tables = unpack(got["tables"] if "tables" in saved else {}, spec, "tables/")
        dense = {} if tables_only else unpack(got["dense"] if "dense" in saved else {}, spec, "dense/")
        return step, dense, tables, meta

    def _unusable(self, step: int, err: Exception) -> None:
        if self.read_only:
            log.error("snapshot %d in %s is unusable (%s); skipping it for the one before (left in place: "
                      "a reader changes nothing)", step, self.directory, err)
            return
        log.error("snapshot %d in %s is unusable (%s); moving it aside and using the one before",
                  step, self.directory, err)
        self._set_aside(step)

    def _set_aside(self, step: int) -> None:
        path = self._step_dir(step)
        if os.path.exists(path):
            os.replace(path, f"{path}.corrupt-{int(time.time())}")
        self.manager.reload()

    def restore(self, trainer) -> dict | None:
        """Loads the newest good snapshot into `trainer` (dense params,
        optimizer state, step, examples, every table held here); returns its
        meta, or None. All or nothing: a snapshot that does not fit the
        trainer raises ValueError naming what, with the trainer unchanged."""
        found = self.load()
        if found is None:
            return None
        step, dense, tables, meta = found
        where = f"snapshot {step} in {self.directory}"
        local = local_tables(trainer)
        if local != meta["names"]["tables"]:
            raise ValueError(f"{where} holds tables {meta['names']['tables']}, the trainer has {local}; "
                             f"nothing was restored")
        # The trainer's current dense state: leaf names in flatten order (the
        # snapshot's "0", "1", ... follow it), and what to return to.
        backup = trainer.state_dict(tables=False)
        state = {"step_count": int(meta["step"]),
                 "examples": int(meta.get("trained_examples", trainer.examples))}
        for part, saved in (("params", dense.get("params", {})), ("opt_state", dense.get("opt", {}))):
            if len(saved) != len(backup[part]):
                raise ValueError(f"{where} does not fit this model: it holds {len(saved)} arrays of {part}, "
                                 f"the model has {len(backup[part])}; nothing was restored")
            state[part] = {name: saved[str(i)] for i, name in enumerate(backup[part])}
        # Shallow checks: a table refusing its dump is undone with the backup.
        state["tables"] = table_dumps({n: trainer.tables[n] for n in local}, meta, tables, deep=False)
        backup["tables"] = {n: trainer.tables[n].dump() for n in local}
        try:
            trainer.load_state_dict(state, strict=False)  # checks every part before it changes any
        except BaseException as err:
            # A refusal changed nothing; a failure half way (memory) is undone.
            trainer.load_state_dict(backup, strict=False)
            if isinstance(err, (TypeError, ValueError)):
                raise ValueError(f"{where} does not fit this trainer: {err}; nothing was restored") from err
            raise
        self._last_step = step
        self._chain = None  # the loaded tables track no changes: the next snapshot is full
        self._dump_rows = {}
        self.restored_extra = dense.get("extra", {})
        if self.keep_dump_memory and not self.read_only:
            # The next (full) snapshot copies the restored tables into memory
            # faulted in meanwhile, not into fresh pages with training blocked.
            self._warming = threading.Thread(target=_prepare_dumps, args=([(trainer.tables[n], None) for n in local],),
                                             name="monolith-snapshot-warm", daemon=True)
            self._warming.start()
        log.info("resumed from snapshot %d in %s", step, self.directory)
        return meta


class StepVanished(Exception):
    """A snapshot removed by its writer while it was being read."""


class ChainHole(Exception):
    """A delta snapshot whose chain back to its full snapshot misses one."""


class ChainCorrupt(Exception):
    """A snapshot of a chain (`step`) proven corrupt (`err`)."""

    def __init__(self, step: int, err: Exception):
        super().__init__(f"snapshot {step}: {err}")
        self.step, self.err = step, err
