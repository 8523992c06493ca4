"""Where the training step runs, and the host-tables step overlapped with the device.

Placement. The in-jit step (`Trainer._train_step`) calls the tables through
XLA FFI custom calls that exist for the CPU only; the host-tables step
(`Trainer._dense_step` between `lookup_host` and `apply_gradients_host`)
runs its one program on any device. `choose` picks:

    placement "auto"    the in-jit step when the dense step runs on the CPU,
                        the host-tables step on any other platform (GPU, TPU),
                        and whenever a table cannot be called from a program
                        (tables on training PS shards) or the trainer is data
                        parallel (`DataParallel` across processes, `MeshDense`
                        over this process's devices)
    placement "in_jit"  the in-jit step (refused where it cannot run)
    placement "host"    the host-tables step

Overlap (`steps`, the host-tables step as `Trainer.fit` drives it; by
default only when the dense step runs off the CPU: on the CPU the host's
lookups and applies take the cores the step runs on, measured slower than
no overlap in experiments/placement). With
JAX's asynchronous dispatch one host thread keeps the device busy:

    dispatch the dense step k              (rows of batch k sent in one transfer)
    apply step k-1's gradients of the ids batch k does not hold
    decode batch k+1, look up its ids that batch k does not hold
    wait for step k's row gradients        (one transfer back)
    apply step k's gradients of the ids batch k+1 holds,
    then look those up for batch k+1

Every id sees the same operations in the same order as the plain step
(lookup k, apply k, lookup k+1): the ids shared by consecutive batches wait
for exactly their update, the others overlap the device. A table's rows are
initialised from (seed, key), so when a row is created does not change it.
The result equals `Trainer.train_step_host` step for step, bit for bit.

staleness=1 (opt-in) skips that wait: batch k+1 is looked up whole while
step k runs, and step k's whole apply overlaps step k+1. The ids batch k+1
shares with batch k then read their row from before step k's update (one
step stale, as an asynchronous parameter server or TorchRec's pipelined
prefetch without a cache write-back would); `stats["stale_ids"]` counts
those reads. Batches that share no ids train exactly as without it.
"""

from __future__ import annotations

import time

import numpy as np

PLACEMENTS = ("auto", "in_jit", "host")


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    return placement


def dense_platform() -> str:
    """The platform the dense step's program runs on: JAX's default device's."""
    import jax

    default = jax.config.jax_default_device
    if default is not None:
        return default if isinstance(default, str) else default.platform
    return jax.devices()[0].platform


def choose(placement: str, platform: str, in_program_tables: bool = True, data_parallel: bool = False) -> str:
    """"in_jit" or "host" for a requested placement (see the module
    docstring). platform: where the dense step runs ("cpu", "gpu", "cuda",
    "rocm", "tpu"). in_program_tables: every table can be called from an XLA
    program (local `EmbeddingTable`s)."""
    check_placement(placement)
    possible = platform == "cpu" and in_program_tables and not data_parallel
    if placement == "in_jit":
        if not possible:
            why = (f"the dense step runs on {platform!r} and the tables' custom calls exist for the CPU only"
                   if platform != "cpu" else "a table is not local (training PS shards)"
                   if not in_program_tables else "the trainer is data parallel (its step is the host-tables one)")
            raise ValueError(f"placement='in_jit' cannot run here: {why}; use placement='host' or 'auto'")
        return "in_jit"
    if placement == "host":
        return "host"
    return "in_jit" if possible else "host"


def _words(coll, batch, name) -> np.ndarray:
    """The batch's keys of table `name` as uint64 (B, sum of its features' max_len), on the host."""
    parts = [np.asarray(batch.ids[f.name].words, dtype=np.uint32) for f in coll.by_table[name]]
    words = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))
    return words.view(np.uint64).reshape(words.shape[:-1])


def table_keys(coll, batch) -> dict:
    return {name: _words(coll, batch, name) for name in coll.tables if coll.by_table[name]}


class _Clock:
    """Seconds per phase, summed over the steps."""

    PHASES = ("decode", "lookup", "dispatch", "wait", "apply")

    def __init__(self, stats: dict):
        self.stats = stats
        for p in self.PHASES:
            stats.setdefault(p + "_s", 0.0)
        stats.setdefault("steps", 0)
        stats.setdefault("stale_ids", 0)
        stats.setdefault("skipped_rows", 0)
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.stats[phase + "_s"] += now - self.t
        self.t = now


def _apply(tables, keys: dict, grads: dict, stamp: int, stats: dict, mask: dict | None = None) -> None:
    """Applies the gradients of the ids where `mask` (all if None), table by table."""
    for name, g in grads.items():
        k, g = keys[name], g
        if mask is not None:
            k, g = k[mask[name]], g[mask[name]]
        if k.size:
            _, skipped = tables[name].apply_gradients_host(k, np.ascontiguousarray(g, np.float32), step=stamp)
            stats["skipped_rows"] += int(skipped)


def _lookup(tables, keys: dict, rows: dict | None = None, mask: dict | None = None) -> dict:
    """Rows of `keys` (where `mask`, into `rows`; all of them into new arrays otherwise)."""
    if mask is None:  # any table with `lookup_host` (local, or on training PS shards)
        return {name: np.asarray(tables[name].lookup_host(k), np.float32) for name, k in keys.items()}
    if rows is None:
        rows = {name: np.zeros(k.shape + (tables[name].dim,), np.float32) for name, k in keys.items()}
    for name, k in keys.items():
        if mask[name].any():
            rows[name][mask[name]] = tables[name].lookup_host(k[mask[name]])
    return rows


def steps(trainer, source, overlap: bool = True, staleness: int = 0, stats: dict | None = None):
    """Trains on every batch of `source` with the host-tables step, yielding
    (batch, loss) per step (loss a device scalar; step k is yielded once its
    gradients are back, with the apply of part of them still to come). When
    the generator ends or is closed, every gradient has been applied.
    stats: a dict that gets the seconds spent per phase (decode, lookup,
    dispatch, wait, apply), steps, stale_ids and skipped_rows (non-finite
    gradient rows the tables refused)."""
    import jax

    if staleness not in (0, 1):
        raise ValueError(f"staleness must be 0 or 1 (steps a looked-up row may lag), got {staleness!r}")
    stats = {} if stats is None else stats
    clock = _Clock(stats)
    tables = trainer.collection.tables
    mesh = trainer.mesh_dense
    dense = trainer._dense if mesh is None else mesh
    it = iter(source)
    pending = None  # (keys, grads, stamp, mask): a step's gradients still to apply
    try:
        batch = next(it, None)
        clock.lap("decode")
        if batch is None:
            return
        keys = table_keys(trainer.collection, batch)
        rows = _lookup(tables, keys)
        clock.lap("lookup")
        while batch is not None:
            stamp = trainer.step_count
            # one transfer of the step's rows (split over the devices of a mesh)
            on_device = jax.device_put(rows) if mesh is None else mesh.rows(rows)
            trainer.params, trainer.opt_state, loss, g_rows = dense(
                trainer.params, trainer.opt_state, on_device, batch)
            trainer.step_count += 1
            trainer.examples += int(np.sum(batch.weights))
            clock.lap("dispatch")
            if not overlap:
                g_rows = jax.device_get(g_rows)
                clock.lap("wait")
                _apply(tables, keys, g_rows, stamp, stats)
                clock.lap("apply")
                stats["steps"] += 1
                yield batch, loss
                clock.t = time.perf_counter()
                batch = next(it, None)
                clock.lap("decode")
                if batch is not None:
                    keys = table_keys(trainer.collection, batch)
                    rows = _lookup(tables, keys)
                    clock.lap("lookup")
                continue
            if pending is not None:  # the previous step's rest, while this one runs
                _apply(tables, *pending[:2], pending[2], stats, pending[3])
                pending = None
                clock.lap("apply")
            nxt = next(it, None)
            clock.lap("decode")
            later = None
            if nxt is not None:
                nkeys = table_keys(trainer.collection, nxt)
                if staleness:
                    for name, k in nkeys.items():
                        stats["stale_ids"] += int(np.isin(k, keys[name]).sum())
                    nrows = _lookup(tables, nkeys)
                else:
                    # batch k+1's ids that batch k holds are read after step k's apply
                    later = {name: np.isin(k, keys[name]) for name, k in nkeys.items()}
                    nrows = _lookup(tables, nkeys, mask={name: ~m for name, m in later.items()})
                clock.lap("lookup")
            g_rows = jax.device_get(g_rows)  # one transfer back
            clock.lap("wait")
            if nxt is None:
                _apply(tables, keys, g_rows, stamp, stats)
            elif staleness:
                pending = (keys, g_rows, stamp, None)
            else:
                shared = {name: np.isin(k, nkeys[name]) for name, k in keys.items()}
                _apply(tables, keys, g_rows, stamp, stats, shared)
                pending = (keys, g_rows, stamp, {name: ~m for name, m in shared.items()})
            clock.lap("apply")
            if later is not None:
                _lookup(tables, nkeys, nrows, later)
                clock.lap("lookup")
            stats["steps"] += 1
            yield batch, loss
            clock.t = time.perf_counter()
            if nxt is not None:
                batch, keys, rows = nxt, nkeys, nrows
            else:
                batch = None
    finally:
        if pending is not None:
            _apply(tables, *pending[:2], pending[2], stats, pending[3])


class MeshDense:
    """The dense step data parallel over a `jax.sharding.Mesh` of this
    process's devices (one axis): params and optimizer state replicated on
    every device and updated there (they never come back to the host), the
    batch and its rows split along the axis, the dense gradient the mean
    over the whole batch (XLA all-reduces it). The same step as one device
    on the whole batch, up to the order of the sums; the row gradients come
    back split, one slice per device. Several processes stay on
    `distributed.DataParallel` (jax.distributed)."""

    def __init__(self, trainer, mesh):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
            raise ValueError(f"mesh must be a jax.sharding.Mesh with one axis (the batch's), got {mesh!r}")
        local = set(jax.local_devices())
        if not set(mesh.devices.flat) <= local:
            raise ValueError("mesh must hold this process's devices only (several processes: DataParallel)")
        axis = mesh.axis_names[0]
        self.mesh, self.size = mesh, mesh.devices.size
        self.replicated, self.split = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
        self.program = jax.jit(trainer._dense_step,
                               out_shardings=(self.replicated, self.replicated, self.replicated, self.split))

    def place(self, tree):
        """A pytree replicated on the mesh's devices."""
        import jax

        return jax.device_put(tree, self.replicated)

    def rows(self, rows: dict):
        """A step's rows, split along the batch (one transfer per device)."""
        import jax

        return jax.device_put(rows, self.split)

    def __call__(self, params, opt_state, rows, batch):
        import jax

        from monolith_jax.features import SparseBatch

        b = int(np.shape(batch.weights)[0])
        if b % self.size:
            raise ValueError(f"a batch of {b} rows does not split over the mesh's {self.size} devices; use a "
                             f"batch size that is a multiple of {self.size}")
        # The program reads lengths, dense features, labels and weights; the
        # ids stay on the host (their rows are `rows`).
        local = jax.device_put(SparseBatch(ids={}, lengths=batch.lengths, dense=batch.dense, labels=batch.labels,
                                           weights=batch.weights, label_mask=batch.label_mask), self.split)
        if not isinstance(next(iter(rows.values()), None), jax.Array):
            rows = self.rows(rows)
        return self.program(params, opt_state, rows, local)
