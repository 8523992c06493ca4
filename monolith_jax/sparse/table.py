"""`EmbeddingTable`: a collisionless table of rows keyed by 64-bit ids.

Rows live in the C++ engine (the table is the source of truth); JAX sees only
the rows a batch needs. Two ways in:

* In a jitted program on CPU, `lookup` and `apply_gradients` are XLA FFI
  calls. Gradients reach the table in two explicit phases:

      rows = table.lookup(ids)                          # find-or-insert
      loss, g_rows = jax.value_and_grad(loss_fn)(rows)  # any dense model
      token = table.apply_gradients(ids, g_rows)        # fused optimizer

  XLA does not order side effects by itself: pass `after=token` to a later
  lookup of the same table in the same program (e.g. the next step of a
  `lax.scan`) so that it sees the applied rows.

* From host code (numpy in, numpy out), `lookup_host` and
  `apply_gradients_host` do the same without XLA: the path for a dense step
  that runs on an accelerator while the tables stay on the host.

Thread safety: calls may come from many threads. Lookups run concurrently
with each other; an apply, load, erase or a lookup that creates rows runs
alone, so no reader ever sees a half-updated row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from monolith_jax.sparse import _native
from monolith_jax.sparse.config import TableConfig
from monolith_jax.sparse.keys import Keys, as_key_array, key_words

_DUMP_FIELDS = ("keys", "values", "slots", "last_update", "update_count", "touched", "filter", "clock")
_EXPORT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


class EmbeddingTable:
    """A collisionless embedding table; see the module docstring."""

    def __init__(self, config: TableConfig):
        if not isinstance(config, TableConfig):
            raise TypeError(f"EmbeddingTable needs a TableConfig, got {type(config).__name__}")
        self.config = config
        init_kind, init_a, init_b = config.initializer.native()
        self._native = _native.engine().Table(
            dim=config.dim,
            seed=config.seed,
            capacity_hint=config.capacity_hint,
            init_kind=init_kind,
            init_a=init_a,
            init_b=init_b,
            opt_kind=type(config.optimizer)._kind,
            hparams=config.optimizer.hparams(),
            memory=config.memory_options(),
        )
        self._id = np.int64(self._native.id)

    # ------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def slot_width(self) -> int:
        """Floats of optimizer state per row."""
        return self._native.slot_width

    def __len__(self) -> int:
        return self._native.size()

    def __repr__(self) -> str:
        return f"EmbeddingTable({self.name!r}, dim={self.dim}, rows={len(self)})"

    def close(self) -> None:
        """Frees the table; programs compiled against it then fail cleanly."""
        self._native.close()

    # -------------------------------------------------------- in-program path
    def lookup(self, ids, *, after=None) -> jax.Array:
        """Rows of `ids` (created on first sight): float32, ids' shape + (dim,).

        ids: host integer ids (numpy, any shape), `Keys`, or int32/uint32
        JAX ids. after: any array; the lookup runs after it is computed.
        """
        words = key_words(ids)
        out = jax.ShapeDtypeStruct(tuple(words.shape[:-1]) + (self.dim,), jnp.float32)
        order = jnp.zeros((), jnp.int32) if after is None else after
        call = jax.ffi.ffi_call(
            _native.LOOKUP_TARGET, out, has_side_effect=True, vmap_method="expand_dims"
        )
        return call(words, order, table_id=self._id)

    def apply_gradients(self, ids, grads, *, learning_rate=None, step=0, after=None) -> jax.Array:
        """One fused optimizer step per unique id, duplicate ids' grads summed.

        grads: float32, ids' shape + (dim,). learning_rate: the optimizer's
        unless given (a Python float or a traced scalar, so it may change every
        step without recompiling). step: the row's `last_update` stamp (the
        trainer's step or event time, < 2^31).
        after: any array; the apply runs after it is computed (grads computed
        from the looked-up rows already order the two; pass the rows when the
        gradients do not depend on them).
        Returns int32[2] = (rows updated, rows skipped for non-finite grads);
        pass it as `after=` to a later lookup to order the two.
        """
        words = key_words(ids)
        grads = self._check_grads(words.shape[:-1], grads)
        lr = self._learning_rate(learning_rate)
        step = jnp.asarray(step, jnp.int32)
        call = jax.ffi.ffi_call(
            _native.APPLY_TARGET,
            jax.ShapeDtypeStruct((2,), jnp.int32),
            has_side_effect=True,
            vmap_method="sequential",
        )
        order = jnp.zeros((), jnp.int32) if after is None else after
        return call(words, grads, lr, step, order, table_id=self._id)

    # ------------------------------------------------------------- host path
    def lookup_host(self, ids, *, out: np.ndarray | None = None) -> np.ndarray:
        """`lookup` from host code: numpy float32 (ids' shape + (dim,)).

        out: a C-contiguous float32 array of that shape to write into, so a
        training loop can reuse one buffer instead of faulting in a new one.
        """
        keys = np.ascontiguousarray(as_key_array(ids))
        shape = keys.shape + (self.dim,)
        if out is None:
            return self._native.lookup(keys.reshape(-1)).reshape(shape)
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(
                f"table {self.name!r}: out must be a writeable C-contiguous float32 array of shape {shape}")
        self._native.lookup_into(keys.reshape(-1), out.reshape(-1, self.dim))
        return out

    def find(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Read-only lookup: (rows, found) with zeros where an id has no row."""
        keys = np.ascontiguousarray(as_key_array(ids))
        rows, found = self._native.find(keys.reshape(-1))
        return rows.reshape(keys.shape + (self.dim,)), found.reshape(keys.shape).astype(bool)

    def apply_gradients_host(self, ids, grads, *, learning_rate=None, step=0) -> tuple[int, int]:
        """`apply_gradients` from host code; returns (rows updated, rows skipped)."""
        keys = np.ascontiguousarray(as_key_array(ids))
        grads = self._check_grads(keys.shape, grads)
        grads = np.ascontiguousarray(np.asarray(grads)).reshape(-1, self.dim)
        lr = float(self._learning_rate_value(learning_rate))
        step = self._check_step(step)
        return tuple(self._native.apply(keys.reshape(-1), grads, lr, step))

    def erase(self, ids) -> int:
        """Removes the rows of `ids`; returns how many existed."""
        keys = np.ascontiguousarray(as_key_array(ids)).reshape(-1)
        return self._native.erase(keys)

    def assign(self, ids, values, now: int = 0) -> int:
        """Sets the values of the rows of `ids`, creating missing rows (no
        admission, optimizer slots zeroed, last_update = now): how a serving
        table takes pushed rows. A concurrent lookup sees each row before or
        after, never torn. values: (len(ids), dim), float32, float16 or
        bfloat16. Returns the number of rows created."""
        keys = np.ascontiguousarray(as_key_array(ids)).reshape(-1)
        values = np.asarray(values)
        if values.dtype.name not in ("float32", "float16", "bfloat16"):
            raise TypeError(f"table {self.name!r}: assign values must be float32, float16 or bfloat16, "
                            f"got {values.dtype}")
        if values.shape != (keys.size, self.config.dim):
            raise ValueError(f"table {self.name!r}: assign values must have shape ({keys.size}, "
                             f"{self.config.dim}), got {values.shape}")
        if not np.all(np.isfinite(values.astype(np.float32))):
            raise ValueError(f"table {self.name!r}: assign values must be finite")
        return self._native.assign(keys, np.ascontiguousarray(values, np.float32), self._check_step(now))

    def clear(self) -> None:
        self._native.clear()

    # -------------------------------------------------------- memory control
    def expire(self, now: int | None = None) -> int:
        """Removes rows not updated within `expire_after` of `now` (default:
        the latest apply step seen), one shard at a time while lookups go on.
        Returns how many. Removed ids come back as new rows if seen again."""
        now = 0 if now is None else self._check_step(now)
        return self._native.expire(now)

    def drain_touched(self, dtype="float32") -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of the rows created or updated since the last drain,
        clearing their marks: what a parameter sync pushes. dtype: float32,
        float16 or bfloat16 (serving keeps values only, compressed). A dtype
        outside those is refused before any mark is cleared."""
        target = self._export_dtype(dtype)
        keys, values = self._native.drain_touched()
        return keys, values if target is None else values.astype(target)

    def export(self, dtype="float32") -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of every row, values as float32, float16 or bfloat16."""
        target = self._export_dtype(dtype)
        keys, values = self._native.export()
        return keys, values if target is None else values.astype(target)

    def _export_dtype(self, dtype):
        """The numpy type to convert exported values to (None: float32, as
        stored); ValueError naming the table for any other dtype."""
        try:
            name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        except TypeError:
            name = None
        if name not in _EXPORT_DTYPES:
            raise ValueError(f"table {self.name!r}: export dtype must be one of {sorted(_EXPORT_DTYPES)}, "
                             f"got {dtype!r}")
        return None if name == "float32" else _EXPORT_DTYPES[name]

    # ------------------------------------------------------ state and stats
    def stats(self) -> dict:
        """Rows, bytes (values, optimizer slots, overhead) and operation counts.
        `bytes_dump_kept`: memory kept from the last dump with
        `reuse_buffers` for the next one (not in `bytes_total`; freed by
        `release_dump_buffers()`)."""
        s = dict(self._native.stats())
        rows = max(s["rows"], 1)
        s["bytes_total"] = s["bytes_values"] + s["bytes_slots"] + s["bytes_filter"] + s["bytes_overhead"]
        s["admitted"] = s["inserts"]
        s["bytes_per_row"] = s["bytes_total"] / rows
        s["overhead_bytes_per_row"] = s["bytes_overhead"] / rows
        return s

    def dump(self, reuse_buffers: bool = False) -> dict[str, np.ndarray]:
        """The whole table as contiguous arrays (a consistent snapshot):
        keys uint64 (n), values float32 (n, dim), slots float32 (n, slot_width),
        last_update uint32 (n), update_count uint32 (n), touched uint8 (n),
        filter uint8 (admission sketch), clock (int: latest apply step).
        The engine's threads fill the arrays shard by shard, in place.

        reuse_buffers: the arrays' memory goes back to the table once they
        are freed, for the next such dump (a snapshot every few seconds then
        copies into memory already faulted in, not a GB of fresh pages); the
        table holds that memory until `release_dump_buffers()`."""
        return dict(self._native.dump(0, reuse_buffers))

    def dump_base(self, reuse_buffers: bool = False) -> dict[str, np.ndarray]:
        """`dump()`, and from this moment on a record of what changes, for
        `dump_changes` (a full snapshot that delta snapshots follow)."""
        return dict(self._native.dump(1, reuse_buffers))

    def release_dump_buffers(self) -> None:
        """Frees the memory kept by dumps with `reuse_buffers`."""
        self._native.release_dump_buffers()

    def prepare_dump_buffers(self, rows: int | None = None) -> None:
        """Faults in the memory that the next `dump(reuse_buffers=True)` of up
        to `rows` rows (default: the rows there are now, and 1/8 more) copies
        into, so that dump does not wait for fresh pages (at 10^7 rows of dim
        16, 1.4 GB: seconds). Runs without the GIL: call it from a thread of
        its own while training goes on. The table holds the memory as
        `reuse_buffers` dumps do, until `release_dump_buffers()`."""
        if rows is None:
            rows = len(self) + len(self) // 8
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 0:
            raise ValueError(f"table {self.name!r}: rows must be an int >= 0, got {rows!r}")
        self._native.prepare_dump_buffers(int(rows))

    def dump_changes(self) -> dict[str, np.ndarray] | None:
        """The rows created or changed since the last `dump_base` or
        `dump_changes` (in full, as `dump()` gives them: values, slots,
        metadata, touched marks), plus `removed` (uint64: keys erased,
        expired or evicted since then; a key removed and created again is in
        both), the whole admission filter and the clock; starts a new record.
        None, taking nothing, when the record does not cover everything since
        then (no `dump_base` yet, or a `load` or `clear` since): take a
        `dump_base` instead. Apply one with `apply_changes`. The record is its
        own, apart from `drain_touched`'s marks (a drain changes a row's
        touched mark, so the drained rows are in the next changes)."""
        d = self._native.dump(2)
        return None if d is None else dict(d)

    @property
    def changes_tracked(self) -> bool:
        """Whether `dump_changes` would return changes (not None)."""
        return bool(self._native.changes_tracked())

    @staticmethod
    def apply_changes(dump: dict, changes: dict) -> dict:
        """The dump that `changes` (from `dump_changes`) turns `dump` into:
        its removed keys and changed rows taken out, the changed rows added,
        filter and clock replaced. Numpy only; the table is not touched."""
        gone = np.concatenate([np.asarray(changes["removed"], np.uint64), np.asarray(changes["keys"], np.uint64)])
        keep = ~np.isin(np.asarray(dump["keys"]), gone) if gone.size else slice(None)
        out = {f: np.concatenate([np.asarray(dump[f])[keep], np.asarray(changes[f])])
               for f in ("keys", "values", "slots", "last_update", "update_count", "touched")}
        out["filter"] = np.asarray(changes["filter"])
        out["clock"] = int(changes["clock"])
        return out

    @staticmethod
    def combine_changes(first: dict, then: dict) -> dict:
        """The changes that `first` and then `then` (two `dump_changes()` in
        order) make together, so a chain of deltas is merged among its small
        arrays before one pass over a full dump."""
        drop = np.concatenate([np.asarray(then["removed"], np.uint64), np.asarray(then["keys"], np.uint64)])
        keep = ~np.isin(np.asarray(first["keys"]), drop) if drop.size else slice(None)
        out = {f: np.concatenate([np.asarray(first[f])[keep], np.asarray(then[f])])
               for f in ("keys", "values", "slots", "last_update", "update_count", "touched")}
        out["removed"] = np.concatenate([np.asarray(first["removed"], np.uint64),
                                         np.asarray(then["removed"], np.uint64)])
        out["filter"] = np.asarray(then["filter"])
        out["clock"] = int(then["clock"])
        return out

    def load(self, dump: dict) -> None:
        """Replaces the table's content with a `dump()` of a same-shaped table.
        Everything is checked first: a refused dump leaves the table as it
        was. Fields, dtypes and shapes here; duplicate keys and NaN or Inf
        values or slots by the engine, which builds the new shards aside (in
        parallel) and swaps them in only when whole."""
        arrays, clock = self._checked_dump(dump, deep=False)
        try:
            self._native.load(
                arrays["keys"], arrays["values"], arrays["slots"].reshape(-1),
                arrays["last_update"], arrays["update_count"], arrays["touched"], arrays["filter"], clock,
            )
        except ValueError as err:
            self._deep_check(arrays, arrays["keys"].shape[0])  # names rows and counts (only once refused)
            raise ValueError(f"table {self.name!r}: {err}") from None

    def check_dump(self, dump: dict, deep: bool = True) -> None:
        """Raises (TypeError / ValueError naming the table and the field) if
        `load(dump)` would refuse it: missing fields, dtypes or shapes that
        do not fit this table (dim, optimizer slots, admission filter),
        a clock out of range, and (deep) duplicate keys, NaN or Inf values
        or slots. Changes nothing, so several tables can be checked before
        any loads. deep=False leaves the last two to `load` itself (which
        refuses them with the table unchanged), sparing a sort and a pass."""
        self._checked_dump(dump, deep=deep)

    def _checked_dump(self, dump: dict, deep: bool = True) -> tuple[dict, int]:
        if not isinstance(dump, dict):
            raise TypeError(f"table {self.name!r}: a dump is a dict from dump(), got {type(dump).__name__}")
        missing = [f for f in _DUMP_FIELDS if f not in dump]
        if missing:
            raise ValueError(f"table {self.name!r}: dump lacks {missing}")
        keys = np.asarray(dump["keys"])
        if keys.dtype != np.uint64 or keys.ndim != 1:
            raise TypeError(f"table {self.name!r}: dump keys must be uint64 (n,), got {keys.dtype}{keys.shape}")
        n = keys.shape[0]
        want = {
            "values": (np.float32, (n, self.dim)),
            "slots": (np.float32, (n, self.slot_width)),
            "last_update": (np.uint32, (n,)),
            "update_count": (np.uint32, (n,)),
            "touched": (np.uint8, (n,)),
            "filter": (np.uint8, (self._native.stats()["bytes_filter"],)),
        }
        arrays = {"keys": np.ascontiguousarray(keys)}
        for field, (dtype, shape) in want.items():
            a = np.asarray(dump[field])
            if a.dtype != dtype or a.shape != shape:
                raise ValueError(
                    f"table {self.name!r}: dump {field} must be {np.dtype(dtype).name}{shape}, "
                    f"got {a.dtype}{a.shape}"
                )
            arrays[field] = np.ascontiguousarray(a)
        if deep:
            self._deep_check(arrays, n)
        try:
            clock = int(dump["clock"])
        except (TypeError, ValueError):
            raise TypeError(f"table {self.name!r}: dump clock must be an int, got {dump['clock']!r}") from None
        if not 0 <= clock < 2**32:
            raise ValueError(f"table {self.name!r}: dump clock must be in [0, 2^32), got {clock}")
        return arrays, clock

    def _deep_check(self, arrays: dict, n: int) -> None:
        # By sorting: NumPy 2's np.unique hashes, ~15x slower on 10^6 keys.
        ordered = np.sort(arrays["keys"])
        if n > 1 and bool((ordered[1:] == ordered[:-1]).any()):
            raise ValueError(f"table {self.name!r}: dump keys are not unique")
        bad_values = arrays["values"].size - int(np.count_nonzero(np.isfinite(arrays["values"])))
        bad_slots = arrays["slots"].size - int(np.count_nonzero(np.isfinite(arrays["slots"])))
        if bad_values or bad_slots:
            rows = int(np.count_nonzero(~np.isfinite(arrays["values"]).all(axis=1)
                                        | ~np.isfinite(arrays["slots"]).all(axis=1)))
            raise ValueError(f"table {self.name!r}: dump holds {bad_values} non-finite values and {bad_slots} "
                             f"non-finite optimizer slots in {rows} of its {n} rows; nothing was loaded")

    # --------------------------------------------------------------- checks
    def _check_grads(self, id_shape, grads):
        shape = tuple(id_shape) + (self.dim,)
        dtype = getattr(grads, "dtype", None)
        if dtype is None:
            raise TypeError(f"table {self.name!r}: gradients must be an array, got {type(grads).__name__}")
        if dtype != np.float32:
            raise TypeError(f"table {self.name!r}: gradients must be float32, got {dtype}")
        if tuple(grads.shape) != shape:
            raise ValueError(
                f"table {self.name!r}: gradients must have shape ids.shape + (dim,) = {shape}, "
                f"got {tuple(grads.shape)}"
            )
        return grads

    def _learning_rate_value(self, learning_rate):
        lr = self.config.optimizer.learning_rate if learning_rate is None else learning_rate
        if isinstance(lr, (int, float, np.floating, np.integer)):
            if not (math.isfinite(float(lr)) and float(lr) > 0):
                raise ValueError(f"table {self.name!r}: learning_rate must be positive and finite, got {lr}")
        return lr

    def _learning_rate(self, learning_rate):
        lr = self._learning_rate_value(learning_rate)
        if isinstance(lr, (int, float, np.floating, np.integer)):
            lr = np.float32(lr)
        lr = jnp.asarray(lr, jnp.float32)
        if lr.shape != ():
            raise ValueError(f"table {self.name!r}: learning_rate must be a scalar, got shape {lr.shape}")
        return lr

    @staticmethod
    def _check_step(step) -> int:
        step = int(step)
        if not 0 <= step < 2**31:
            raise ValueError(f"step must be in [0, 2^31), got {step}")
        return step
