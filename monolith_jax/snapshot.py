"""Snapshots: Orbax checkpoints of a trainer's whole state, resumed with nothing lost.

    snaps = Snapshots("snapshots/", every_s=60, keep=3)
    meta = snaps.restore(trainer)          # latest complete, checked snapshot (None: none yet)
    snaps.save(trainer.step_count, trainer, {"offsets": {...}})   # copies, then writes in the background
    done = snaps.completed()               # the meta of a save that has finished, once

    Snapshots("snapshots/", read_only=True).load(tables_only=True)   # another process reading them

One snapshot is one Orbax checkpoint (a `CheckpointManager` step) of four
items:

    dense      the dense params and optimizer state, as arrays "0", "1", ...
               in the pytrees' flatten order
    tables     per table ("t0", "t1", ... in name order) its `dump()`: keys,
               values, optimizer slots, row metadata, touched marks, the
               admission filter's counters and the clock, as large arrays
    meta       JSON: what the caller adds (stream offsets per partition, the
               trainer's examples and event time, ...), the step, the key
               scheme of the tables' keys (`key_scheme`), and for every
               array its dtype, shape and CRC-32
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

log = logging.getLogger("monolith_jax.snapshot")

# Format 1 since the first snapshots; the meta checksum is an added item
# that earlier readers ignore, so it did not change the format.
FORMAT_VERSION = 1
META_CRC_ITEM = "meta_crc32"
# Pauses before the 2nd, 3rd, ... try of a read that failed without proving
# the snapshot corrupt.
RETRY_DELAYS_S = (0.2, 1.0)


class CorruptSnapshot(RuntimeError):
    """A snapshot proven damaged: a checksum, dtype or shape that does not
    match, or a missing part of a finished snapshot."""


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


def _crc(a: np.ndarray) -> int:
    a = np.ascontiguousarray(a)
    return zlib.crc32(memoryview(a.reshape(-1).view(np.uint8))) if a.size else 0


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


def pack(arrays: dict, prefix: str = "") -> tuple[dict, dict]:
    """Nested dict of arrays -> (the non-empty ones, for Orbax, which refuses
    zero-size arrays; spec: path -> dtype, shape, crc32 of every array)."""
    kept, spec = {}, {}
    for name, a in arrays.items():
        path = f"{prefix}{name}"
        if isinstance(a, dict):
            sub, sub_spec = pack(a, path + "/")
            if sub:
                kept[name] = sub
            spec.update(sub_spec)
            continue
        a = np.asarray(a)
        spec[path] = {"dtype": a.dtype.name, "shape": list(a.shape), "crc32": _crc(a)}
        if a.size:
            kept[name] = a
    return kept, spec


def unpack(restored: dict, spec: dict, prefix: str) -> dict:
    """The arrays under `prefix` from a restored item, empty ones rebuilt,
    every one checked against the spec."""
    out: dict = {}
    for path, s in spec.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        node = restored
        for p in parts:
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        if node is None:
            if int(np.prod(s["shape"])) != 0:
                raise CorruptSnapshot(f"array {path} is missing")
            a = np.zeros(s["shape"], np.dtype(s["dtype"]) if s["dtype"] != "bfloat16" else np.float32)
        else:
            a = np.asarray(node)
        if a.dtype.name != s["dtype"] or list(a.shape) != s["shape"]:
            raise CorruptSnapshot(f"array {path} is {a.dtype.name}{list(a.shape)}, expected {s['dtype']}{s['shape']}")
        if _crc(a) != s["crc32"]:
            raise CorruptSnapshot(f"array {path} fails its CRC-32 check")
        target = out
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = a
    return out


def local_tables(trainer) -> list:
    """Names of the trainer's tables held in this process (a training PS
    shard snapshots its own rows)."""
    return sorted(name for name, t in trainer.tables.items() if hasattr(t, "dump"))


def trainer_arrays(trainer) -> tuple[dict, dict, dict]:
    """(dense arrays, table arrays, names) of a Trainer, as host copies."""
    import jax

    params = jax.tree_util.tree_flatten_with_path(trainer.params)[0]
    opt = jax.tree.leaves(trainer.opt_state)
    dense = {"params": {str(i): np.asarray(jax.device_get(v)) for i, (_, v) in enumerate(params)},
             "opt": {str(i): np.asarray(jax.device_get(v)) for i, v in enumerate(opt)}}
    names = local_tables(trainer)
    tables = {}
    for i, name in enumerate(names):
        dump = trainer.tables[name].dump()
        dump["clock"] = np.asarray(dump["clock"], np.int64)
        tables[f"t{i}"] = dump
    return dense, tables, {"tables": names, "params": [jax.tree_util.keystr(p) for p, _ in params],
                           "opt_leaves": len(opt)}


def table_dumps(tables: dict, meta: dict, arrays: dict) -> dict:
    """{name: dump} of a loaded snapshot's table arrays, each checked to fit
    `tables` (name -> EmbeddingTable) as `load` would; nothing is changed."""
    names = meta["names"]["tables"]
    if sorted(tables) != names:
        raise ValueError(f"snapshot {meta['step']} holds tables {names}, not {sorted(tables)}; nothing was restored")
    dumps = {}
    for i, name in enumerate(names):
        dump = dict(arrays[f"t{i}"])
        dump["clock"] = int(dump["clock"])
        try:
            tables[name].check_dump(dump)
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


class Snapshots:
    """Snapshots of a trainer in `directory`, by time (`every_s`) and/or
    steps (`every_steps`), the newest `keep` kept."""

    def __init__(self, directory: str, every_s: float | None = 60.0, every_steps: int | None = None,
                 keep: int = 3, async_save: bool = True, read_only: bool = False):
        """read_only: a reader of another process's snapshots (a serving PS):
        never writes, moves or deletes anything in `directory`, so the
        writer's save in progress goes on untouched. Otherwise this is the
        folder's one writer: opening it removes unfinished saves left by an
        earlier writer, and corrupt snapshots are moved aside."""
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        self.every_s, self.every_steps = every_s, every_steps
        self.read_only = read_only
        self.restored_extra: dict = {}  # the `extra` arrays of the snapshot restore() loaded
        extra, handlers = {}, {}
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
            registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
            json_handler = ocp.handlers.JsonCheckpointHandler(multiprocessing_options=mp)
            registry.add("meta", ocp.args.JsonSave, json_handler)
            registry.add("meta", ocp.args.JsonRestore, json_handler)
            for item in ("dense", "tables"):
                # OCDBT merges per-process files on process 0 only: plain zarr here.
                handler = ocp.handlers.StandardCheckpointHandler(multiprocessing_options=mp, use_ocdbt=False)
                registry.add(item, ocp.args.StandardSave, handler)
                registry.add(item, ocp.args.StandardRestore, handler)
            handlers = {"handler_registry": registry}
            os.makedirs(self.directory, exist_ok=True)  # Orbax's create=True refuses active_processes
            # Orbax's own async mode signals through the group's coordination
            # service; this class already writes off the training thread.
            async_save = False
        if not read_only:
            self.manager = ocp.CheckpointManager(self.directory, **handlers, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=not extra,
                cleanup_tmp_directories=True, **extra))
        self._worker = None             # the thread writing the last save
        self._done = None               # meta of a finished save not yet reported
        self._error = None
        self._last_t = time.monotonic()
        self._last_step = None
        self.saved = 0
        self.save_seconds = 0.0         # time the caller's thread spent in save()

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
        if `step` is already saved."""
        if self.read_only:
            raise RuntimeError(f"snapshots in {self.directory} are opened read-only (a reader); only their "
                               f"writer saves")
        if step in self.manager.all_steps() or step == self._last_step:
            return False
        self._join()
        t0 = time.perf_counter()
        dense, tables, names = trainer_arrays(trainer)
        if extra:
            dense["extra"] = extra
        self._last_step, self._last_t = step, time.monotonic()
        self._worker = threading.Thread(target=self._write, args=(step, dense, tables, names, meta),
                                        name="monolith-snapshot", daemon=True)
        self._worker.start()
        self.saved += 1
        self.save_seconds += time.perf_counter() - t0
        return True

    def _write(self, step, dense, tables, names, meta) -> None:
        import orbax.checkpoint as ocp

        from monolith_jax.sparse.keys import KEY_SCHEME

        try:
            dense_kept, dense_spec = pack(dense, "dense/")
            tables_kept, tables_spec = pack(tables, "tables/")
            # Orbax refuses an empty item (a training PS shard has no dense
            # params; a trainer on shards no tables): those are left out.
            items = {name: kept for name, kept in (("dense", dense_kept), ("tables", tables_kept)) if kept}
            meta = {**meta, "format_version": FORMAT_VERSION, "key_scheme": KEY_SCHEME, "step": step,
                    "time": time.time(), "names": names, "arrays": {**dense_spec, **tables_spec},
                    "items": sorted(items), "meta_checksum": META_CRC_ITEM}
            meta = json.loads(json.dumps(meta))  # as it reads back (str keys, lists), for its checksum
            self.manager.save(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardSave(kept) for name, kept in items.items()},
                meta=ocp.args.JsonSave(meta), **{META_CRC_ITEM: ocp.args.JsonSave({"crc32": meta_crc(meta)})}),
                force=True)
            self.manager.wait_until_finished()
            self._done = meta
        except Exception as err:  # reported by completed()/wait() on the caller's thread
            self._error = err

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
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------ restore
    def steps(self) -> list:
        return sorted(self.manager.all_steps())

    def load(self, tables_only: bool = False) -> tuple[int, dict, dict, dict] | None:
        """(step, dense arrays, table arrays, meta) of the newest snapshot
        that reads back whole and passes its checks; None if there is none.
        Proven corrupt ones are set aside (by the writer) or skipped (by a
        reader), newer-format ones skipped; KeySchemeMismatch if the newest
        readable one predates this version's key scheme; SnapshotUnreadable
        if one keeps failing for a reason that proves nothing about it."""
        for _ in range(3):
            vanished = False
            for step in reversed(self.steps()):
                try:
                    return self._read_with_retries(step, tables_only)
                except KeySchemeMismatch:
                    raise
                except NewerFormat as err:
                    log.warning("snapshot %d in %s is skipped and left in place: %s", step, self.directory, err)
                except StepVanished:
                    vanished = True  # its writer removed it (keep=N) while this read it: list again
                    break
                except CorruptSnapshot as err:
                    self._unusable(step, err)
            if not vanished:
                return None
            self.manager.reload()
        return None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _read_with_retries(self, step: int, tables_only: bool):
        for attempt in range(len(RETRY_DELAYS_S) + 1):
            try:
                return self._read(step, tables_only)
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

    def _read(self, step: int, tables_only: bool):
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
        items = {name: ocp.args.StandardRestore() for name in sorted(saved & wanted)}
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
        state["tables"] = table_dumps({n: trainer.tables[n] for n in local}, meta, tables)
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
        self.restored_extra = dense.get("extra", {})
        log.info("resumed from snapshot %d in %s", step, self.directory)
        return meta


class StepVanished(Exception):
    """A snapshot removed by its writer while it was being read."""
