"""Sparse parameter sync: the trainer's touched rows -> serving PS, every few seconds.

    pusher = SyncPusher(trainer.tables, "127.0.0.1:50051", trainer_id="t0", interval_s=1.0)
    pusher.start()          # a background thread; training goes on
    ...
    pusher.stop()           # one last push, then the thread ends

Every `interval_s` (a fixed rate: from the start of one push to the start
of the next) the pusher drains each table's touched rows (the
engine's touched marks: rows created or updated since the last drain) and
sends them in messages of at most `max_message_bytes` (below gRPC's
message limit, `rpc.wire.MAX_PAYLOAD_BYTES`, whatever the dim) and at most
`max_rows_per_message` rows, as `dtype` (float32, float16 or bfloat16).
A push that fails keeps its rows: they are merged with the next drain
(newer values win) and sent again, under a new sequence (the server drops
what it staged of the failed one), so no update is lost. Before each push the pusher asks the server's version:
a server that has not applied this trainer's last push (it started late or
restarted) first gets a full copy of every table, then deltas again,
unless it loaded a snapshot of this trainer (below).

Restart by deltas: a server that reports in its version the trainer
snapshot it loaded at start (`SnapshotHeld`, while it has applied no push
since) gets only the rows changed since that snapshot, as a delta push, in
place of a full copy: the rows whose `last_update` is at or above the
snapshot's clock of their table. Every stamp in this project only grows
(training steps, the running maximum of event time) and rows created by a
lookup are stamped with the clock, so no row changed after the snapshot
has a lower stamp; rows stamped with the clock itself before the snapshot
are sent too (a few too many). The rows not sent must be the server's:
the push carries the count and fingerprint (`serving_ps.rows_fingerprint`)
of the pusher's rows stamped below the clock, and the server applies it
only if they are those of the snapshot's rows the push does not replace
(else FAILED_PRECONDITION, nothing applied). The pusher then sends a full
copy at once, as it does when the server holds no snapshot or lacks a
table, from training PS shards, and with `restart_by_deltas=False`: a
snapshot of another model, of another run, or rows evicted since it, all
end in a full copy.

Dense params follow every `dense_interval_s` (given a `dense_source`: a
callable returning (name -> array, negative rate), the rate one number
(None: not known) or, for a model with heads, a dict {head name: rate},
sent as the per-head rates), and with every full
copy, so that a restarted server gets them back at once. A failed dense
push is tried again at the next sparse tick.

Pushes run on their own thread; the training thread only shares the
tables' locks with it for the length of a drain or an export.
"""

from __future__ import annotations

import logging
import threading
import time

import ml_dtypes
import numpy as np

log = logging.getLogger("monolith_jax.serving.sync")

_NP = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


class SyncPusher:
    def __init__(self, tables: dict, address: str, trainer_id: str = "trainer-0", interval_s: float = 2.0,
                 dtype: str = "float32", max_rows_per_message: int = 65_536, timeout_s: float = 10.0,
                 dense_source=None, dense_interval_s: float = 30.0, history: int = 10_000,
                 shard: tuple | None = None, max_message_bytes: int = 16 << 20, security=None,
                 restart_by_deltas: bool = True):
        from monolith_jax.rpc import serving_pb2_grpc as pbg
        from monolith_jax.rpc.wire import MAX_PAYLOAD_BYTES, channel

        if dtype not in _NP:
            raise ValueError(f"dtype must be one of {sorted(_NP)}, got {dtype!r}")
        # Bytes of one message: keys and values; the fields around them fit in the margin.
        self.max_bytes = min(max(int(max_message_bytes), 1), MAX_PAYLOAD_BYTES)
        self.tables = dict(tables)
        for name, t in self.tables.items():
            if self._row_bytes(t.config.dim, dtype) > self.max_bytes:
                raise ValueError(f"table {name!r}: one row of dim {t.config.dim} ({dtype}) is more than "
                                 f"{self.max_bytes} bytes, the most one message carries")
        self.trainer_id = trainer_id
        # A training PS shard (shard, shards) pushes the rows of its keys: its
        # full copy replaces only those on the server.
        self.shard = shard or (0, 0)
        self.restart_by_deltas = restart_by_deltas   # (the module docstring)
        self.interval_s = interval_s
        self.dtype = dtype
        self.max_rows = max(int(max_rows_per_message), 1)
        self.timeout_s = timeout_s
        self._channel = channel(address, security)
        self._stub = pbg.ServingPSStub(self._channel)
        self._pending: dict = {name: {} for name in self.tables}  # name -> {key: row}, unsent rows
        self.sequence = 0          # last push this trainer made
        self.acknowledged = 0      # last push the server applied
        self.stats = {"pushes": 0, "full_copies": 0, "failures": 0, "rows": 0, "bytes": 0, "messages": 0,
                      "dense_pushes": 0, "dense_bytes": 0, "dense_refused": 0,
                      "since_snapshot": 0, "since_snapshot_rows": 0, "since_snapshot_bytes": 0,
                      "since_snapshot_refused": 0}
        self.last_push_s = None    # monotonic time of the last applied push
        # One record per applied sparse push: (wall time, full, rows, bytes, rows in the tables then).
        import collections

        self.history = collections.deque(maxlen=history)
        self.dense_source = dense_source
        self.dense_interval_s = dense_interval_s
        self._dense_due = 0.0      # monotonic time the next dense push is due (0: at the first tick)
        self._stop = threading.Event()
        self._thread = None

    # ------------------------------------------------------------ driving
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monolith-sync", daemon=True)
        self._thread.start()

    def stop(self, final_push: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s * 3)
        if final_push:
            self.push_once()
            if self.dense_source is not None:
                self.push_dense()
        self._channel.close()

    def _run(self) -> None:
        # Ticks at a fixed rate: a push starts interval_s after the last one
        # started, not after it ended, so a row waits at most interval_s (plus
        # the push) for its sync. A push longer than the interval is followed
        # by the next one at once, without a burst to catch up.
        due = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            self.push_once()
            if self.dense_source is not None and time.monotonic() >= self._dense_due:
                self.push_dense()
            due = max(due + self.interval_s, time.monotonic())

    def push_dense(self) -> bool:
        """Pushes the dense params now. True if the server took them."""
        import grpc

        from monolith_jax.rpc import serving_pb2 as pb
        from monolith_jax.rpc.wire import tensors_to_proto

        named, negative_rate = self.dense_source()
        if isinstance(negative_rate, dict):   # by head
            req = pb.DenseParams(trainer=self.trainer_id, tensors=tensors_to_proto(named),
                                 head_negative_rates={str(k): float(v) for k, v in negative_rate.items()})
        else:
            req = pb.DenseParams(trainer=self.trainer_id, tensors=tensors_to_proto(named),
                                 negative_rate=float(negative_rate or 0.0))
        try:
            self._stub.PushDense(req, timeout=self.timeout_s, wait_for_ready=True)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # Refused (e.g. params that do not match the model served): the
                # same params would be refused again at the next tick.
                self._dense_due = time.monotonic() + self.dense_interval_s
                self.stats["dense_refused"] += 1
                log.warning("the serving PS refused the dense params: %s", err.details())
                return False
            self._fail(f"dense push: {err.code().name} {err.details()}")
            return False
        self.stats["dense_pushes"] += 1
        self.stats["dense_bytes"] += req.ByteSize()
        self._dense_due = time.monotonic() + self.dense_interval_s
        return True

    # -------------------------------------------------------------- push
    def push_once(self) -> bool:
        """Drains the touched rows and pushes them (a full copy first when
        the server lacks this trainer's last push). True if applied."""
        import grpc

        from monolith_jax.rpc import serving_pb2 as pb

        if not self.tables:  # dense params only (a trainer whose rows live on training PS shards)
            return True
        try:
            # wait_for_ready: a server that just came back is reached as soon as it listens
            version = self._stub.Version(pb.VersionRequest(), timeout=self.timeout_s, wait_for_ready=True)
            server_has = version.applied.get(self.trainer_id, 0)
        except grpc.RpcError as err:
            self._fail(f"version: {err.code().name}")
            return False
        full = server_has < self.acknowledged or self.acknowledged == 0
        since = self._since_snapshot(version) if full else None
        if since is not None:
            full = False   # the rows changed since the server's snapshot, as a delta
            parts, since = since
        elif full:
            parts = self._full_parts()
        else:
            parts = {}
            for name, t in self.tables.items():
                keys, values = t.drain_touched(self.dtype)
                parts[name] = self._merge(name, keys, values)
        # Each attempt gets its own sequence: a server that staged part of a
        # failed one drops it when this one arrives.
        # A restarted trainer (same id, sequence from 0) goes on after what the
        # server applied: its pushes would otherwise be refused as not newer.
        seq = self.sequence = max(self.sequence, server_has) + 1
        try:
            try:
                n_bytes, n_msgs, rows = self._send(seq, full, parts, since)
            except grpc.RpcError as err:
                if since is None or err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # The server's other rows are not this trainer's: a full copy, now.
                log.info("the serving PS refused the rows since its snapshot (%s); sending a full copy",
                         err.details())
                self.stats["since_snapshot_refused"] += 1
                since, full = None, True
                parts = self._full_parts()
                seq = self.sequence = seq + 1
                n_bytes, n_msgs, rows = self._send(seq, full, parts)
        except grpc.RpcError as err:
            if not full and since is None:  # keep the rows for the next try (a copy is made whole again)
                for name, (keys, values) in parts.items():
                    self._pending[name] = dict(zip(keys.tolist(), values))
            self._fail(f"push {seq}: {err.code().name} {err.details()}")
            return False
        self.acknowledged = seq
        for name in self.tables:
            self._pending[name] = {}
        self.stats["pushes"] += 1
        self.stats["full_copies"] += int(full)
        self.stats["rows"] += rows
        self.stats["bytes"] += n_bytes
        self.stats["messages"] += n_msgs
        if since is not None:
            self.stats["since_snapshot"] += 1
            self.stats["since_snapshot_rows"] += rows
            self.stats["since_snapshot_bytes"] += n_bytes
            log.info("the serving PS holds snapshot %d of this trainer: sent the %d rows changed since it (%d "
                     "bytes), not a full copy", version.snapshot.step, rows, n_bytes)
        self.last_push_s = time.monotonic()
        self.history.append((time.time(), full, rows, n_bytes, sum(len(t) for t in self.tables.values())))
        if full and self.dense_source is not None:
            self._dense_due = 0.0  # a late or restarted server gets the dense params with the copy
        return True

    def _full_parts(self) -> dict:
        # Drain first, then export: the copy holds every update up to the
        # export, and updates after it are marked touched for the next push.
        for name, t in self.tables.items():
            t.drain_touched(self.dtype)
            self._pending[name] = {}
        return {name: t.export(self.dtype) for name, t in self.tables.items()}

    def _since_snapshot(self, version):
        """(name -> (keys, values) of the rows changed since the snapshot the
        server reports holding, the SinceSnapshot the push carries); None
        when a full copy is needed (see the module docstring)."""
        from monolith_jax.rpc import serving_pb2 as pb
        from monolith_jax.serving.serving_ps import rows_fingerprint

        if not self.restart_by_deltas or self.shard[1] or not version.HasField("snapshot"):
            return None
        held = version.snapshot
        if any(name not in held.clock or not hasattr(t, "dump") for name, t in self.tables.items()):
            return None
        # Drain first, then read: updates after the read are marked for the next push.
        for name, t in self.tables.items():
            t.drain_touched(self.dtype)
            self._pending[name] = {}   # the rows drained are in what is read now
        since = pb.SinceSnapshot(step=held.step)
        parts = {}
        for name, t in self.tables.items():
            d = t.dump()
            clock = held.clock[name]
            if clock > int(d["clock"]):   # the server's rows are newer than this trainer's
                log.info("table %r: the serving PS's snapshot %d has clock %d, this table %d; sending a full copy",
                         name, held.step, clock, int(d["clock"]))
                return None
            unchanged = d["last_update"] < clock
            since.unchanged_rows[name] = int(unchanged.sum())
            since.unchanged_fingerprint[name] = rows_fingerprint(d["keys"][unchanged], d["values"][unchanged])
            parts[name] = (d["keys"][~unchanged], d["values"][~unchanged].astype(_NP[self.dtype]))
        return parts, since

    def _merge(self, name: str, keys: np.ndarray, values: np.ndarray):
        pending = self._pending[name]
        if not pending:
            return keys, values
        pending.update(zip(keys.tolist(), values))  # newer values win
        k = np.fromiter(pending.keys(), np.uint64, len(pending))
        v = np.stack(list(pending.values())) if pending else values[:0]
        return k, v

    @staticmethod
    def _row_bytes(dim: int, dtype: str) -> int:
        return 8 + dim * np.dtype(_NP[dtype]).itemsize

    def rows_per_message(self, dim: int) -> int:
        """Rows of a table of `dim` in one message: by bytes, at most max_rows."""
        return max(1, min(self.max_rows, self.max_bytes // self._row_bytes(dim, self.dtype)))

    def _send(self, seq: int, full: bool, parts: dict, since=None) -> tuple[int, int, int]:
        from monolith_jax.rpc import serving_pb2 as pb

        # Message bounds first; each message is built only when it is sent.
        chunks = [(name, s, self.rows_per_message(self.tables[name].config.dim))
                  for name, (keys, _) in parts.items()
                  for s in range(0, max(keys.size, 1), self.rows_per_message(self.tables[name].config.dim))]
        n_bytes = 0
        for i, (name, s, step) in enumerate(chunks):
            keys, values = parts[name]
            rows = pb.TableRows(table=name, dim=self.tables[name].config.dim, dtype=self.dtype,
                                keys=np.ascontiguousarray(keys[s:s + step], np.uint64).tobytes(),
                                values=np.ascontiguousarray(values[s:s + step], _NP[self.dtype]).tobytes())
            req = pb.PushRequest(trainer=self.trainer_id, sequence=seq, full=full, last=i == len(chunks) - 1,
                                 tables=[rows], shard=self.shard[0], shards=self.shard[1],
                                 since_snapshot=since if i == 0 else None)
            n_bytes += req.ByteSize()
            self._stub.Push(req, timeout=self.timeout_s, wait_for_ready=True)
        return n_bytes, len(chunks), sum(k.size for k, _ in parts.values())

    def _fail(self, why: str) -> None:
        self.stats["failures"] += 1
        log.warning("sync to serving PS failed (%s); the rows are kept and sent with the next push", why)
