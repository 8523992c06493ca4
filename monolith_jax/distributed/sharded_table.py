"""`ShardedTable`: a table spread over training PS shards, with a local
table's host API (`lookup_host`, `apply_gradients_host`, `find`, `dim`,
`config`, `len()`).

    table = ShardedTable(config, ["127.0.0.1:P0", "127.0.0.1:P1"])   # the API of a local table
    trainer.collection.tables["ids"] = table                         # then trainer.train_step_host(batch)

A training step is one request per shard (`ps_data`, TrainingPSData/Step):
`apply_gradients_host` sums the batch's gradients per unique id and keeps
them; the next `lookup_host` or `find` sends them with its ids, and the
shard applies them before it looks the ids up, so every lookup sees every
earlier apply. Anything else that reads the shards (`len()`, `snapshot`,
`snapshot_shards`) sends what is kept first (`flush`), as does `close`,
and a kept apply that no lookup follows within `flush_after_s` goes on
its own. So `apply_gradients_host` answers the (updated, skipped) counts
of the applies the shards answered since its previous call (in a training
loop: the previous step's); `flush()` sends and answers at once.
Synchronous data-parallel trainers (`contributors` > 1) send each apply at
once instead: a round must be whole at a shard before any trainer's next
lookup may read it.

A shard that does not answer is waited for: the call logs a line and
retries until it is back, so training never goes on with missing rows.
Calls are split so that no request or reply passes the message limit.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import numpy as np

from monolith_jax.distributed.ps_data import PAD, STEP, Split, codecs
from monolith_jax.rpc import wire
from monolith_jax.rpc.flat import view

log = logging.getLogger("monolith_jax.distributed.training_ps")


class ShardedTable:
    """A table over training PS shards (module docstring). Its owner calls
    `close()` (or `flush()`) before it exits: the last step's apply is kept
    until then, or for `flush_after_s`. A request a shard refuses raises,
    and the apply it carried is not kept."""

    split = Split    # a batch's client side (ps_data.Split)
    pad = PAD        # requests' arrays start aligned, read where they lie (ps_data.PAD)

    def __init__(self, config, addresses: list, timeout_s: float = 30.0, retry_log_s: float = 5.0,
                 security=None, flush_after_s: float = 1.0):
        from monolith_jax.rpc import serving_pb2_grpc as pbg

        self.config = config
        self.name, self.dim = config.name, config.dim
        self.addresses = list(addresses)
        self.shards = len(self.addresses)
        self._channels = [wire.channel(a, security) for a in self.addresses]
        # Keys per call, so that every request and reply fits a message.
        self.keys_per_call = max(wire.MAX_PAYLOAD_BYTES // (8 + self.dim * 4 + 1), 1)
        self._stubs = [pbg.TrainingPSStub(c) for c in self._channels]
        self._request, self._reply = codecs()
        self._steps = [c.unary_unary(STEP, request_serializer=None, response_deserializer=self._reply.decode)
                       for c in self._channels]
        self._pool = futures.ThreadPoolExecutor(max_workers=self.shards) if self.shards > 1 else None
        self.timeout_s, self.retry_log_s = timeout_s, retry_log_s
        # Synchronous data-parallel trainers (set by DataParallel.attach):
        # each apply is one contribution of `contributors` to a round.
        self.contributors, self.session, self._round = 1, 0, 0
        self.flush_after_s = flush_after_s
        self._lock = threading.Condition()   # the kept apply, and every call that may carry it
        self._pending = None                 # (per shard (keys, summed grads), step, since)
        self._answered = [0, 0]              # (updated, skipped) answered since the last apply call
        self._last_split = None
        self._flusher, self._closed = None, False

    # ------------------------------------------------------------- calls
    def _call(self, shard: int, method: str, req):
        """One RPC to a shard; a shard that is down is waited for, with a log line."""
        import grpc

        fn = self._steps[shard] if method == "Step" else getattr(self._stubs[shard], method)
        waited = 0.0
        while True:
            t0 = time.monotonic()
            try:
                return fn(req, timeout=self.timeout_s, wait_for_ready=True)
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and \
                        not wire.overloaded(err):
                    raise
                waited += time.monotonic() - t0
                log.warning("training PS shard %d (%s) of table %r does not answer (%s) for %.0f s; "
                            "training waits for it", shard, self.addresses[shard], self.name, err.code().name, waited)
                time.sleep(min(self.retry_log_s, 1.0))

    def _run(self, shard: int, requests: list) -> list:
        """A shard's Step requests, in order (an apply before the lookups that must see it)."""
        return [self._call(shard, "Step", r) for r in requests]

    def _each_shard(self, per_shard: list) -> list:
        """Every shard's requests, the shards in parallel: per shard, its replies."""
        if self._pool is None:
            return [self._run(0, per_shard[0])]
        calls = [self._pool.submit(self._run, s, reqs) for s, reqs in enumerate(per_shard)]
        return [f.result() for f in calls]

    def _apply_fields(self, keys, grads, step: int) -> dict:
        return {"apply": True, "apply_keys": keys, "grads": grads, "step": step, "round": self._round,
                "contributors": self.contributors, "session": self.session}

    def _apply_requests(self, keys, grads, step: int) -> list:
        n = self.keys_per_call
        return [self._request.encode(pad=self.pad, table=self.name,
                                     **self._apply_fields(keys[i:i + n], grads[i:i + n], step))
                for i in range(0, max(keys.size, 1), n)]

    def _count(self, replies) -> tuple[int, int]:
        u = sum(r.updated for rs in replies for r in rs)
        s = sum(r.skipped for rs in replies for r in rs)
        self._answered[0] += u
        self._answered[1] += s
        return u, s

    # ------------------------------------------------------------- reads
    def _rows(self, keys: np.ndarray, read_only: bool):
        split = self.split(keys, self.shards)
        self._last_split = split
        n = self.keys_per_call
        with self._lock:
            pending, self._pending = self._pending, None
            per_shard, applies_first = [], []
            for s in range(self.shards):
                mine = split.keys[s]
                lookups = [mine[i:i + n] for i in range(0, mine.size, n)]
                apply, reqs = {}, []
                if pending is not None:
                    (akeys, agrads), step = pending[0][s], pending[1]
                    if len(lookups) <= 1 and akeys.size <= n and \
                            akeys.size * (8 + 4 * self.dim) + mine.size * 8 <= wire.MAX_PAYLOAD_BYTES:
                        apply = self._apply_fields(akeys, agrads, step)      # one request: apply, then lookup
                        lookups = lookups or [mine]
                    else:
                        reqs += self._apply_requests(akeys, agrads, step)
                applies_first.append(len(reqs))
                reqs += [self._request.encode(pad=self.pad, table=self.name, keys=chunk, read_only=read_only,
                                              **(apply if j == 0 else {})) for j, chunk in enumerate(lookups)]
                per_shard.append(reqs)
            replies = self._each_shard(per_shard)
            self._count(replies)
        looked = [r for rs, k in zip(replies, applies_first) for r in rs[k:]]
        parts = [view(r.values, np.float32, f"rows of table {self.name!r}") for r in looked]
        values = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if values.size != split.grouped.size * self.dim:
            raise RuntimeError(f"table {self.name!r}: the shards answered {values.size / self.dim:.0f} rows "
                               f"for {split.grouped.size} keys")
        rows = split.rows(values.reshape(-1, self.dim))
        if not read_only:
            return rows, None
        found = np.concatenate([view(r.found, np.uint8, f"found of table {self.name!r}") for r in looked] or
                               [np.zeros(0, np.uint8)])
        if found.size != split.grouped.size:
            raise RuntimeError(f"table {self.name!r}: the shards answered {found.size} found flags "
                               f"for {split.grouped.size} keys")
        return rows, found[split.rows_index].astype(bool)

    def lookup_host(self, ids) -> np.ndarray:
        """Rows of `ids` (created on first sight, as the local lookup does);
        the request also carries the kept apply, done first."""
        from monolith_jax.sparse.keys import as_key_array

        keys = np.ascontiguousarray(as_key_array(ids))
        return self._rows(keys.reshape(-1), read_only=False)[0].reshape(keys.shape + (self.dim,))

    def find(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found) of `ids`, creating no row (zeros where none)."""
        from monolith_jax.sparse.keys import as_key_array

        keys = np.ascontiguousarray(as_key_array(ids))
        values, found = self._rows(keys.reshape(-1), read_only=True)
        return values.reshape(keys.shape + (self.dim,)), found.reshape(keys.shape)

    # ------------------------------------------------------------- writes
    def apply_gradients_host(self, ids, grads, *, step=0, learning_rate=None) -> tuple[int, int]:
        """Sums the gradients per unique id and keeps them for the next
        lookup's requests (module docstring). Returns the (updated,
        skipped) counts the shards answered since the previous call."""
        from monolith_jax.sparse.keys import as_key_array

        if learning_rate is not None:
            raise ValueError("a sharded table applies its configured learning rate")
        keys = np.ascontiguousarray(as_key_array(ids)).reshape(-1)
        grads = np.asarray(grads, np.float32).reshape(-1, self.dim)
        if grads.shape[0] != keys.size:
            raise ValueError(f"table {self.name!r}: {grads.shape[0]} gradient rows for {keys.size} ids")
        step = int(step)
        if not 0 <= step < 2**31:
            raise ValueError(f"step must be in [0, 2^31), got {step}")
        split = self._last_split
        if split is None or not split.same_keys(keys):
            split = self.split(keys, self.shards)
        summed, finite = split.summed(grads)
        if not finite:     # checked on the sums: any non-finite gradient spoils its id's sum
            raise ValueError(f"table {self.name!r}: gradients are not all finite (or their sums overflow)")
        parts = list(zip(split.keys, split.parts(summed)))
        self._round += 1
        if self.contributors > 1:
            # A round needs exactly one contribution of every trainer at every shard, empty or not.
            big = max((k.size for k, _ in parts), default=0)
            if big > self.keys_per_call:
                raise ValueError(f"table {self.name!r}: {big} unique ids of one shard in one synchronous step; at "
                                 f"most {self.keys_per_call} fit one message at dim {self.dim} (smaller batches, "
                                 f"or more shards)")
            with self._lock:
                self._flush_locked()
                self._count(self._each_shard([self._apply_requests(k, g, step) for k, g in parts]))
                return self._answers()
        with self._lock:
            if self._pending is not None:        # two applies without a lookup between them: the older goes now
                self._flush_locked()
            self._pending = (parts, step, time.monotonic())
            self._start_flusher()
            self._lock.notify_all()
            return self._answers()

    def _answers(self) -> tuple[int, int]:
        out, self._answered = tuple(self._answered), [0, 0]
        return out

    def _flush_locked(self) -> tuple[int, int]:
        pending, self._pending = self._pending, None
        if pending is None:
            return 0, 0
        parts, step, _ = pending
        return self._count(self._each_shard([self._apply_requests(k, g, step) for k, g in parts]))

    def flush(self) -> tuple[int, int]:
        """Sends the kept apply now; its (updated, skipped) counts."""
        with self._lock:
            self._flush_locked()
            return self._answers()

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_when_idle, name=f"flush-{self.name}", daemon=True)
            self._flusher.start()

    def _flush_when_idle(self) -> None:
        """A kept apply that no lookup took within flush_after_s goes on its own."""
        with self._lock:
            while not self._closed:
                if self._pending is None:
                    self._lock.wait()
                    continue
                left = self._pending[2] + self.flush_after_s - time.monotonic()
                if left > 0:
                    self._lock.wait(left)
                    continue
                try:
                    self._flush_locked()
                except Exception:   # the next call that needs the shard reports it
                    log.exception("table %r: sending a kept apply failed", self.name)

    # ------------------------------------------------------------- the rest
    def snapshot(self, step: int) -> list:
        """Has every shard snapshot its rows as `step`; the shards' replies."""
        from monolith_jax.rpc import serving_pb2 as pb

        self.flush()
        if self._pool is None:
            return [self._call(0, "Snapshot", pb.ShardSnapshotRequest(step=int(step)))]
        calls = [self._pool.submit(self._call, s, "Snapshot", pb.ShardSnapshotRequest(step=int(step)))
                 for s in range(self.shards)]
        return [f.result() for f in calls]

    def __len__(self) -> int:
        from monolith_jax.rpc import serving_pb2 as pb

        self.flush()
        return sum(self._call(s, "Info", pb.ShardInfoRequest()).rows.get(self.name, 0) for s in range(self.shards))

    def close(self) -> None:
        """Sends the kept apply, then closes the channels."""
        with self._lock:
            if not self._closed:
                try:
                    self._flush_locked()
                finally:
                    self._closed = True
                    self._lock.notify_all()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for c in self._channels:
            c.close()
