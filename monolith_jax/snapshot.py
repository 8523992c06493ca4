"""Snapshots: Orbax checkpoints of a trainer's whole state, resumed with nothing lost.

    snaps = Snapshots("snapshots/", every_s=60, keep=3)
    meta = snaps.restore(trainer)          # latest complete, checked snapshot (None: none yet)
    snaps.save(trainer.step_count, trainer, {"offsets": {...}})   # copies, then writes in the background
    done = snaps.completed()               # the meta of a save that has finished, once

One snapshot is one Orbax checkpoint (a `CheckpointManager` step) of three
items:

    dense    the dense params and optimizer state, as arrays "0", "1", ...
             in the pytrees' flatten order
    tables   per table ("t0", "t1", ... in name order) its `dump()`: keys,
             values, optimizer slots, row metadata, touched marks, the
             admission filter's counters and the clock, as large arrays
    meta     JSON: what the caller adds (stream offsets per partition, the
             trainer's examples and event time, ...), the step, the key
             scheme of the tables' keys (`key_scheme`), and for every
             array its dtype, shape and CRC-32

Orbax writes a checkpoint under a temporary name and renames it when every
item is written, so a snapshot is either complete or not listed. Restore
also checks every array against its CRC-32: a corrupt or unreadable newest
snapshot is reported in one log line, moved aside (`<step>.corrupt`) and
the one before it is used. Every file is arrays or JSON; nothing is
pickled.

Table keys are ids mapped into per-feature key spaces
(`monolith_jax.sparse.keys.KEY_SCHEME`). A snapshot written before them
(no `key_scheme` in its meta) holds raw ids as keys, which no record maps
to any more: restoring it raises `KeySchemeMismatch` (it is not moved
aside; re-train, or restore it with the version that wrote it and
re-export).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib

import numpy as np

log = logging.getLogger("monolith_jax.snapshot")

FORMAT_VERSION = 1


class CorruptSnapshot(RuntimeError):
    pass


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


def load_tables(tables: dict, meta: dict, arrays: dict) -> None:
    """Fills `tables` (name -> EmbeddingTable) from a loaded snapshot's table arrays."""
    names = meta["names"]["tables"]
    if sorted(tables) != names:
        raise ValueError(f"snapshot {meta['step']} holds tables {names}, not {sorted(tables)}")
    for i, name in enumerate(names):
        dump = dict(arrays[f"t{i}"])
        dump["clock"] = int(dump["clock"])
        tables[name].load(dump)


class Snapshots:
    """Snapshots of a trainer in `directory`, by time (`every_s`) and/or
    steps (`every_steps`), the newest `keep` kept."""

    def __init__(self, directory: str, every_s: float | None = 60.0, every_steps: int | None = None,
                 keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        self.every_s, self.every_steps = every_s, every_steps
        extra, handlers = {}, {}
        import jax

        if jax.distributed.is_initialized():
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

    def save(self, step: int, trainer, meta: dict) -> bool:
        """Starts a snapshot of `trainer` at `step` with `meta` (JSON). The
        calling thread only takes the host copies (`dump()` of each table,
        the dense arrays): checksums and writing go on in a background
        thread. A save still running from before is waited for first. False
        if `step` is already saved."""
        if step in self.manager.all_steps() or step == self._last_step:
            return False
        self._join()
        t0 = time.perf_counter()
        dense, tables, names = trainer_arrays(trainer)
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
                    "items": sorted(items)}
            self.manager.save(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardSave(kept) for name, kept in items.items()},
                meta=ocp.args.JsonSave(meta)), force=True)
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
        KeySchemeMismatch if the newest readable one predates this version's
        key scheme."""
        import orbax.checkpoint as ocp

        for step in reversed(self.steps()):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                if meta.get("format_version", 0) > FORMAT_VERSION:
                    raise CorruptSnapshot(f"format {meta.get('format_version')} is newer than this reader's")
                check_key_scheme(meta, f"snapshot {step} in {self.directory}")
                saved = set(meta.get("items", ["dense", "tables"]))
                wanted = {"tables"} if tables_only else {"tables", "dense"}
                items = {name: ocp.args.StandardRestore() for name in sorted(saved & wanted)}
                got = self.manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
                spec = meta["arrays"]
                tables = unpack(got["tables"] if "tables" in saved else {}, spec, "tables/")
                dense = {} if tables_only else unpack(got["dense"] if "dense" in saved else {}, spec, "dense/")
                return step, dense, tables, meta
            except KeySchemeMismatch:
                raise
            except Exception as err:
                log.error("snapshot %d in %s is unusable (%s: %s); moving it aside and using the one before",
                          step, self.directory, type(err).__name__, err)
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        path = os.path.join(self.directory, str(step))
        if os.path.exists(path):
            os.replace(path, f"{path}.corrupt-{int(time.time())}")
        self.manager.reload()

    def restore(self, trainer) -> dict | None:
        """Loads the newest good snapshot into `trainer` (dense params,
        optimizer state, step, every table); returns its meta, or None."""
        import jax

        found = self.load()
        if found is None:
            return None
        step, dense, tables, meta = found
        names = meta["names"]
        if local_tables(trainer) != names["tables"]:
            raise ValueError(f"snapshot {step} holds tables {names['tables']}, the trainer has {local_tables(trainer)}")
        leaves, treedef = jax.tree_util.tree_flatten(trainer.params)
        opt_leaves, opt_def = jax.tree_util.tree_flatten(trainer.opt_state)
        params = [dense["params"][str(i)] for i in range(len(leaves))] if leaves else []
        opt = [dense["opt"][str(i)] for i in range(len(opt_leaves))] if opt_leaves else []
        for new, old in zip(params + opt, leaves + opt_leaves):
            if new.shape != old.shape or new.dtype != old.dtype:
                raise ValueError(f"snapshot {step} does not fit this model: {new.dtype}{new.shape} "
                                 f"where the model has {old.dtype}{old.shape}")
        trainer.params = jax.tree_util.tree_unflatten(treedef, [jax.device_put(p) for p in params])
        trainer.opt_state = jax.tree_util.tree_unflatten(opt_def, [jax.device_put(p) for p in opt])
        load_tables({n: trainer.tables[n] for n in local_tables(trainer)}, meta, tables)
        trainer.step_count = int(meta["step"])
        trainer.examples = int(meta.get("trained_examples", trainer.examples))
        self._last_step = step
        log.info("resumed from snapshot %d in %s", step, self.directory)
        return meta
