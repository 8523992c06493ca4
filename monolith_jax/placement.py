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

Overlap (`HostPipeline`: `submit(batch)` per batch, `drain()`; `Trainer.fit`
drives it through `steps`, the online trainer batch by batch as they
arrive; on by default only when the dense step runs off the CPU: on the
CPU the host's lookups and applies take the cores the step runs on,
measured slower than no overlap in experiments/placement). With JAX's
asynchronous dispatch one host thread keeps the device busy:

    dispatch the dense step k              (rows of batch k sent in one transfer)
    apply step k-1's gradients of the ids batch k does not hold
    the caller decodes batch k+1 (a stream: fetches it), submits it:
    look up its ids that batch k does not hold
    wait for step k's row gradients        (one transfer back)
    apply step k's gradients of the ids batch k+1 holds,
    then look those up for batch k+1 and dispatch step k+1

Every id sees the same operations in the same order as the plain step
(lookup k, apply k, lookup k+1): the ids shared by consecutive batches wait
for exactly their update, the others overlap the device. A table's rows are
initialised from (seed, key), so when a row is created does not change it.
The result equals `Trainer.train_step_host` step for step, bit for bit. A
step is reported done (`Done`: the online trainer commits its offsets then)
once all its gradients are applied, at the next `submit` or `drain`.

Transfers: the step's rows go to the device as one buffer and their
gradients come back as one (`pack_rows`, when `trainer.pack_transfers`;
the program splits and packs them), and the program takes over the
buffers of the params, optimizer state and rows (`Trainer(donate=True)`:
its outputs reuse them).

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


def pack_rows(rows: dict):
    """A step's rows {table: (B, L, dim)} as one (B, sum of L * dim) float32
    buffer and its layout ((table, L, dim), ...): one transfer to the device
    instead of one per table."""
    layout = tuple((name, r.shape[1], r.shape[2]) for name, r in rows.items())
    return pack(rows, layout, np), layout


def pack(rows: dict, layout, xp):
    """rows {table: (B, L, dim)} -> (B, total) along `layout` (xp: numpy, or jax.numpy in a program)."""
    parts = [xp.reshape(rows[name], (rows[name].shape[0], length * dim)) for name, length, dim in layout]
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=1)


def unpack(flat, layout) -> dict:
    """(B, total) -> {table: (B, L, dim)} along `layout` (views of a numpy buffer)."""
    out, at = {}, 0
    for name, length, dim in layout:
        out[name] = flat[:, at: at + length * dim].reshape(flat.shape[0], length, dim)
        at += length * dim
    return out


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


def dense_call(trainer, params, opt_state, rows: dict, batch, pack: bool):
    """Dispatches the host-tables step's dense program on the host's `rows`
    (over the trainer's mesh, if it has one): (params, opt_state, loss, row
    gradients on the device). pack: the rows in one transfer and their
    gradients back in one (`pack_rows`); the gradients are then
    (packed, layout), which `HostPipeline` unpacks once fetched."""
    import jax

    mesh, layout = trainer.mesh_dense, None
    if pack and len(rows) > 1:
        rows, layout = pack_rows(rows)
    on_device = jax.device_put(rows) if mesh is None else mesh.rows(rows)  # split over a mesh's devices
    if mesh is not None:
        out = mesh(params, opt_state, on_device, batch, layout)
    elif layout is not None:
        out = trainer._dense_packed(params, opt_state, on_device, batch, layout)
    else:
        out = trainer._dense(params, opt_state, on_device, batch)
    return (*out[:3], out[3] if layout is None else (out[3], layout))


class Done:
    """A step whose update is wholly applied: the batch, its loss (a device
    scalar), its stamp and the caller's tag given to `HostPipeline.submit`."""

    __slots__ = ("batch", "loss", "stamp", "tag")

    def __init__(self, batch, loss, stamp, tag):
        self.batch, self.loss, self.stamp, self.tag = batch, loss, stamp, tag


class HostPipeline:
    """The host-tables step, batch by batch, overlapped with the device when
    `overlap` (see the module docstring). `submit(batch)` starts the batch's
    step and returns the steps now wholly applied (`Done`, in order): with
    overlap, the one before it (its device step ran while the caller
    decoded this batch; its gradients are applied now), without, this one.
    `drain()` finishes every step started and returns the rest; after it,
    nothing is in flight (the tables and dense params hold every step
    submitted). Both `Trainer.fit` and the online trainer drive it; a caller
    that commits a batch's input (Kafka offsets) does so when it is Done.

    Between two `submit`s the caller's own work (decoding the next batch,
    fetching it from a stream) overlaps the device step. `before(batch)`,
    if given to `submit`, runs just before that batch's step is dispatched,
    when every row it reads holds the steps before it (staleness=0): the
    online trainer's prequential scores, equal to those without overlap.

    stats: a dict that gets the seconds spent per phase (decode: the
    caller's time between submits, lookup, dispatch, wait, apply), steps,
    stale_ids and skipped_rows (non-finite gradient rows the tables refused)."""

    def __init__(self, trainer, overlap: bool = True, staleness: int = 0, stats: dict | None = None):
        if staleness not in (0, 1):
            raise ValueError(f"staleness must be 0 or 1 (steps a looked-up row may lag), got {staleness!r}")
        self.trainer, self.overlap, self.staleness = trainer, bool(overlap), staleness
        self.stats = {} if stats is None else stats
        self.clock = _Clock(self.stats)
        self.tables = trainer.collection.tables
        # (batch, keys, device row gradients, stamp, loss, tag): dispatched, gradients not yet back
        self._inflight = None
        # (keys, host gradients, stamp, mask, Done): a step's gradients of the ids in mask, still to apply
        self._pending = None

    @property
    def busy(self) -> bool:
        """A step is in flight or partly applied (`drain` finishes it)."""
        return self._inflight is not None or self._pending is not None

    def _dispatch(self, batch, keys, rows, stamp, tag) -> None:
        trainer = self.trainer
        trainer.params, trainer.opt_state, loss, g_rows = dense_call(
            trainer, trainer.params, trainer.opt_state, rows, batch, trainer.pack_transfers)
        trainer.step_count += 1
        trainer.examples += int(np.sum(batch.weights))
        self._inflight = (batch, keys, g_rows, stamp, loss, tag)
        self.clock.lap("dispatch")

    def _finish_pending(self) -> list:
        if self._pending is None:
            return []
        keys, grads, stamp, mask, done = self._pending
        self._pending = None
        _apply(self.tables, keys, grads, stamp, self.stats, mask)
        self.clock.lap("apply")
        return [done]

    def submit(self, batch, stamp: int | None = None, tag=None, before=None) -> list:
        """Starts `batch`'s step (stamp: its rows' last_update, default the
        step count) and returns the steps now wholly applied (`Done`s)."""
        clock, tables, trainer = self.clock, self.tables, self.trainer
        clock.lap("decode")
        stamp = trainer.step_count if stamp is None else stamp
        keys = table_keys(trainer.collection, batch)
        if not self.overlap or self._inflight is None:
            out = self.drain() if not self.overlap else self._finish_pending()
            self._before(before, batch)
            rows = _lookup(tables, keys)
            clock.lap("lookup")
            self._dispatch(batch, keys, rows, stamp, tag)
            if not self.overlap:
                out += self.drain()
            return out
        pbatch, pkeys, g_rows, pstamp, loss, ptag = self._inflight
        self._inflight = None
        done = Done(pbatch, loss, pstamp, ptag)
        if self.staleness:
            for name, k in keys.items():
                self.stats["stale_ids"] += int(np.isin(k, pkeys[name]).sum())
            self._before(before, batch)
            rows = _lookup(tables, keys)
            clock.lap("lookup")
            g_rows = self._wait(g_rows)
            self._pending = (pkeys, g_rows, pstamp, None, done)
        else:
            # this batch's ids that the step in flight holds are read after its apply
            later = {name: np.isin(k, pkeys[name]) for name, k in keys.items()}
            rows = None
            if before is None:  # the others while the device runs (a lookup may create rows: none before scores)
                rows = _lookup(tables, keys, mask={name: ~m for name, m in later.items()})
                clock.lap("lookup")
            g_rows = self._wait(g_rows)
            shared = {name: np.isin(k, keys[name]) for name, k in pkeys.items()}
            _apply(tables, pkeys, g_rows, pstamp, self.stats, shared)
            self._pending = (pkeys, g_rows, pstamp, {name: ~m for name, m in shared.items()}, done)
            clock.lap("apply")
            if before is None:
                _lookup(tables, keys, rows, later)
            else:  # every row this batch reads now holds the steps before it
                self._before(before, batch)
                rows = _lookup(tables, keys)
            clock.lap("lookup")
        self.stats["steps"] += 1
        self._dispatch(batch, keys, rows, stamp, tag)
        # the rest of the step before, while this one runs
        return self._finish_pending()

    def _wait(self, g_rows):
        import jax

        layout = None
        if isinstance(g_rows, tuple):
            g_rows, layout = g_rows
        g_rows = jax.device_get(g_rows)  # one transfer back (one buffer, if packed)
        if layout is not None:
            g_rows = unpack(g_rows, layout)
        self.clock.lap("wait")
        return g_rows

    def _before(self, before, batch) -> None:
        if before is not None:
            before(batch)
            self.clock.lap("decode")

    def drain(self) -> list:
        """Finishes every step started; returns their `Done`s (in order)."""
        self.clock.lap("decode")
        out = self._finish_pending()
        if self._inflight is not None:
            batch, keys, g_rows, stamp, loss, tag = self._inflight
            self._inflight = None
            g_rows = self._wait(g_rows)
            _apply(self.tables, keys, g_rows, stamp, self.stats)
            self.clock.lap("apply")
            self.stats["steps"] += 1
            out.append(Done(batch, loss, stamp, tag))
        return out


def steps(trainer, source, overlap: bool = True, staleness: int = 0, stats: dict | None = None):
    """Trains on every batch of `source` with the host-tables step
    (`HostPipeline`), yielding (batch, loss) per step once its update is
    applied (loss a device scalar). When the generator ends or is closed,
    every gradient has been applied."""
    pipe = HostPipeline(trainer, overlap, staleness, stats)
    try:
        for batch in source:
            for done in pipe.submit(batch):
                yield done.batch, done.loss
                pipe.clock.t = time.perf_counter()  # the consumer's time is not the host's work
        for done in pipe.drain():
            yield done.batch, done.loss
    finally:
        pipe.drain()


_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


class HostDevicesError(RuntimeError):
    """The process's JAX does not have the host devices asked for."""


def ask_host_devices(n: int) -> None:
    """Asks XLA's CPU client for `n` devices, through XLA_FLAGS (any count
    already there is replaced). It takes effect only if JAX's backends have
    not started yet; `host_mesh` checks. For a program's entry point (the
    `monolith train --host-devices` command); importing monolith_jax sets no
    flag."""
    import os

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_HOST_DEVICES_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_HOST_DEVICES_FLAG}={int(n)}"])


def host_mesh(n: int):
    """A one-axis ("batch") Mesh of this process's first `n` CPU devices,
    for `Trainer(mesh=)`: the dense step data parallel on the CPU. Raises
    HostDevicesError, saying why, where the dense step does not run on the
    CPU or JAX has fewer CPU devices (it started before `ask_host_devices`)."""
    import jax
    from jax.sharding import Mesh

    platform = jax.default_backend()
    if platform != "cpu":
        raise HostDevicesError(f"the dense step runs on {platform}, not on the CPU: host devices would not "
                               f"take it; use one process per {platform} device or a mesh of them")
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise HostDevicesError(f"JAX has {len(devices)} CPU device(s), {n} were asked for: it started before "
                               f"{_HOST_DEVICES_FLAG} could be set (something used JAX first, such as the job's "
                               f"module at import), or XLA_FLAGS set a lower count")
    return Mesh(np.array(devices[:n]), ("batch",))


def _pad_examples(tree, extra: int):
    """`tree` (a SparseBatch, or rows: arrays with the examples on axis 0)
    with `extra` zero examples after the last (weight 0 in a batch)."""
    import jax
    import jax.numpy as jnp

    def pad(a):
        xp = jnp if isinstance(a, jax.Array) else np
        return xp.concatenate([a, xp.zeros((extra, *a.shape[1:]), a.dtype)])

    return jax.tree.map(pad, tree)


class MeshDense:
    """The dense step data parallel over a `jax.sharding.Mesh` of this
    process's devices (one axis): params and optimizer state replicated on
    every device and updated there (they never come back to the host), the
    batch and its rows split along the axis, the dense gradient the mean
    over the whole batch (XLA all-reduces it). The same step as one device
    on the whole batch, up to the order of the sums; the row gradients come
    back split, one slice per device. A batch that does not split evenly is
    padded with examples of weight 0 (the same update). Several processes stay on
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
        shardings = (self.replicated, self.replicated, self.replicated, self.split)
        donated = (0, 1, 2) if trainer.donate else ()
        self.program = jax.jit(trainer._dense_step, out_shardings=shardings, donate_argnums=donated)
        self.packed = jax.jit(trainer._dense_packed_step, static_argnums=(4,), out_shardings=shardings,
                              donate_argnums=donated)

    def place(self, tree):
        """A pytree replicated on the mesh's devices."""
        import jax

        return jax.device_put(tree, self.replicated)

    def rows(self, rows):
        """A step's rows (a dict, or packed), split along the batch (one transfer per device)."""
        import jax

        return jax.device_put(rows, self.split)

    def __call__(self, params, opt_state, rows, batch, layout=None):
        import jax

        from monolith_jax.features import SparseBatch

        # The program reads lengths, dense features, labels and weights; the
        # ids stay on the host (their rows are `rows`).
        local = SparseBatch(ids={}, lengths=batch.lengths, dense=batch.dense, labels=batch.labels,
                            weights=batch.weights, label_mask=batch.label_mask)
        b = int(np.shape(batch.weights)[0])
        extra = -b % self.size
        if extra:
            # A batch that does not split (a file's last one, say) gets `extra`
            # examples of weight 0 and zero rows: the loss is a weighted mean,
            # so the update is the batch's own; their row gradients are cut.
            local, rows = _pad_examples(local, extra), _pad_examples(rows, extra)
        local = jax.device_put(local, self.split)
        if layout is not None:
            out = self.packed(params, opt_state, rows if isinstance(rows, jax.Array) else self.rows(rows), local,
                              layout)
        else:
            if not isinstance(next(iter(rows.values()), None), jax.Array):
                rows = self.rows(rows)
            out = self.program(params, opt_state, rows, local)
        # The padded examples' row gradients, cut on the host (a slice of an
        # array split over devices is no single device's).
        return out if not extra else (*out[:3], jax.tree.map(lambda g: np.asarray(g)[:b], out[3]))
