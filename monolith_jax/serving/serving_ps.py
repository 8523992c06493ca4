"""The serving parameter server: serving tables behind gRPC.

    monolith serving-ps --model model/ --port 50051 [--host 127.0.0.1] [--snapshot-dir snaps/]

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
Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import logging
import sys
import threading

import numpy as np

from monolith_jax.rpc.wire import run_until_signalled, RequestError, array, dtype as _dtype, start_server, tensors_from_proto
from monolith_jax.sparse import SGD, TableConfig, Zeros
from monolith_jax.sparse.table import EmbeddingTable

log = logging.getLogger("monolith_jax.serving.serving_ps")

def rows_from_proto(rows, dims: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """(table, keys uint64 (n,), values float32 (n, dim)) from TableRows, checked."""
    if rows.table not in dims:
        raise RequestError(f"unknown table {rows.table!r}; this server holds {sorted(dims)}")
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


class ServingTables:
    """The state behind the service, usable in-process too."""

    def __init__(self, dims: dict):
        self.dims = dict(dims)
        self.tables = {name: self._new(name) for name in self.dims}
        self.applied: dict = {}    # trainer -> last sequence applied
        self._pending: dict = {}   # (trainer, sequence) -> {"full": bool, "parts": [(table, keys, values)]}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.dense = None          # the last DenseParams pushed, version set by this server

    def _new(self, name: str) -> EmbeddingTable:
        # Values only: SGD keeps no optimizer slots, and a serving table is never applied to.
        return EmbeddingTable(TableConfig(name, self.dims[name], Zeros(), SGD()))

    def push(self, req) -> tuple[int, int]:
        parts = [rows_from_proto(r, self.dims) for r in req.tables]
        if not req.trainer:
            raise RequestError("push without a trainer name")
        with self._lock:
            last = self.applied.get(req.trainer, 0)
            if req.sequence <= last and not req.full:
                raise RequestError(f"push {req.sequence} from {req.trainer!r} is not newer than {last}")
            key = (req.trainer, req.sequence)
            if req.shards and req.shard >= req.shards:
                raise RequestError(f"push from shard {req.shard} of {req.shards}")
            entry = self._pending.setdefault(key, {"full": req.full, "parts": [], "shard": (req.shard, req.shards)})
            entry["parts"].extend(parts)
            if not req.last:
                return last, sum(k.size for _, k, _ in parts)
            del self._pending[key]
            for stale in [k for k in self._pending if k[0] == req.trainer and k[1] < req.sequence]:
                del self._pending[stale]   # abandoned partial pushes
        n = self._apply(entry)
        with self._lock:
            self.applied[req.trainer] = max(self.applied.get(req.trainer, 0), req.sequence)
            return self.applied[req.trainer], n

    def _apply(self, entry) -> int:
        # One push applied at a time: a full copy from one training PS shard
        # must not drop the rows another source writes meanwhile.
        with self._write_lock:
            return self._apply_one(entry)

    def _apply_one(self, entry) -> int:
        n = 0
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
            return max((s for s in steps if s is not None), default=None)
        snaps = Snapshots(directory, every_s=None, read_only=True)  # a reader: the trainer writes there
        try:
            found = snaps.load(tables_only=True)
        finally:
            snaps.close()
        if found is None:
            return None
        step, _, tables, meta = found
        for i, name in enumerate(meta["names"]["tables"]):
            if name in self.dims:
                dump = tables[f"t{i}"]
                if dump["values"].shape[1] != self.dims[name]:
                    raise ValueError(f"snapshot table {name!r} has dim {dump['values'].shape[1]}, "
                                     f"this server {self.dims[name]}")
                self.tables[name].assign(dump["keys"], dump["values"])
        return step

    def lookup(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.tables.get(table)
        if t is None:
            raise RequestError(f"unknown table {table!r}; this server holds {sorted(self.dims)}")
        return t.find(keys)

    def version(self) -> tuple[dict, dict, int]:
        with self._lock:
            return (dict(self.applied), {name: len(t) for name, t in self.tables.items()},
                    self.dense.version if self.dense is not None else 0)

    def push_dense(self, req) -> int:
        """Keeps a trainer's dense params (checked, stored as sent) under a
        new version: nanoseconds of the wall clock, so that versions keep
        increasing across restarts of this server."""
        import time

        if not req.trainer:
            raise RequestError("dense push without a trainer name")
        if not req.tensors:
            raise RequestError("dense push without tensors")
        if not 0.0 <= req.negative_rate <= 1.0:
            raise RequestError(f"negative_rate must be in [0, 1], got {req.negative_rate}")
        tensors_from_proto(req.tensors)
        with self._lock:
            last = self.dense.version if self.dense is not None else 0
            stored = type(req)()
            stored.CopyFrom(req)
            stored.version = max(last + 1, time.time_ns())
            self.dense = stored
            return stored.version

    def get_dense(self, have: int):
        """The dense params, or only their version when `have` is it."""
        from monolith_jax.rpc import serving_pb2 as pb

        with self._lock:
            dense = self.dense
        if dense is None:
            return pb.DenseParams()
        if dense.version == have:
            return pb.DenseParams(version=have, trainer=dense.trainer, negative_rate=dense.negative_rate)
        return dense


def make_servicer(state: ServingTables):
    import grpc

    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.rpc import serving_pb2_grpc as pbg

    class Servicer(pbg.ServingPSServicer):
        def Push(self, request, context):
            try:
                applied, rows = state.push(request)
            except RequestError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            return pb.PushReply(applied_sequence=applied, rows=rows)

        def Lookup(self, request, context):
            try:
                dtype = _dtype(request.dtype)
                values, found = state.lookup(request.table, array(request.keys, np.dtype(np.uint64), "keys"))
            except RequestError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            return pb.LookupReply(values=values.astype(dtype).tobytes(), found=found.astype(np.uint8).tobytes(),
                                  dim=state.dims[request.table], dtype=dtype.name)

        def Version(self, request, context):
            applied, rows, dense = state.version()
            return pb.VersionReply(applied=applied, rows=rows, dense_version=dense)

        def PushDense(self, request, context):
            try:
                version = state.push_dense(request)
            except RequestError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            return pb.DenseReply(version=version)

        def GetDense(self, request, context):
            return state.get_dense(request.have)

    return Servicer()


def serve(dims: dict, port: int = 0, host: str = "127.0.0.1", workers: int = 8, snapshot_dir: str | None = None):
    """Starts the service (its tables first filled from the newest trainer
    snapshot in `snapshot_dir`, if given); returns (grpc server, bound port, state)."""
    from monolith_jax.rpc import serving_pb2_grpc as pbg

    state = ServingTables(dims)
    if snapshot_dir:
        step = state.load_snapshot(snapshot_dir)
        log.info("serving tables from snapshot %s in %s", step, snapshot_dir)
    server, bound = start_server(lambda s: pbg.add_ServingPSServicer_to_server(make_servicer(state), s),
                                 host, port, workers)
    return server, bound, state


def parse_tables(specs) -> dict:
    dims = {}
    for spec in specs:
        name, _, dim = spec.partition(":")
        if not name or not dim.isdigit() or int(dim) < 1:
            raise SystemExit(f"--table takes NAME:DIM, got {spec!r}")
        dims[name] = int(dim)
    return dims


def tables_of_export(directory: str) -> dict:
    """name -> dim of the tables an exported model reads (its spec.json)."""
    path = os.path.join(directory, "spec.json")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        return {name: int(meta["dim"]) for name, meta in spec["tables"].items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--model {directory}: not an exported model ({path}: {err})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="monolith serving-ps", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    tables = p.add_mutually_exclusive_group(required=True)
    tables.add_argument("--model", default=None,
                        help="an exported model's folder: its spec names the tables and their dims")
    tables.add_argument("--table", action="append", default=None, help="NAME:DIM, once per table (instead of --model)")
    p.add_argument("--snapshot-dir", default=None, help="start from the newest trainer snapshot here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's progress lines
    dims = tables_of_export(args.model) if args.model else parse_tables(args.table)
    server, port, _ = serve(dims, args.port, args.host, snapshot_dir=args.snapshot_dir)
    print(f"serving PS listening on {args.host}:{port}", flush=True)
    run_until_signalled(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
