"""The serving parameter server: serving tables behind gRPC.

    monolith serving-ps --model model/ --port 50051 [--host 127.0.0.1] [--snapshot-dir snaps/]
        [--auth-token-file F] [--tls-cert C --tls-key K [--tls-ca CA]] [--metrics-port P]
        [--max-open-pushes N] [--max-staged-bytes B] [--stale-push-s S]

It holds one table per name (values only: the trainer's optimizer state
stays with the trainer), answers batched lookups, and applies pushes from
trainers (`sync.SyncPusher`) while lookups go on: rows are written under
the engine's per-shard locks, so a reader sees each row before or after an
update, never torn. A push may span several messages and is applied when
its last one arrives; a full push (a late or restarted server's first)
is staged in fresh tables and swapped in whole. `Version` reports the last
push applied per trainer, the rows per table and the dense params'
version. It also keeps the latest dense params a trainer pushed
(`PushDense`), for predictors to fetch when they change (`GetDense`).

Values travel as float32, float16 or bfloat16 bytes and are kept as
float32. Bad requests (unknown table, wrong dim or dtype, byte lengths that
do not match, pushes out of order) get INVALID_ARGUMENT naming the problem.

Bounded by requests, never by luck (each past limit is RESOURCE_EXHAUSTED
naming it, and counted):
- staged pushes (messages of pushes whose last has not come): at most
  `--max-open-pushes` of them and `--max-staged-bytes` in all. A trainer
  pushes one push at a time, so a newer sequence from it drops its older
  unfinished ones; a push with no message for `--stale-push-s` is dropped
  when room is needed (its pusher sends it again, as a new sequence);
- a lookup whose reply would pass the gRPC message limit is refused before
  anything is allocated (the error says how many keys fit);
- dense params must match the model served: its export's names, shapes and
  dtypes with `--model DIR`, else those of the first set accepted; their
  per-head negative rates (a model with heads) must each be in (0, 1] and
  name heads of the export (with `--model`), binary ones for rates < 1.

Binds 127.0.0.1 unless told otherwise; another address needs an auth token
(`monolith_jax.rpc.wire`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import logging
import sys
import threading
import time

import numpy as np

from monolith_jax.rpc import wire
from monolith_jax.rpc.wire import (LimitError, RequestError, array, dtype as _dtype, guard, run_until_signalled,
                                   start_server, tensors_from_proto)
from monolith_jax.sparse import SGD, TableConfig, Zeros
from monolith_jax.sparse.table import EmbeddingTable

log = logging.getLogger("monolith_jax.serving.serving_ps")

MAX_TRAINERS = 4096   # distinct trainer names whose last push is remembered
DROPPED_KEPT = 4096   # unfinished pushes dropped whose later messages are refused


@dataclasses.dataclass
class Limits:
    """What requests may make the serving PS hold (see the module docstring)."""

    max_open_pushes: int = 16
    max_staged_bytes: int = 1 << 30
    stale_push_s: float = 120.0


def rows_from_proto(rows, dims: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """(table, keys uint64 (n,), values float32 (n, dim)) from TableRows, checked."""
    if rows.table not in dims:
        raise RequestError(f"unknown table {rows.table[:wire.MAX_NAME]!r}; this server holds {sorted(dims)}")
    dim = dims[rows.table]
    if rows.dim != dim:
        raise RequestError(f"table {rows.table!r} has dim {dim}, the request says {rows.dim}")
    dtype = _dtype(rows.dtype)
    keys = array(rows.keys, np.dtype(np.uint64), f"keys of table {rows.table!r}")
    if len(rows.values) != keys.size * dim * dtype.itemsize:
        raise RequestError(f"values of table {rows.table!r}: {len(rows.values)} bytes for {keys.size} keys x "
                           f"{dim} {dtype.name} (expected {keys.size * dim * dtype.itemsize})")
    values = np.frombuffer(rows.values, dtype).reshape(keys.size, dim).astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise RequestError(f"values of table {rows.table!r} are not all finite")
    return rows.table, keys, values


_FP_CHUNK = 1 << 18


def rows_fingerprint(keys: np.ndarray, values: np.ndarray) -> int:
    """A 64-bit fingerprint of a set of rows (keys, float32 values),
    independent of their order: the same rows give the same number, and a
    row whose key or any value bit differs (or one more or less) changes it.
    How a pusher checks that the rows it does not send are the server's."""
    keys = np.ascontiguousarray(keys, np.uint64)
    if not keys.size:
        return 0
    bits = np.ascontiguousarray(values, np.float32).reshape(keys.size, -1).view(np.uint32)
    mult = (np.arange(1, bits.shape[1] + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    total = 0
    for s in range(0, keys.size, _FP_CHUNK):  # bounded temporaries
        h = (bits[s:s + _FP_CHUNK].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)
        h ^= keys[s:s + _FP_CHUNK] * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
        total = (total + int(h.sum(dtype=np.uint64))) % (1 << 64)   # sums of arrays wrap silently
    return total


def dense_spec_of(named: dict) -> dict:
    """name -> (shape, dtype name) of a set of dense params."""
    return {n: (tuple(int(d) for d in a.shape), a.dtype.name) for n, a in named.items()}


def check_dense(named: dict, spec: dict, source: str) -> None:
    """Refuses dense params whose names, shapes or dtypes differ from `spec`."""
    lack, extra = sorted(set(spec) - set(named)), sorted(set(named) - set(spec))
    if lack or extra:
        parts = ([f"lack {len(lack)} the model has (e.g. {lack[0]!r})"] if lack else []) + \
                ([f"have {len(extra)} it does not (e.g. {extra[0][:wire.MAX_NAME]!r})"] if extra else [])
        raise RequestError(f"dense params do not match the model served ({source}): they {' and '.join(parts)}")
    for n, a in named.items():
        shape, dt = spec[n]
        if tuple(a.shape) != shape or a.dtype.name != dt:
            raise RequestError(f"dense param {n!r}: {a.dtype.name}{list(a.shape)}, the model served ({source}) "
                               f"has {dt}{list(shape)}")


class SnapshotMismatch(RequestError):
    """A since-snapshot push whose rows not sent are not the snapshot's others."""


class ServingTables:
    """The state behind the service, usable in-process too.

    dense_spec: name -> (shape, dtype) the dense params must have (an
    export's spec, `dense_spec_of_export`); None: the first set accepted
    fixes them. heads: the export's `spec["heads"]` ([] for an export
    without heads); None (no export known): per-head rates are checked
    for their range only."""

    def __init__(self, dims: dict, dense_spec: dict | None = None, limits: Limits | None = None,
                 heads: list | None = None):
        self.dims = dict(dims)
        self.tables = {name: self._new(name) for name in self.dims}
        self.applied: dict = {}    # trainer -> last sequence applied
        self.limits = limits or Limits()
        # (trainer, sequence) -> {"full", "parts": [(table, keys, values)], "shard", "bytes", "touched"}
        self._pending: dict = {}
        self.staged_bytes = 0
        # Pushes dropped unfinished: a later message of one is refused, never
        # applied as if the push were whole (the last DROPPED_KEPT of them).
        self._dropped: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.dense = None          # the last DenseParams pushed, version set by this server
        self.dense_spec = dict(dense_spec) if dense_spec is not None else None
        self.dense_source = "its export's spec.json" if dense_spec is not None else None
        self.heads = None if heads is None else list(heads)
        self.refusals: dict = {}   # reason -> count (requests refused, staged pushes dropped)
        self._count_lock = threading.Lock()
        self.started_s = time.monotonic()
        self.last_push_s = None    # monotonic time of the last push applied
        # (step, {table: (clock, rows, fingerprint of them all)}) of the
        # trainer snapshot loaded at start (None: none, or shards').
        self.snapshot = None

    def _new(self, name: str) -> EmbeddingTable:
        # Values only: SGD keeps no optimizer slots, and a serving table is never applied to.
        return EmbeddingTable(TableConfig(name, self.dims[name], Zeros(), SGD()))

    def count(self, reason: str, n: int = 1) -> None:
        """Counts a refusal or a drop."""
        with self._count_lock:
            self.refusals[reason] = self.refusals.get(reason, 0) + n

    def _drop(self, key, reason: str) -> None:
        entry = self._pending.pop(key)
        self.staged_bytes -= entry["bytes"]
        self._dropped[key] = reason
        while len(self._dropped) > DROPPED_KEPT:
            self._dropped.popitem(last=False)
        self.count(reason)
        log.warning("dropped unfinished push %d of %r (%d bytes staged): %s", key[1], key[0], entry["bytes"],
                    reason.replace("_", " "))

    def _expire(self, now: float) -> None:
        """Drops staged pushes with no message for the age limit, oldest first."""
        stale = sorted((e["touched"], k) for k, e in self._pending.items()
                       if now - e["touched"] > self.limits.stale_push_s)
        for _, key in stale:
            self._drop(key, "stale_push_dropped")

    def _check_room(self, n_open: int, n_bytes: int) -> None:
        lim = self.limits
        if len(self._pending) + n_open > lim.max_open_pushes:
            self.count("limit_open_pushes")
            raise LimitError(f"{len(self._pending)} unfinished pushes are staged, the limit (--max-open-pushes) is "
                             f"{lim.max_open_pushes}; one with no message for {lim.stale_push_s:g} s "
                             f"(--stale-push-s) is dropped")
        if self.staged_bytes + n_bytes > lim.max_staged_bytes:
            self.count("limit_staged_bytes")
            raise LimitError(f"this message would stage {self.staged_bytes + n_bytes} bytes of unfinished pushes, "
                             f"over the limit (--max-staged-bytes) of {lim.max_staged_bytes}")

    def _admit(self, req, trainer: str, n_bytes: int):
        """Under self._lock: the checks a push message passes before it is
        staged (order, limits); drops what can be dropped. (last applied,
        key, staged entry or None)."""
        last = self.applied.get(trainer, 0)
        if req.sequence <= last and not req.full:
            raise RequestError(f"push {req.sequence} from {trainer!r} is not newer than {last}")
        if trainer not in self.applied and len(self.applied) >= MAX_TRAINERS:
            self.count("limit_trainers")
            raise LimitError(f"this server remembers {MAX_TRAINERS} trainers' pushes, the most it takes")
        # A trainer makes one push at a time: its older unfinished ones never end.
        for old in [k for k in self._pending if k[0] == trainer and k[1] < req.sequence]:
            self._drop(old, "abandoned_push_dropped")
        self._expire(time.monotonic())
        key = (trainer, req.sequence)
        if key in self._dropped:
            self.count("message_of_dropped_push")
            raise RequestError(f"push {req.sequence} of {trainer!r} was dropped unfinished "
                               f"({self._dropped[key].replace('_', ' ')}): send it again as a new push")
        entry = self._pending.get(key)
        try:
            self._check_room(0 if entry is not None else 1, n_bytes)
        except LimitError:
            if entry is not None:  # this push can never complete now: free what it staged
                self._drop(key, "push_over_limit_dropped")
            raise
        return last, key, entry

    def push(self, req) -> tuple[int, int]:
        trainer = wire.name(req.trainer, "the push's trainer name")
        if req.shards and req.shard >= req.shards:
            raise RequestError(f"push from shard {req.shard} of {req.shards}")
        # What the message will stage (float32), known before anything is converted:
        # a message past the limits is refused before it costs memory.
        n_bytes = sum(len(r.keys) + len(r.keys) // 8 * self.dims.get(r.table, 0) * 4 for r in req.tables)
        with self._lock:
            self._admit(req, trainer, n_bytes)
        parts = [rows_from_proto(r, self.dims) for r in req.tables]
        n_bytes = sum(k.nbytes + v.nbytes for _, k, v in parts)
        with self._lock:
            last, key, entry = self._admit(req, trainer, n_bytes)   # again: others pushed meanwhile
            now = time.monotonic()
            if entry is None:
                entry = self._pending[key] = {"full": req.full, "parts": [], "shard": (req.shard, req.shards),
                                              "bytes": 0, "touched": now,
                                              "since": req.since_snapshot if req.HasField("since_snapshot") else None}
            entry["parts"].extend(parts)
            entry["bytes"] += n_bytes
            entry["touched"] = now
            self.staged_bytes += n_bytes
            if not req.last:
                return last, sum(k.size for _, k, _ in parts)
            del self._pending[key]
            self.staged_bytes -= entry["bytes"]
        n = self._apply(entry)
        with self._lock:
            self.applied[trainer] = max(self.applied.get(trainer, 0), req.sequence)
            self.last_push_s = time.monotonic()
            return self.applied[trainer], n

    def staged(self) -> tuple[int, int]:
        """(unfinished pushes staged, their bytes)."""
        with self._lock:
            return len(self._pending), self.staged_bytes

    def _apply(self, entry) -> int:
        # One push applied at a time: a full copy from one training PS shard
        # must not drop the rows another source writes meanwhile.
        with self._write_lock:
            return self._apply_one(entry)

    def _check_since(self, since, parts) -> None:
        """Refuses (SnapshotMismatch) a since-snapshot push unless the rows
        it does not carry are the snapshot's others: the snapshot's count
        and fingerprint less those of its rows the push replaces are the
        pusher's unchanged rows'. Under the write lock, before anything is
        applied."""
        with self._lock:
            held = self.snapshot if not self.applied else None
        if held is None or held[0] != since.step:
            raise SnapshotMismatch(f"a push of the rows changed since snapshot {since.step}, but this server holds "
                                   f"{'no snapshot' if held is None else f'snapshot {held[0]}'} unchanged")
        sent: dict = {}
        for table, keys, _ in parts:
            sent.setdefault(table, []).append(keys)
        for table, (_, rows, fp) in held[1].items():
            keys = np.unique(np.concatenate(sent.get(table, [np.zeros(0, np.uint64)])))
            old, found = self.tables[table].find(keys)
            rest_rows = rows - int(found.sum())
            rest_fp = (fp - rows_fingerprint(keys[found], old[found])) % (1 << 64)
            if rest_rows != since.unchanged_rows.get(table, -1) or \
                    rest_fp != since.unchanged_fingerprint.get(table, rest_fp ^ 1):
                raise SnapshotMismatch(f"table {table!r}: the rows not sent are not snapshot {since.step}'s "
                                       f"({since.unchanged_rows.get(table, 0)} sent as unchanged, {rest_rows} "
                                       f"here, or their values differ): send a full copy")

    def _apply_one(self, entry) -> int:
        n = 0
        if entry.get("since") is not None:
            self._check_since(entry["since"], entry["parts"])
        if entry["full"]:
            names = {t for t, _, _ in entry["parts"]}
            fresh = {name: self._new(name) for name in names}
            shard, shards = entry["shard"]
            if shards:  # a shard's copy: keep the rows of every other shard's keys
                from monolith_jax.distributed.training_ps import shard_of

                for name in names:
                    keys, values = self.tables[name].export("float32")
                    other = shard_of(keys, shards) != shard
                    fresh[name].assign(keys[other], values[other])
            for table, keys, values in entry["parts"]:
                n += keys.size
                fresh[table].assign(keys, values)
            with self._lock:  # lookups in flight keep their reference to the old table
                self.tables.update(fresh)
            return n
        for table, keys, values in entry["parts"]:
            self.tables[table].assign(keys, values)
            n += keys.size
        return n

    def load_snapshot(self, directory: str) -> int | None:
        """Fills the tables from the newest good trainer snapshot in
        `directory` (values only), so that a restarted server answers with
        recent rows before the trainer's full copy arrives. Returns the
        snapshot's step, or None if there is none. A folder of training PS
        shard snapshots (`ps-<i>-of-<n>/`) loads every shard's newest."""
        import os
        import re

        from monolith_jax.snapshot import Snapshots

        shards = sorted(d for d in (os.listdir(directory) if os.path.isdir(directory) else [])
                        if re.fullmatch(r"ps-\d+-of-\d+", d))
        if shards:
            steps = [self.load_snapshot(os.path.join(directory, d)) for d in shards]
            self.snapshot = None   # shards' snapshots of different steps: their pushers send full copies
            return max((s for s in steps if s is not None), default=None)
        snaps = Snapshots(directory, every_s=None, read_only=True)  # a reader: the trainer writes there
        try:
            found = snaps.load(tables_only=True)
        finally:
            snaps.close()
        if found is None:
            return None
        step, _, tables, meta = found
        clocks = {}
        for i, name in enumerate(meta["names"]["tables"]):
            if name in self.dims:
                dump = tables[f"t{i}"]
                if dump["values"].shape[1] != self.dims[name]:
                    raise ValueError(f"snapshot table {name!r} has dim {dump['values'].shape[1]}, "
                                     f"this server {self.dims[name]}")
                self.tables[name].assign(dump["keys"], dump["values"])
                clocks[name] = (int(dump["clock"]), int(dump["keys"].size),
                                rows_fingerprint(dump["keys"], dump["values"]))
        self.snapshot = (int(step), clocks)
        return step

    def snapshot_held(self):
        """(step, {table: (clock, rows, fingerprint)}) of the snapshot
        loaded at start while no push has been applied since (a pusher of
        that snapshot's trainer then sends only the rows changed after it),
        else None."""
        with self._lock:
            return self.snapshot if not self.applied else None

    def lookup(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.tables.get(table)
        if t is None:
            raise RequestError(f"unknown table {table[:wire.MAX_NAME]!r}; this server holds {sorted(self.dims)}")
        return t.find(keys)

    def lookup_request(self, req) -> tuple[bytes, bytes, int, str]:
        """A LookupRequest -> (values bytes, found bytes, dim, dtype name),
        the reply sized before anything is allocated for it."""
        dtype = _dtype(req.dtype)
        if req.table not in self.dims:
            raise RequestError(f"unknown table {req.table[:wire.MAX_NAME]!r}; this server holds {sorted(self.dims)}")
        dim = self.dims[req.table]
        keys = array(req.keys, np.dtype(np.uint64), "keys")
        per_key = dim * dtype.itemsize + 1
        try:
            wire.check_reply_bytes(keys.size * per_key, f"a lookup of {keys.size} keys of table {req.table!r} "
                                   f"(dim {dim}, {dtype.name})", per_key, "keys")
        except LimitError:
            self.count("lookup_reply_too_large")
            raise
        values, found = self.lookup(req.table, keys)
        values = values if dtype == np.float32 else values.astype(dtype)
        return values.tobytes(), found.astype(np.uint8).tobytes(), dim, dtype.name

    def version(self, expire: bool = False) -> tuple[dict, dict, int]:
        with self._lock:
            if expire:   # pushers ask every tick: stale staged pushes go even when no push comes
                self._expire(time.monotonic())
            return (dict(self.applied), {name: len(t) for name, t in self.tables.items()},
                    self.dense.version if self.dense is not None else 0)

    def sync_lag_s(self) -> float:
        """Seconds since the last push applied (since the start before the first)."""
        return time.monotonic() - (self.last_push_s if self.last_push_s is not None else self.started_s)

    def push_dense(self, req) -> int:
        """Keeps a trainer's dense params (checked against the model served,
        stored as sent) under a new version: nanoseconds of the wall clock,
        so that versions keep increasing across restarts of this server."""
        wire.name(req.trainer, "the dense push's trainer name")
        if not req.tensors:
            raise RequestError("dense push without tensors")
        if not 0.0 <= req.negative_rate <= 1.0:
            raise RequestError(f"negative_rate must be in [0, 1], got {req.negative_rate}")
        try:
            self._check_head_rates(dict(req.head_negative_rates))
        except RequestError:
            self.count("dense_bad_rates")
            raise
        named = tensors_from_proto(req.tensors)
        with self._lock:
            if self.dense_spec is not None:
                try:
                    check_dense(named, self.dense_spec, self.dense_source)
                except RequestError:
                    self.count("dense_mismatch")
                    raise
            else:  # the first set accepted fixes what the model's params are
                self.dense_spec = dense_spec_of(named)
                self.dense_source = f"the first dense params accepted, from {req.trainer!r}"
            last = self.dense.version if self.dense is not None else 0
            stored = type(req)()
            stored.CopyFrom(req)
            stored.version = max(last + 1, time.time_ns())
            self.dense = stored
            return stored.version

    def _check_head_rates(self, rates: dict) -> None:
        """A dense push's per-head negative rates: each in (0, 1], and heads
        of the export served (binary ones for a rate < 1) when it is known."""
        from monolith_jax.serving.export import check_rate, spec_head_rates

        if not rates:
            return
        for name in rates:
            wire.name(name, "a head's name in head_negative_rates")
        try:
            if self.heads is None:
                for name, rate in rates.items():
                    check_rate(rate, f"head_negative_rates[{name!r}]")
            elif not self.heads:
                raise ValueError(f"head_negative_rates {sorted(rates)} are by head, but the model served has no "
                                 f"heads (one binary label): send negative_rate")
            else:
                spec_head_rates(self.heads, rates, "head_negative_rates")
        except ValueError as err:
            raise RequestError(str(err)) from None

    def get_dense(self, have: int):
        """The dense params, or only their version when `have` is it."""
        from monolith_jax.rpc import serving_pb2 as pb

        with self._lock:
            dense = self.dense
        if dense is None:
            return pb.DenseParams()
        if dense.version == have:
            return pb.DenseParams(version=have, trainer=dense.trainer, negative_rate=dense.negative_rate,
                                  head_negative_rates=dense.head_negative_rates)
        return dense


def make_servicer(state: ServingTables):
    import grpc

    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.rpc import serving_pb2_grpc as pbg

    class Servicer(pbg.ServingPSServicer):
        @guard
        def Push(self, request, context):
            try:
                applied, rows = state.push(request)
            except SnapshotMismatch as err:   # the pusher sends a full copy instead
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            return pb.PushReply(applied_sequence=applied, rows=rows)

        @guard
        def Lookup(self, request, context):
            values, found, dim, dtype = state.lookup_request(request)
            return pb.LookupReply(values=values, found=found, dim=dim, dtype=dtype)

        @guard
        def Version(self, request, context):
            applied, rows, dense = state.version(expire=True)
            reply = pb.VersionReply(applied=applied, rows=rows, dense_version=dense)
            held = state.snapshot_held()
            if held is not None:
                reply.snapshot.step = held[0]
                for name, (clock, _, _) in held[1].items():
                    reply.snapshot.clock[name] = clock
            return reply

        @guard
        def PushDense(self, request, context):
            return pb.DenseReply(version=state.push_dense(request))

        @guard
        def GetDense(self, request, context):
            return state.get_dense(request.have)

    return Servicer()


def add_metrics(m, state: ServingTables) -> None:
    """The serving PS's live values (beside the requests by method and status)."""
    from monolith_jax.rpc.metrics import refusals

    m.gauge("monolith_table_rows", "rows held, by table", lambda: state.version()[1], "table")
    m.gauge("monolith_sync_lag_seconds", "seconds since the last push applied (since the start before the first)",
            state.sync_lag_s)
    m.gauge("monolith_staged_pushes", "unfinished pushes staged", lambda: state.staged()[0])
    m.gauge("monolith_staged_bytes", "bytes of unfinished pushes staged", lambda: state.staged()[1])
    m.gauge("monolith_dense_version", "version of the dense params held (0: none)", lambda: state.version()[2])
    m.counter("monolith_refusals", "requests refused and staged pushes dropped, by reason",
              refusals(state.refusals, state._count_lock), "reason")


def serve(dims: dict, port: int = 0, host: str = "127.0.0.1", workers: int = 8, snapshot_dir: str | None = None,
          *, security=None, metrics_port: int | None = None, limits: Limits | None = None,
          dense_spec: dict | None = None, heads: list | None = None):
    """Starts the service (its tables first filled from the newest trainer
    snapshot in `snapshot_dir`, if given); returns (grpc server, bound port,
    state). `state.metrics` holds its metrics (served over HTTP on
    127.0.0.1 with `metrics_port`)."""
    from monolith_jax.rpc import serving_pb2_grpc as pbg
    from monolith_jax.rpc.metrics import start as start_metrics

    state = ServingTables(dims, dense_spec=dense_spec, limits=limits, heads=heads)
    if snapshot_dir:
        step = state.load_snapshot(snapshot_dir)
        log.info("serving tables from snapshot %s in %s", step, snapshot_dir)
    state.metrics = start_metrics(metrics_port, lambda m: add_metrics(m, state))
    try:
        server, bound = start_server(lambda s: pbg.add_ServingPSServicer_to_server(make_servicer(state), s),
                                     host, port, workers, security=security, metrics=state.metrics)
    except BaseException:
        state.metrics.close()
        raise
    return server, bound, state


def parse_tables(specs) -> dict:
    dims = {}
    for spec in specs:
        name, _, dim = spec.partition(":")
        if not name or not dim.isdigit() or int(dim) < 1:
            raise SystemExit(f"--table takes NAME:DIM, got {spec!r}")
        dims[name] = int(dim)
    return dims


def _export_spec(directory: str) -> dict:
    path = os.path.join(directory, "spec.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise SystemExit(f"--model {directory}: not an exported model ({path}: {err})") from None


def tables_of_export(directory: str) -> dict:
    """name -> dim of the tables an exported model reads (its spec.json)."""
    try:
        return {name: int(meta["dim"]) for name, meta in _export_spec(directory)["tables"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise SystemExit(f"--model {directory}: not an exported model (spec.json: {err!r})") from None


def dense_spec_of_export(directory: str) -> dict:
    """name -> (shape, dtype) of an exported model's dense params (its spec.json)."""
    try:
        return {p["name"]: (tuple(int(d) for d in p["shape"]), str(p["dtype"]))
                for p in _export_spec(directory)["params"]}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise SystemExit(f"--model {directory}: not an exported model (spec.json params: {err!r})") from None


def heads_of_export(directory: str) -> list:
    """An exported model's heads (its spec.json; [] for one without heads;
    the one binary head of a job of one head, `spec["head"]`, as a head)."""
    spec = _export_spec(directory)
    heads = spec.get("heads") or ([{"name": spec["head"], "kind": "binary",
                                    "negative_rate": spec.get("negative_rate") or 1.0}] if spec.get("head") else [])
    try:
        return [{"name": str(h["name"]), "kind": str(h["kind"]),
                 **({"negative_rate": float(h["negative_rate"])} if h["kind"] == "binary" else {})} for h in heads]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise SystemExit(f"--model {directory}: not an exported model (spec.json heads: {err!r})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="monolith serving-ps", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (loopback unless told otherwise; another address needs a token)")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    tables = p.add_mutually_exclusive_group(required=True)
    tables.add_argument("--model", default=None,
                        help="an exported model's folder: its spec names the tables and their dims, and the "
                             "dense params' names, shapes and dtypes")
    tables.add_argument("--table", action="append", default=None, help="NAME:DIM, once per table (instead of --model)")
    p.add_argument("--snapshot-dir", default=None, help="start from the newest trainer snapshot here")
    d = Limits()
    p.add_argument("--max-open-pushes", type=int, default=d.max_open_pushes,
                   help="unfinished pushes staged at once (more: RESOURCE_EXHAUSTED)")
    p.add_argument("--max-staged-bytes", type=wire.parse_bytes, default=d.max_staged_bytes,
                   help="bytes of unfinished pushes staged at once (K, M, G suffixes)")
    p.add_argument("--stale-push-s", type=float, default=d.stale_push_s,
                   help="an unfinished push with no message for this long is dropped")
    wire.add_server_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's progress lines
    security = wire.security_from_args(args)
    dims = tables_of_export(args.model) if args.model else parse_tables(args.table)
    dense_spec = dense_spec_of_export(args.model) if args.model else None
    heads = heads_of_export(args.model) if args.model else None
    limits = Limits(args.max_open_pushes, args.max_staged_bytes, args.stale_push_s)
    try:
        server, port, state = serve(dims, args.port, args.host, snapshot_dir=args.snapshot_dir, security=security,
                                    metrics_port=args.metrics_port, limits=limits, dense_spec=dense_spec,
                                    heads=heads)
    except (ValueError, OSError) as err:
        raise SystemExit(f"monolith serving-ps: {err}") from None
    if state.metrics.port is not None:
        print(f"serving PS metrics on http://127.0.0.1:{state.metrics.port}/metrics", flush=True)
    print(f"serving PS listening on {args.host}:{port}", flush=True)
    run_until_signalled(server)
    state.metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
