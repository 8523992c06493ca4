"""The training parameter server: one shard of every table, behind gRPC.

    monolith training-ps --job MODULE:NAME --shard 0 --shards 2 [--port P]      (or --tables tables.json)
        [--snapshot-dir DIR] [--serving-ps HOST:PORT --sync-interval S]
        [--auth-token-file F] [--tls-cert C --tls-key K [--tls-ca CA]] [--metrics-port P]
        [--max-open-rounds N] [--max-round-bytes B] [--stale-round-s S]

    table = ShardedTable(config, ["127.0.0.1:P0", "127.0.0.1:P1"])   # the API of a local table
    trainer.collection.tables["ids"] = table                         # then trainer.train_step_host(batch)

Keys map to shards by `shard_of(key, shards)`: splitmix64's finalizer of
the 64-bit key, modulo the number of shards. It depends on the key alone,
so a restarted shard owns the same keys. Each shard holds an ordinary
`EmbeddingTable` (the same C++ engine, its fused optimizer, filter and
expiry) for the keys it owns, and refuses keys it does not own
(INVALID_ARGUMENT), so a misrouted client cannot create stray rows.

`ShardedTable` (`sharded_table.py`) splits a batch's unique ids by shard,
calls the shards in parallel and reassembles the rows; gradients of
repeated ids are summed before they travel (one fused step per id, as the
local engine does). A training step is one request per shard
(TrainingPSData/Step, `ps_data.py`): the previous step's gradients and
this step's ids, applied then looked up. A shard that does not answer is
waited for: the call logs a line and retries until it is back, so
training never goes on with missing rows.

Each shard snapshots its own rows (`--snapshot-dir DIR` -> `DIR/ps-<i>-of-<n>/`,
the same Orbax format as a trainer's tables) when the chief trainer asks
(`Snapshot`, between two steps of the group), and a restarted shard starts
from its newest good snapshot. With `--serving-ps` the shard pushes its
touched rows to the serving PS itself (`sync.SyncPusher`); its full copy
replaces only its own keys' rows there. A shard also holds the master
copy of the dense params for trainers that train asynchronously
(`ExchangeDense`, `dense_ps.AsyncDense`).

A synchronous round's contribution is checked whole (table, keys of this
shard, gradient bytes, finite values, step in [0, 2^31), the round's
contributor count) before the round is touched, so a refused one never
costs another trainer its update. Open rounds are bounded: at most
`--max-open-rounds` and `--max-round-bytes` of staged gradients. A round
that can no longer complete (the same session has moved on to a later
round, or it has had no contribution for `--stale-round-s`) is applied
with what arrived, as rounds of an earlier session are; when room is
needed, rounds of other sessions go first, the oldest first; past that, a
contribution is RESOURCE_EXHAUSTED naming the limit. Each of these is
counted (`monolith_refusals_total` with `--metrics-port`). A lookup whose
reply would pass the gRPC message limit is refused before it is built;
`ShardedTable` splits its calls so that none does.

Binds 127.0.0.1 unless told otherwise; another address needs an auth token
(`monolith_jax.rpc.wire`), which clients (`ShardedTable`, `AsyncDense`)
send when the process has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import types

import numpy as np

from monolith_jax.distributed.ps_data import shard_of, step_handler  # noqa: F401 (shard_of: re-exported)
from monolith_jax.distributed.sharded_table import ShardedTable  # noqa: F401 (re-exported)
from monolith_jax.rpc import wire
from monolith_jax.rpc.flat import view
from monolith_jax.rpc.wire import LimitError, RequestError, guard, run_until_signalled, start_server

log = logging.getLogger("monolith_jax.distributed.training_ps")

_U64, _F32 = np.dtype(np.uint64), np.dtype(np.float32)


def sum_by_key(keys: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys, each one's gradients summed), from one sort."""
    if keys.size == 0:
        return keys, grads
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    return sk[starts], np.add.reduceat(grads[order], starts, axis=0)


MAX_CONTRIBUTORS = 4096


@dataclasses.dataclass
class RoundLimits:
    """What synchronous rounds may make a shard hold (module docstring)."""

    max_open_rounds: int = 16
    max_round_bytes: int = 512 << 20
    stale_round_s: float = 300.0


class ShardState:
    def __init__(self, shard: int, shards: int, configs: list, snapshot_dir: str | None = None,
                 keep_snapshots: int = 3, limits: RoundLimits | None = None):
        from monolith_jax.distributed.dense_ps import DenseMaster
        from monolith_jax.sparse import EmbeddingTable

        if not 0 <= shard < shards:
            raise ValueError(f"shard must be in [0, {shards}), got {shard}")
        self.shard, self.shards = shard, shards
        self.configs = {c.name: c for c in configs}
        self.tables = {c.name: EmbeddingTable(c) for c in configs}
        self.dense = DenseMaster()
        # (table, session, round) -> {"keys", "grads" (lists), "n", "stamp", "contributors", "bytes", "touched", "first"}
        self._rounds: dict = {}
        self._rounds_lock = threading.Lock()
        self.limits = limits or RoundLimits()
        self.round_bytes = 0
        self.refusals: dict = {}   # reason -> count (refused contributions, rounds applied incomplete)
        self._count_lock = threading.Lock()
        self.started_s = time.monotonic()
        self.snapshots, self.restored = None, None
        self._snapshot_lock = threading.Lock()
        if snapshot_dir:
            from monolith_jax.snapshot import Snapshots, load_tables

            self.snapshots = Snapshots(os.path.join(snapshot_dir, f"ps-{shard}-of-{shards}"), every_s=None,
                                       keep=keep_snapshots)
            found = self.snapshots.load(tables_only=True)
            if found is not None:
                step, _, arrays, meta = found
                load_tables(self.tables, meta, arrays)
                self.restored = step
                log.info("training PS shard %d/%d restored snapshot %d: %s rows", shard, shards, step,
                         {n: len(t) for n, t in self.tables.items()})

    def snapshot(self, step: int) -> tuple[bool, int]:
        """Copies every table now and writes snapshot `step` in the
        background. (saved, newest completed step)."""
        if self.snapshots is None:
            return False, 0
        with self._snapshot_lock:
            self.snapshots.completed()  # a failed earlier write raises here
            holder = types.SimpleNamespace(params={}, opt_state=(), tables=self.tables)
            saved = self.snapshots.save(step, holder, {"shard": self.shard, "shards": self.shards})
        return saved, max(self.snapshots.steps(), default=0)

    def count(self, reason: str, n: int = 1) -> None:
        with self._count_lock:
            self.refusals[reason] = self.refusals.get(reason, 0) + n

    def _table_keys(self, table: str, data):
        t = self.tables.get(table)
        if t is None:
            raise RequestError(f"unknown table {table[:wire.MAX_NAME]!r}; this shard holds {sorted(self.tables)}")
        keys = view(data, _U64, f"keys of table {table!r}")
        if self.shards == 1:
            return t, keys
        wrong = shard_of(keys, self.shards) != self.shard
        if wrong.any():
            raise RequestError(f"{int(wrong.sum())} keys of table {table!r} belong to other shards "
                               f"(this is shard {self.shard} of {self.shards})")
        return t, keys

    def check_lookup(self, table: str, data):
        """(table, keys) of a lookup, checked whole: the table, keys of this
        shard, a reply that fits a message."""
        t, keys = self._table_keys(table, data)
        per_key = t.dim * 4 + 1
        try:
            wire.check_reply_bytes(keys.size * per_key, f"a lookup of {keys.size} keys of table {table!r} "
                                   f"(dim {t.dim})", per_key, "keys")
        except LimitError:
            self.count("lookup_reply_too_large")
            raise
        return t, keys

    @staticmethod
    def rows(t, keys, read_only: bool, out: np.ndarray | None = None):
        """(values, found) of checked keys; `out` (keys x dim float32) takes
        the values of a lookup that creates rows."""
        if read_only:
            return t.find(keys)
        return t.lookup_host(keys, out=out), None

    def lookup(self, req):
        t, keys = self.check_lookup(req.table, req.keys)
        values, found = self.rows(t, keys, req.read_only)
        return values, np.ones(keys.size, bool) if found is None else found, t.dim

    def _check_apply(self, req):
        """The whole contribution checked, nothing touched: (table, keys, grads, step)."""
        t, keys = self._table_keys(req.table, req.keys)
        grads = view(req.grads, _F32, f"grads of table {req.table!r}", keys.size * t.dim).reshape(keys.size, t.dim)
        step = int(req.step)
        if not 0 <= step < 2**31:
            raise RequestError(f"step must be in [0, 2^31), got {step}")
        if req.contributors > MAX_CONTRIBUTORS:
            raise RequestError(f"contributors must be at most {MAX_CONTRIBUTORS}, got {req.contributors}")
        if req.contributors > 1 and not np.all(np.isfinite(grads)):
            raise RequestError(f"grads of table {req.table!r} are not all finite (a round sums its contributions: "
                               f"one such would spoil every trainer's update of those ids)")
        return t, keys, grads, step

    def apply(self, req):
        t, keys, grads, step = self._check_apply(req)
        if req.contributors <= 1:
            return t.apply_gradients_host(keys, grads, step=step)
        # Synchronous trainers: sum a round's contributions, one fused step per id.
        n_bytes = keys.nbytes + grads.nbytes
        lim = self.limits
        if n_bytes > lim.max_round_bytes:
            self.count("limit_round_bytes")
            raise LimitError(f"a contribution of {n_bytes} bytes is over the limit of staged round gradients "
                             f"(--max-round-bytes) of {lim.max_round_bytes}")
        key = (req.table, req.session, req.round)
        with self._rounds_lock:
            entry = self._rounds.get(key)
            if entry is not None and entry["contributors"] != req.contributors:
                raise RequestError(f"round {req.round} of session {req.session} (table {req.table!r}) has "
                                   f"{entry['contributors']} contributors, this request says {req.contributors}")
            now = time.monotonic()
            # Rounds that can no longer complete are applied with what arrived.
            ready = self._take(lambda k, e: now - e["touched"] > lim.stale_round_s, "stale_round_applied")
            ready += self._take(lambda k, e: k[0] == req.table and k[1] == req.session and k[2] < req.round,
                                "superseded_round_applied")
            # Room: rounds of other sessions go first, the oldest first.
            while len(self._rounds) + (entry is None) > lim.max_open_rounds or \
                    self.round_bytes + n_bytes > lim.max_round_bytes:
                others = sorted((e["first"], k) for k, e in self._rounds.items() if k[1] != req.session)
                if not others:
                    break
                ready += self._take(lambda k, e, victim=others[0][1]: k == victim, "round_applied_for_room")
            if len(self._rounds) + (entry is None) > lim.max_open_rounds:
                self.count("limit_open_rounds")
                error = LimitError(f"{len(self._rounds)} synchronous rounds are open, the limit (--max-open-rounds) "
                                   f"is {lim.max_open_rounds}")
            elif self.round_bytes + n_bytes > lim.max_round_bytes:
                self.count("limit_round_bytes")
                error = LimitError(f"this contribution would stage {self.round_bytes + n_bytes} bytes of round "
                                   f"gradients, over the limit (--max-round-bytes) of {lim.max_round_bytes}")
            else:
                error = None
                if entry is None:
                    entry = self._rounds[key] = {"keys": [], "grads": [], "n": 0, "stamp": 0, "bytes": 0,
                                                 "contributors": req.contributors, "first": now, "touched": now}
                entry["keys"].append(keys)
                entry["grads"].append(grads)
                entry["n"] += 1
                entry["stamp"] = max(entry["stamp"], step)
                entry["bytes"] += n_bytes
                entry["touched"] = now
                self.round_bytes += n_bytes
                if entry["n"] >= req.contributors:
                    # This round is complete: older rounds and other sessions'
                    # leftovers (a trainer restarted, a shard came back) go with it.
                    ready += self._take(lambda k, e: k[0] == req.table and k != key and
                                        (k[1] != req.session or k[2] < req.round), "incomplete_round_applied")
                    ready += self._take(lambda k, e: k == key, None)
        updated = skipped = 0
        for table, e in ready:   # applied even when this contribution is refused: they were taken
            u, sk = self.tables[table].apply_gradients_host(
                *sum_by_key(np.concatenate(e["keys"]), np.concatenate(e["grads"])), step=e["stamp"])
            if table == req.table:
                updated, skipped = updated + u, skipped + sk
        if error is not None:
            raise error
        return updated, skipped

    def _take(self, which, reason) -> list:
        """Pops the rounds `which(key, entry)` picks, oldest first: [(table, entry)]."""
        keys = sorted((k for k, e in self._rounds.items() if which(k, e)), key=lambda k: self._rounds[k]["first"])
        out = []
        for k in keys:
            e = self._rounds.pop(k)
            self.round_bytes -= e["bytes"]
            out.append((k[0], e))
            if reason is not None:
                self.count(reason)
                log.info("round %d of session %d (table %r) applied with %d of %d contributions (%s)", k[2], k[1],
                         k[0], e["n"], e["contributors"], reason.replace("_", " "))
        return out

    def open_rounds(self) -> tuple[int, int]:
        """(open synchronous rounds, bytes of their gradients)."""
        with self._rounds_lock:
            return len(self._rounds), self.round_bytes


def make_servicer(state: ShardState):
    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.rpc import serving_pb2_grpc as pbg
    from monolith_jax.sparse.config import config_to_dict

    class Servicer(pbg.TrainingPSServicer):
        @guard
        def Lookup(self, request, context):
            values, found, dim = state.lookup(request)
            return pb.ShardLookupReply(values=np.ascontiguousarray(values, np.float32).tobytes(),
                                       found=found.astype(np.uint8).tobytes(), dim=dim)

        @guard
        def Apply(self, request, context):
            updated, skipped = state.apply(request)
            return pb.ShardApplyReply(updated=updated, skipped=skipped)

        @guard
        def Info(self, request, context):
            return pb.ShardInfoReply(shard=state.shard, shards=state.shards,
                                     tables_json=json.dumps([config_to_dict(c) for c in state.configs.values()]),
                                     rows={n: len(t) for n, t in state.tables.items()})

        @guard
        def Snapshot(self, request, context):
            if request.step >= 2**63:
                raise RequestError(f"snapshot step must be below 2^63, got {request.step}")
            saved, done = state.snapshot(int(request.step))
            return pb.ShardSnapshotReply(saved=saved, step=done)

        @guard
        def ExchangeDense(self, request, context):
            return state.dense.exchange(request)

    return Servicer()


def add_metrics(m, state: ShardState, pusher=None) -> None:
    """A shard's live values (beside the requests by method and status)."""
    def refusals():
        with state._count_lock:
            out = dict(state.refusals)
        for reason, n in state.dense.refused_counts().items():
            out[reason] = out.get(reason, 0) + n
        return out

    m.gauge("monolith_table_rows", "rows held by this shard, by table",
            lambda: {n: len(t) for n, t in state.tables.items()}, "table")
    m.gauge("monolith_open_rounds", "synchronous rounds waiting for contributions", lambda: state.open_rounds()[0])
    m.gauge("monolith_open_round_bytes", "bytes of gradients those rounds hold", lambda: state.open_rounds()[1])
    m.gauge("monolith_dense_version", "exchanges applied to the asynchronous dense master",
            lambda: state.dense.version)
    m.counter("monolith_refusals", "contributions and deltas refused, rounds applied incomplete, by reason",
              refusals, "reason")
    if pusher is not None:
        m.gauge("monolith_sync_lag_seconds",
                "seconds since this shard's last push the serving PS applied (since the start before the first)",
                lambda: time.monotonic() - (pusher.last_push_s if pusher.last_push_s is not None else state.started_s))


def serve(shard: int, shards: int, configs: list, port: int = 0, host: str = "127.0.0.1", workers: int = 8,
          snapshot_dir: str | None = None, serving_ps: str | None = None, sync_interval_s: float = 2.0,
          sync_dtype: str = "float32", *, security=None, metrics_port: int | None = None,
          limits: RoundLimits | None = None):
    """Starts one shard; returns (grpc server, bound port, state, sync
    pusher or None). `state.metrics` holds its metrics (served over HTTP on
    127.0.0.1 with `metrics_port`)."""
    from monolith_jax.rpc import serving_pb2_grpc as pbg
    from monolith_jax.rpc.metrics import Metrics

    wire.check_bind(host, security)
    state = ShardState(shard, shards, configs, snapshot_dir, limits=limits)
    state.metrics = Metrics()
    def add(s):
        pbg.add_TrainingPSServicer_to_server(make_servicer(state), s)
        s.add_generic_rpc_handlers((step_handler(state),))   # the data plane, TrainingPSData/Step

    server, bound = start_server(add, host, port, workers, security=security, metrics=state.metrics)
    pusher = None
    if serving_ps:
        from monolith_jax.serving.sync import SyncPusher

        pusher = SyncPusher(state.tables, serving_ps, f"training-ps-{shard}-of-{shards}", sync_interval_s,
                            sync_dtype, shard=(shard, shards), security=security)
        pusher.start()
    add_metrics(state.metrics, state, pusher)
    if metrics_port is not None:
        state.metrics.serve(metrics_port)
    return server, bound, state, pusher


def use_shards(trainer, addresses: list) -> dict:
    """Puts every table of `trainer` on the training PS shards at
    `addresses` (shard order): its steps then go through them
    (`train_step_host`). Returns name -> ShardedTable."""
    coll = trainer.collection
    coll.tables = {name: ShardedTable(t.config, addresses) for name, t in coll.tables.items()}
    return coll.tables


def snapshot_shards(tables, step: int) -> list:
    """Snapshot `step` on every shard behind `tables` (ShardedTables; a
    shard process holding several of them is asked once)."""
    tables = list(tables)
    for t in tables:              # every kept apply first, then the snapshots
        t.flush()
    seen, replies = set(), []
    for t in tables:
        if tuple(t.addresses) not in seen:
            seen.add(tuple(t.addresses))
            replies += t.snapshot(step)
    return replies


def main(argv=None) -> int:
    from monolith_jax.sparse.config import config_from_dict

    p = argparse.ArgumentParser(prog="monolith training-ps", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shard", type=int, required=True, help="this shard's index, 0..shards-1")
    p.add_argument("--shards", type=int, required=True, help="shards of the job")
    tables = p.add_mutually_exclusive_group(required=True)
    tables.add_argument("--job", default=None, help="MODULE:NAME of the job whose tables this shard holds")
    tables.add_argument("--tables", default=None,
                        help="JSON file: a list of TableConfigs as config_to_dict values (instead of --job)")
    p.add_argument("--seed", type=int, default=0, help="the job's seed offset (as the trainers' --seed)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (loopback unless told otherwise; another address needs a token)")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--snapshot-dir", default=None,
                   help="snapshots of this shard go to DIR/ps-<shard>-of-<shards>; start from the newest")
    p.add_argument("--serving-ps", default=None, help="HOST:PORT of a serving PS to push this shard's touched rows to")
    p.add_argument("--sync-interval", type=float, default=2.0, help="seconds between pushes to the serving PS")
    p.add_argument("--sync-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="row dtype of pushes to the serving PS")
    d = RoundLimits()
    p.add_argument("--max-open-rounds", type=int, default=d.max_open_rounds,
                   help="synchronous rounds waiting for contributions at once")
    p.add_argument("--max-round-bytes", type=wire.parse_bytes, default=d.max_round_bytes,
                   help="bytes of gradients those rounds may hold (K, M, G suffixes)")
    p.add_argument("--stale-round-s", type=float, default=d.stale_round_s,
                   help="a round with no contribution for this long is applied with what arrived")
    wire.add_server_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's progress lines
    security = wire.security_from_args(args)   # also what the pusher to the serving PS sends
    try:
        wire.check_bind(args.host, security)
    except ValueError as err:
        raise SystemExit(f"monolith training-ps: {err}") from None
    if args.job:
        from monolith_jax.job import load_job

        configs = load_job(args.job).table_configs(args.seed)
    else:
        with open(args.tables, encoding="utf-8") as f:
            configs = [config_from_dict(d) for d in json.load(f)]
    limits = RoundLimits(args.max_open_rounds, args.max_round_bytes, args.stale_round_s)
    try:
        server, port, state, pusher = serve(args.shard, args.shards, configs, args.port, args.host,
                                            snapshot_dir=args.snapshot_dir, serving_ps=args.serving_ps,
                                            sync_interval_s=args.sync_interval, sync_dtype=args.sync_dtype,
                                            security=security, metrics_port=args.metrics_port, limits=limits)
    except (ValueError, OSError) as err:
        raise SystemExit(f"monolith training-ps: {err}") from None
    if state.metrics.port is not None:
        print(f"training PS metrics on http://127.0.0.1:{state.metrics.port}/metrics", flush=True)
    restored = f" (from snapshot {state.restored})" if state.restored is not None else ""
    print(f"training PS shard {args.shard}/{args.shards} listening on {args.host}:{port}{restored}", flush=True)
    run_until_signalled(server)
    if pusher is not None:
        pusher.stop(final_push=True)
    if state.snapshots is not None:
        state.snapshots.close()
    state.metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
