"""The predictor: features of a batch of requests -> probabilities (a score per head).

    monolith predictor --model DIR --serving-ps HOST:PORT [--port P]     # two hops: rows from a serving PS
    monolith predictor --model DIR --tables local [--snapshot-dir D]     # one hop: the rows in this process
    monolith predictor --model DIR --tables local --frames-port F        # and Predict over frames, for latency

    client = PredictorClient("127.0.0.1:P")
    client.predict([{"user": "user:42", "movie": "movie:Heat (1995)", "genres": []}, ...])  # -> probabilities
    client.predict(requests)   # a model with heads: {"click": probabilities, "buy": probabilities, ...}

A model with heads (`monolith_jax.heads`; its export records them) is
served a score per head (`monolith_jax.serving.head_scores`): a binary
head's probability, corrected for that head's own negative rate (only
heads whose negatives were sampled, rate < 1, change), and a value head's
value as it is. The reply carries them as `heads` (scores and the raw
outputs, by head, in the export's order) and leaves `probabilities` and
`logits` empty; a model without heads is answered as before.

A request names each feature by its `source` (the feature's `column`,
else its `name`), as files and stream messages do, and carries its raw
ids (strings hashed with `hash_strings`, as the trainer hashes them); the
predictor maps them to keys in each feature's id space
(`monolith_jax.sparse.keys.space_keys` with the export's `id_space`), as
the trainer did. Every sparse feature the model reads must be in the
request: no ids for a request is lengths 0, and a feature left out is
INVALID_ARGUMENT naming it. A dense value that is not finite (the dict
client sends NaN for one left out) is INVALID_ARGUMENT naming the feature
and the count, unless the feature declares a `fill`: then it is filled
and counted (`dense_filled` in the stats).

With `--tables local` the predictor holds the serving tables itself (a
`serving_ps.ServingTables`, the serving PS's own state) and also answers
the serving PS's service (Push, Version, Lookup, PushDense, GetDense) on
its port: trainers push to it with `SyncPusher` exactly as to a serving
PS, and a request reads the rows in process, with no second hop. The
separate serving PS stays for tables larger than one predictor holds (and
for several predictors sharing one copy).

`--frames-port` answers Predict and Info over frames as well
(`monolith_jax.serving.predictor_frames`): the same messages and errors,
on a transport whose round trip costs a TCP one rather than gRPC's; a
`PredictorClient("frames://HOST:F")` uses it.

One request: per table, the ids of the features that read it are looked up
in one batched call to the serving PS (unique ids only) -> the rows, in the
exported model's layout -> the exported dense model (`monolith_jax.serving.export`,
no training code) -> logit -> plus log(negative rate): the examples kept
only that share of negatives, so the model's odds are too high by 1/rate ->
probability (per binary head, with that head's rate, for a model with
heads). Ids the serving PS does not hold read zeros (as in the
trainer's own evaluation) and are counted, per request in the reply and per
table in the stats.

The dense params follow the trainer: a thread asks the serving PS every
`dense_poll_s` whether newer ones were pushed and swaps them in between
requests; the negative rate (the per-head rates) comes with them. The predictor starts on the
export's own params (`params.npz`); a set the serving PS holds that does
not fit the export (names, shapes, dtypes) is refused once per version,
counted (`dense_refused`), and the last good params go on serving; the log
line about it comes at most every `log_every_s`. Batches are padded to the
next power of two (at most `max_batch`), so the model compiles a handful
of times, not once per size.

Bad requests (unknown feature, a feature twice or left out, byte lengths
that do not match, lengths that do not add up, a batch over `max_batch`,
dense values not finite without a fill) get INVALID_ARGUMENT naming the
problem. Binds 127.0.0.1 unless told otherwise (another address needs an
auth token, `monolith_jax.rpc.wire`); `--metrics-port` serves Prometheus
metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

import numpy as np

from monolith_jax.rpc import wire
from monolith_jax.serving import head_scores as _hs
from monolith_jax.rpc.wire import (RequestError, array, channel, guard, run_until_signalled, start_server,
                                   tensors_from_proto)

log = logging.getLogger("monolith_jax.serving.predictor")

_U64, _I32, _F32 = np.dtype(np.uint64), np.dtype(np.int32), np.dtype(np.float32)


def _bucket(n: int, cap: int) -> int:
    return min(1 << max(n - 1, 0).bit_length(), cap)


class _Every:
    """A log line at most every `every_s` seconds; the ones held back are
    counted in the next."""

    def __init__(self, every_s: float):
        self.every_s, self._last, self.held = every_s, None, 0

    def warning(self, logger, msg: str, *args) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every_s:
            self.held += 1
            return
        if self.held:
            msg, args = msg + " (%d more like it held back)", (*args, self.held)
        self._last, self.held = now, 0
        logger.warning(msg, *args)


class Predictor:
    """The service's work, usable in-process: `predict_arrays` and the
    dense-param refresh."""

    def __init__(self, export_dir: str, serving_ps: str | None, dense_poll_s: float = 0.5, timeout_s: float = 5.0,
                 security=None, log_every_s: float = 60.0, local=None):
        """serving_ps: HOST:PORT of the serving PS; or local: the serving
        tables in this process (a `serving_ps.ServingTables`), serving_ps None."""
        import jax

        from monolith_jax.serving.export import load_exported
        from monolith_jax.rpc import serving_pb2_grpc as pbg

        from monolith_jax.features import DenseFeature

        self.model = load_exported(export_dir)
        spec = self.model.spec
        self.spec = spec
        self.features = {f["name"]: f for f in spec["features"]}
        self.sources: dict = {}  # what requests name: source -> the features reading it
        for f in spec["features"]:
            self.sources.setdefault(_source(f), []).append(f)
        self.dense_features = [DenseFeature(d["name"], d.get("column"), d.get("fill"))
                               for d in spec["dense_features"]]
        self.tables = spec["tables"]
        from monolith_jax.sparse.keys import space_salt

        # Per table, what a request's ids become: (source, feature, max_len,
        # first slot, the id space's salt) per feature, and the slots' width.
        self._layout = {}
        for table, meta in self.tables.items():
            feats, start = [], 0
            for name in meta["features"]:
                f = self.features[name]
                feats.append((_source(f), name, int(f["max_len"]), start, np.uint64(space_salt(f["id_space"]))))
                start += int(f["max_len"])
            self._layout[table] = (feats, start, int(meta["dim"]))
        self.n_dense = len(spec["dense_features"])
        self.max_batch = int(spec["max_batch"])
        self.heads = spec.get("heads")   # None: a model without heads (one probability)
        self.negative_rate = float(spec["negative_rate"]) if self.heads is None else None
        self.head_rates = _hs.export_rates(self.heads) if self.heads is not None else None
        self.params = [jax.device_put(p) for p in self.model.params]   # the export's: the last good ones
        self.dense_version = 0     # of the params in use (0: the export's)
        self._seen_version = 0     # the newest the serving PS showed, taken or refused
        self.dense_updated_s = time.monotonic()
        self.timeout_s = timeout_s
        self.dense_poll_s = dense_poll_s
        if (serving_ps is None) == (local is None):
            raise ValueError("a predictor reads its rows from a serving PS (serving_ps) or from local tables, "
                             "one of them")
        self.local = local
        self._channel = channel(serving_ps, security) if local is None else None
        self._ps = pbg.ServingPSStub(self._channel) if local is None else None
        self._lock = threading.Lock()
        self._log = _Every(log_every_s)
        self.stats = {"requests": 0, "predictions": 0, "ids": 0, "dense_updates": 0, "bad_requests": 0,
                      "dense_polls": 0, "dense_refused": 0, "dense_errors": 0,
                      "unknown_ids": {name: 0 for name in self.tables},
                      "looked_up": {name: 0 for name in self.tables},
                      "dense_filled": {f.name: 0 for f in self.dense_features if f.fill is not None}}
        if self.heads is not None:   # per head: the sum of the scores served (/ predictions: their mean)
            self.stats["head_score_sum"] = {h["name"]: 0.0 for h in self.heads}
        self._stop = threading.Event()
        self._thread = None
        self.frames = None   # the FramesServer answering for it, when `serve` starts one

    # ----------------------------------------------------------- dense
    def start(self) -> None:
        """Fetches the dense params once (serving the export's own if the
        serving PS has none that fit), then follows them on a thread."""
        self.refresh_dense(wait=True)
        self._thread = threading.Thread(target=self._follow, name="monolith-dense", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.wait(self.dense_poll_s):
            try:
                self.refresh_dense()
            except Exception as err:  # keep serving with the params held
                with self._lock:
                    self.stats["dense_errors"] += 1
                self._log.warning(log, "dense refresh failed, serving the last good params: %s", err)

    def refresh_dense(self, wait: bool = False) -> bool:
        """Swaps in newer dense params from the serving PS, if any. True if
        it did. A set that does not fit the export is refused (once per
        version: it is not fetched again) and the params held go on."""
        import grpc
        import jax

        from monolith_jax.rpc import serving_pb2 as pb

        with self._lock:
            self.stats["dense_polls"] += 1
        try:
            reply = (self.local.get_dense(self._seen_version) if self.local is not None else
                     self._ps.GetDense(pb.DenseRequest(have=self._seen_version), timeout=self.timeout_s,
                                       wait_for_ready=wait))
        except grpc.RpcError as err:
            self._log.warning(log, "serving PS dense params: %s", err.code().name)
            return False
        if not reply.tensors:
            return False
        try:
            params = self.model.check_params(tensors_from_proto(reply.tensors))
            rates = self._synced_rates(reply)
        except ValueError as err:  # RequestError too
            with self._lock:
                self._seen_version = reply.version
                self.stats["dense_refused"] += 1
            self._log.warning(log, "dense params %d from the serving PS do not fit this export (%s); serving "
                              "the last good params (version %d, 0: the export's)", reply.version, err,
                              self.dense_version)
            return False
        params = [jax.device_put(p) for p in params]
        with self._lock:
            self.params = params
            self.dense_version = self._seen_version = reply.version
            self.dense_updated_s = time.monotonic()
            if self.heads is not None:
                self.head_rates = rates
            elif rates is not None:
                self.negative_rate = rates
            self.stats["dense_updates"] += 1
        return True

    def _synced_rates(self, reply):
        """The rates a dense set brings: per head for a model with heads;
        else its one rate (None: not known; the rate of the one binary head
        a job of one head names, `spec["head"]`, counts as it).
        ValueError where they do not fit the heads."""
        if self.heads is not None:
            return _hs.synced_rates(self.heads, reply.negative_rate, reply.head_negative_rates)
        rate = float(reply.negative_rate) if reply.negative_rate > 0 else None
        if reply.head_negative_rates:
            one = self.spec.get("head")
            if one is None or set(reply.head_negative_rates) != {one}:
                raise ValueError(f"head_negative_rates name {sorted(reply.head_negative_rates)}, but this model has "
                                 f"no heads" + (f" but {one!r}" if one is not None else ""))
            from monolith_jax.serving.export import check_rate

            rate = check_rate(float(reply.head_negative_rates[one]), f"head_negative_rates[{one!r}]")
        return rate

    def close(self) -> None:
        if self.frames is not None:
            self.frames.close()
            self.frames = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._channel is not None:
            self._channel.close()

    # --------------------------------------------------------- predict
    def check(self, ids: dict, dense, batch_size: int) -> tuple[dict, np.ndarray]:
        """Validates a request: ids source -> (flat uint64, lengths int32 (B,)),
        every source the model reads present. Returns them and dense (B, n),
        fills applied."""
        from monolith_jax.features import fill_dense

        if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= self.max_batch:
            raise RequestError(f"batch_size must be 1..{self.max_batch}, got {batch_size}")
        out = {}
        for name, (flat, lengths) in ids.items():
            if name not in self.sources:
                hint = ""
                if name in self.features:
                    hint = (f" (feature {name!r} is read from {_source(self.features[name])!r}: requests name "
                            f"features by source, as records do)")
                raise RequestError(f"unknown feature {name!r}; the model reads {sorted(self.sources)}{hint}")
            flat, lengths = np.asarray(flat), np.asarray(lengths)
            if flat.dtype != _U64 or flat.ndim != 1:
                raise RequestError(f"feature {name!r}: ids must be a 1-d uint64 array, got {flat.dtype}{flat.shape}")
            if lengths.dtype != _I32 or lengths.shape != (batch_size,):
                raise RequestError(f"feature {name!r}: lengths must be int32 ({batch_size},), "
                                   f"got {lengths.dtype}{lengths.shape}")
            if (lengths < 0).any():
                raise RequestError(f"feature {name!r}: negative lengths")
            if int(lengths.sum()) != flat.size:
                raise RequestError(f"feature {name!r}: lengths add up to {int(lengths.sum())}, "
                                   f"but {flat.size} ids came")
            out[name] = (flat, lengths)
        lack = [name for name in self.sources if name not in out]
        if lack:
            raise RequestError(f"the request lacks sparse feature{'s' if len(lack) > 1 else ''} "
                               f"{', '.join(repr(n) for n in lack)}; every request carries each feature the "
                               f"model reads (lengths 0 for no ids)")
        if dense is None:
            dense = np.zeros((batch_size, 0), np.float32)
        dense = np.asarray(dense)
        if dense.dtype != _F32 or dense.shape != (batch_size, self.n_dense):
            raise RequestError(f"dense must be float32 ({batch_size}, {self.n_dense}), got {dense.dtype}{dense.shape}")
        if not np.all(np.isfinite(dense)):
            dense = dense.copy()
            try:
                filled = fill_dense(dense, self.dense_features, "dense")
            except ValueError as err:
                raise RequestError(str(err)) from None
            with self._lock:
                for name, n in filled.items():
                    self.stats["dense_filled"][name] += n
        return out, dense

    def predict_arrays(self, ids: dict, dense=None, batch_size: int | None = None) -> dict:
        """ids: source -> (flat uint64 raw ids, int32 lengths per request),
        every source the model reads (lengths 0: no ids). Returns
        probabilities, logits (the model's own) and unknown (ids per
        request the serving PS lacks); for a model with heads, also
        scores, outputs and negative_rates (dicts by head name; the
        module docstring), probabilities and logits then empty."""
        from monolith_jax.sparse.keys import fmix64

        import jax

        if batch_size is None:
            batch_size = len(next(iter(ids.values()))[1]) if ids else (0 if dense is None else len(dense))
        ids, dense = self.check(ids, dense, batch_size)
        b = batch_size
        padded = _bucket(b, self.max_batch)
        unknown = np.zeros(b, np.int32)
        rows, lengths = {}, {}
        n_ids = 0
        for table, (feats, width, dim) in self._layout.items():
            out = np.zeros((padded, width, dim), np.float32)
            raws, salts, reqs, cols = [], [], [], []
            for source, name, max_len, start, salt in feats:
                flat, lens = ids[source]
                if b == 1:   # one request: its first max_len ids, in slots start, start + 1, ...
                    k = min(int(lens[0]), max_len)
                    lengths[name] = np.full(1, k, np.int32)   # a batch of 1 is its own bucket
                    if k:
                        raws.append(flat[:k])
                        salts.append(np.full(k, salt, np.uint64))
                        reqs.append(np.zeros(k, np.intp))
                        cols.append(np.arange(start, start + k))
                    continue
                kept = np.minimum(lens, max_len)
                lengths[name] = np.concatenate([kept, np.zeros(padded - b, np.int32)])
                pos = np.arange(max_len)
                take = pos[None, :] < kept[:, None]               # (b, max_len): the ids kept
                offsets = np.concatenate([[0], np.cumsum(lens)])[:-1]
                src = (offsets[:, None] + pos[None, :])[take]
                req, col = np.nonzero(take)
                raws.append(flat[src])
                salts.append(np.full(src.size, salt, np.uint64))
                reqs.append(req)
                cols.append(start + col)
            if raws:
                # As the trainer keyed them (`space_keys`): fmix64(id ^ salt of its space), in one pass.
                keys = fmix64(np.concatenate(raws) ^ np.concatenate(salts))
                req, col = np.concatenate(reqs), np.concatenate(cols)
                if self.local is not None:   # in process: duplicates cost nothing to look up
                    values, found = self._lookup(table, keys, dim)
                    looked_up = keys.size
                else:
                    uniq, inverse = np.unique(keys, return_inverse=True)
                    values, found = self._lookup(table, uniq, dim)
                    values, found, looked_up = values[inverse], found[inverse], uniq.size
                out[req, col] = values
                n_missing = keys.size - int(np.count_nonzero(found))
                if n_missing:
                    unknown += np.bincount(req[~found], minlength=b).astype(np.int32)
                with self._lock:
                    self.stats["looked_up"][table] += int(looked_up)
                    self.stats["unknown_ids"][table] += n_missing
                n_ids += keys.size
            rows[table] = out
        for name in self.features:  # features no table reads still have a length input
            lengths.setdefault(name, np.zeros(padded, np.int32))
        dense_p = dense if padded == b else np.concatenate([dense, np.zeros((padded - b, self.n_dense), np.float32)])
        with self._lock:
            params, rate, rates, version = self.params, self.negative_rate, self.head_rates, self.dense_version
        if self.heads is not None:
            scored = _hs.score(jax.device_get(self.model(params, rows, lengths, dense_p)), self.heads, rates, b)
            with self._lock:
                self._count(b, n_ids)
                for name, (s, _) in scored.items():
                    self.stats["head_score_sum"][name] += float(np.sum(s, dtype=np.float64))
            empty = np.zeros(0, np.float32)
            return {"probabilities": empty, "logits": empty, "unknown": unknown, "dense_version": version,
                    "scores": {n: s for n, (s, _) in scored.items()},
                    "outputs": {n: raw for n, (_, raw) in scored.items()}, "negative_rates": dict(rates)}
        logits = np.asarray(jax.device_get(self.model(params, rows, lengths, dense_p)))[:b].astype(np.float32)
        probs = (1.0 / (1.0 + np.exp(-(logits + np.log(rate))))).astype(np.float32)
        with self._lock:
            self._count(b, n_ids)
        return {"probabilities": probs, "logits": logits, "unknown": unknown, "dense_version": version}

    def _count(self, b: int, n_ids: int) -> None:
        """Under self._lock: one request of `b` served."""
        self.stats["requests"] += 1
        self.stats["predictions"] += b
        self.stats["ids"] += n_ids

    def _lookup(self, table: str, keys: np.ndarray, dim: int):
        """Rows of `keys` from the local tables, or from the serving PS in
        calls whose replies fit a message."""
        from monolith_jax.rpc import serving_pb2 as pb

        if self.local is not None:
            return self.local.lookup(table, keys)

        step = max(wire.MAX_PAYLOAD_BYTES // (dim * 4 + 1), 1)
        values, found = np.empty((keys.size, dim), np.float32), np.empty(keys.size, bool)
        for s in range(0, keys.size, step):
            part = keys[s:s + step]
            reply = self._ps.Lookup(pb.LookupRequest(table=table, keys=part.tobytes(), dtype="float32"),
                                    timeout=self.timeout_s)
            values[s:s + part.size] = np.frombuffer(reply.values, np.float32).reshape(part.size, dim)
            found[s:s + part.size] = np.frombuffer(reply.found, np.uint8).astype(bool)
        return values, found

    def warmup(self) -> None:
        """Compiles the model for every batch bucket, so no request waits on it."""
        b = 1
        while True:
            none = {name: (np.zeros(0, np.uint64), np.zeros(b, np.int32)) for name in self.sources}
            self.predict_arrays(none, np.zeros((b, self.n_dense), np.float32), b)
            if b >= self.max_batch:
                break
            b = min(b * 2, self.max_batch)
        with self._lock:
            self.stats["requests"] = self.stats["predictions"] = 0
            for name in self.stats.get("head_score_sum", {}):
                self.stats["head_score_sum"][name] = 0.0


def _source(feature_spec: dict) -> str:
    """The name requests use for a feature of the export's spec."""
    return feature_spec.get("column") or feature_spec["name"]


def request_arrays(request, n_dense: int, max_batch: int) -> tuple[dict, np.ndarray, int]:
    """A PredictRequest -> (ids by source, dense, batch size), byte lengths
    checked. `SparseIds.feature` is the feature's source."""
    b = request.batch_size
    if not 1 <= b <= max_batch:
        raise RequestError(f"batch_size must be 1..{max_batch} (this predictor's max_batch), got {b}")
    ids = {}
    for s in request.sparse:
        wire.name(s.feature, "a sparse feature's name")
        if s.feature in ids:
            raise RequestError(f"feature {s.feature!r} twice")
        ids[s.feature] = (array(s.ids, _U64, f"ids of feature {s.feature!r}"),
                          array(s.lengths, _I32, f"lengths of feature {s.feature!r}", b))
    dense = array(request.dense, _F32, "dense", b * n_dense).reshape(b, n_dense)
    return ids, dense, b


def predict_reply(predictor: Predictor, request):
    """A PredictRequest -> its PredictReply: what every transport answers.
    RequestError (counted as a bad request) for a request that is wrong;
    a serving PS that fails its lookup raises its grpc.RpcError."""
    from monolith_jax.rpc import serving_pb2 as pb

    try:
        out = predictor.predict_arrays(*request_arrays(request, predictor.n_dense, predictor.max_batch))
    except RequestError:
        with predictor._lock:
            predictor.stats["bad_requests"] += 1
        raise
    reply = pb.PredictReply(probabilities=out["probabilities"].tobytes(), logits=out["logits"].tobytes(),
                            unknown=out["unknown"].tobytes(), dense_version=out["dense_version"])
    if predictor.heads is not None:
        _hs.to_reply(reply, predictor.heads, {n: (out["scores"][n], out["outputs"][n]) for n in out["scores"]},
                     out["negative_rates"])
    return reply


def info_reply(predictor: Predictor):
    """The InfoReply: the export's spec and the live stats."""
    from monolith_jax.rpc import serving_pb2 as pb

    with predictor._lock:
        stats = json.dumps({**predictor.stats, "dense_version": predictor.dense_version,
                            "negative_rate": predictor.negative_rate,
                            **({"heads": [{**h, **({"negative_rate": predictor.head_rates[h["name"]]}
                                                   if h["kind"] == "binary" else {})}
                                          for h in predictor.heads]} if predictor.heads is not None else {})})
    return pb.InfoReply(spec_json=json.dumps(predictor.spec), stats_json=stats)


def make_servicer(predictor: Predictor):
    import grpc

    from monolith_jax.rpc import serving_pb2_grpc as pbg

    class Servicer(pbg.PredictorServicer):
        @guard
        def Predict(self, request, context):
            try:
                return predict_reply(predictor, request)
            except grpc.RpcError as err:  # the serving PS
                context.abort(grpc.StatusCode.UNAVAILABLE, f"serving PS lookup: {err.code().name}")

        @guard
        def Info(self, request, context):
            return info_reply(predictor)

    return Servicer()


def add_metrics(m, predictor: Predictor) -> None:
    """The predictor's live values (beside the requests by method and status)."""
    def stat(key):
        def read():
            with predictor._lock:
                return dict(predictor.stats[key]) if isinstance(predictor.stats[key], dict) else predictor.stats[key]
        return read

    def refusals():
        with predictor._lock:
            return {"bad_request": predictor.stats["bad_requests"], "dense_refused": predictor.stats["dense_refused"],
                    "dense_error": predictor.stats["dense_errors"]}

    m.counter("monolith_predictions", "examples scored", stat("predictions"))
    m.counter("monolith_table_rows_looked_up", "ids looked up (unique ones, from a serving PS), by table",
              stat("looked_up"), "table")
    m.counter("monolith_unknown_ids", "ids the serving PS did not hold (read as zeros), by table",
              stat("unknown_ids"), "table")
    m.gauge("monolith_sync_lag_seconds", "seconds since the dense params were last replaced (since the start before)",
            lambda: time.monotonic() - predictor.dense_updated_s)
    m.gauge("monolith_dense_version", "version of the dense params served (0: the export's)",
            lambda: predictor.dense_version)
    m.counter("monolith_refusals", "requests and dense params refused, by reason", refusals, "reason")
    if predictor.heads is not None:
        m.counter("monolith_head_score_sum", "sum of the scores served, by head (/ monolith_predictions: their mean)",
                  stat("head_score_sum"), "head")
        m.gauge("monolith_head_negative_rate", "negative rate each binary head is corrected by (1: not sampled)",
                lambda: dict(predictor.head_rates), "head")


def serve(export_dir: str, serving_ps: str | None, port: int = 0, host: str = "127.0.0.1", workers: int = 8,
          warmup: bool = True, dense_poll_s: float = 0.5, *, security=None, metrics_port: int | None = None,
          local_tables: bool = False, snapshot_dir: str | None = None, limits=None, frames_port: int | None = None):
    """Starts the service; returns (grpc server, bound port, predictor).
    `predictor.metrics` holds its metrics (served over HTTP on 127.0.0.1
    with `metrics_port`). local_tables (serving_ps None): the serving
    tables live in this process (`predictor.local`, first filled from the
    newest trainer snapshot in `snapshot_dir`, if given) and the port also
    answers the serving PS's service, for trainers' pushes. frames_port
    (0: any free one): Predict and Info also over frames on that port
    (`predictor.frames`, a FramesServer; None without it), on the same
    host and security; `predictor.close()` stops it."""
    from monolith_jax.rpc import serving_pb2_grpc as pbg
    from monolith_jax.rpc.metrics import start as start_metrics
    from monolith_jax.serving import serving_ps as sps

    wire.check_bind(host, security)   # before the model loads and compiles
    state = None
    if local_tables:
        if serving_ps is not None:
            raise ValueError("local tables or a serving PS, not both")
        state = sps.ServingTables(sps.tables_of_export(export_dir), dense_spec=sps.dense_spec_of_export(export_dir),
                                  limits=limits, heads=sps.heads_of_export(export_dir))
        if snapshot_dir:
            step = state.load_snapshot(snapshot_dir)
            log.info("local serving tables from snapshot %s in %s", step, snapshot_dir)
    elif snapshot_dir:
        raise ValueError("--snapshot-dir fills local tables (--tables local); a serving PS loads its own")
    predictor = Predictor(export_dir, serving_ps, dense_poll_s=dense_poll_s, security=security, local=state)
    if warmup:
        predictor.warmup()
    predictor.start()
    predictor.metrics = start_metrics(metrics_port, lambda m: add_metrics(m, predictor))
    try:
        def add(s):
            pbg.add_PredictorServicer_to_server(make_servicer(predictor), s)
            if state is not None:   # the pushes of trainers, as a serving PS takes them
                pbg.add_ServingPSServicer_to_server(sps.make_servicer(state), s)

        server = None
        server, bound = start_server(add, host, port, workers, security=security, metrics=predictor.metrics)
        if frames_port is not None:
            from monolith_jax.serving import predictor_frames

            predictor.frames = predictor_frames.start(predictor, host, frames_port, security)
    except BaseException:
        if server is not None:
            server.stop(0)
        predictor.metrics.close()
        predictor.close()
        raise
    return server, bound, predictor


class PredictorClient:
    """A small client. Requests name features by source (`column`, else
    `name`); ids may be ints (raw ids) or strings (hashed as the trainer
    hashes string ids); the predictor maps them into each feature's id
    space."""

    def __init__(self, address: str, timeout_s: float = 10.0, security=None):
        """security: a `monolith_jax.rpc.wire.Security` (token, TLS); None:
        the process's (MONOLITH_AUTH_TOKEN, MONOLITH_TLS_CA, ...).
        address: HOST:PORT of the gRPC service, or frames://HOST:PORT of
        a predictor's frames port (`--frames-port`; the same calls, the
        same errors as frames.CallError, a lower latency)."""
        from monolith_jax.rpc import frames

        self.timeout_s = timeout_s
        if address.startswith(frames.SCHEME):
            from monolith_jax.serving import predictor_frames

            self._channel = self._stub = predictor_frames.Stub(address, security)
            self._wait = {}
        else:
            from monolith_jax.rpc import serving_pb2_grpc as pbg

            self._channel = channel(address, security)
            self._stub = pbg.PredictorStub(self._channel)
            self._wait = {"wait_for_ready": True}
        self._spec = None

    def info(self) -> tuple[dict, dict]:
        from monolith_jax.rpc import serving_pb2 as pb

        reply = self._stub.Info(pb.InfoRequest(), timeout=self.timeout_s, **self._wait)
        return json.loads(reply.spec_json), json.loads(reply.stats_json)

    @property
    def spec(self) -> dict:
        if self._spec is None:
            self._spec = self.info()[0]
        return self._spec

    def predict_arrays(self, ids: dict, dense=None, batch_size: int | None = None) -> dict:
        """ids: source -> (flat uint64 raw ids, int32 lengths); see Predictor.predict_arrays."""
        from monolith_jax.rpc import serving_pb2 as pb

        if batch_size is None:
            batch_size = len(next(iter(ids.values()))[1])
        req = pb.PredictRequest(batch_size=batch_size, dense=b"" if dense is None else
                                np.ascontiguousarray(dense, np.float32).tobytes())
        for name, (flat, lengths) in ids.items():
            req.sparse.add(feature=name, ids=np.ascontiguousarray(flat, np.uint64).tobytes(),
                           lengths=np.ascontiguousarray(lengths, np.int32).tobytes())
        reply = self._stub.Predict(req, timeout=self.timeout_s, **self._wait)
        out = {"probabilities": np.frombuffer(reply.probabilities, np.float32),
               "logits": np.frombuffer(reply.logits, np.float32),
               "unknown": np.frombuffer(reply.unknown, np.int32), "dense_version": reply.dense_version}
        if reply.heads:   # a model with heads: scores, outputs, negative_rates and kinds, by head
            out.update(_hs.from_reply(reply, batch_size))
        return out

    def predict(self, requests: list) -> np.ndarray | dict:
        """requests: dicts of source -> id or list of ids (`[]`: none), and
        dense source -> float. Every sparse feature must be there (a
        ValueError names the request and feature otherwise); a dense one
        left out (or None) is sent as NaN: filled if its feature has a
        `fill`, else refused by the predictor. Returns probabilities; for
        a model with heads, a dict by head name of their scores."""
        out = self.predict_arrays(*self.encode(requests), len(requests))
        return out["scores"] if "heads" in self.spec else out["probabilities"]

    def encode(self, requests: list) -> tuple[dict, np.ndarray]:
        """The dict requests of `predict` as `predict_arrays` takes them:
        (ids by source, dense); for the whole reply (raw outputs, unknown
        ids, the rates used): `predict_arrays(*client.encode(requests))`."""
        from monolith_jax.sparse.keys import hash_strings

        spec = self.spec
        sources = list(dict.fromkeys(_source(f) for f in spec["features"]))
        ids = {}
        for name in sources:
            per = []
            for i, r in enumerate(requests):
                v = r.get(name)
                if v is None:
                    raise ValueError(f"request {i} lacks sparse feature {name!r}; send [] for no ids")
                per.append(v if isinstance(v, (list, tuple, np.ndarray)) else [v])
            flat = [k for v in per for k in v]
            keys = np.zeros(len(flat), np.uint64)
            strs = [i for i, k in enumerate(flat) if isinstance(k, str)]
            if strs:
                keys[strs] = hash_strings([flat[i] for i in strs])
            ints = [i for i, k in enumerate(flat) if not isinstance(k, str)]
            if ints:
                keys[ints] = np.asarray([flat[i] for i in ints], np.int64).view(np.uint64) \
                    if all(flat[i] < 2**63 for i in ints) else np.asarray([flat[i] for i in ints], np.uint64)
            ids[name] = (keys, np.asarray([len(v) for v in per], np.int32))
        dense_sources = [d.get("column") or d["name"] for d in spec["dense_features"]]
        dense = np.asarray([[np.nan if r.get(n) is None else float(r[n]) for n in dense_sources] for r in requests],
                           np.float32).reshape(len(requests), len(dense_sources))
        return ids, dense

    def close(self) -> None:
        self._channel.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="monolith predictor", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by monolith_jax.serving.export.export_model")
    rows = p.add_mutually_exclusive_group(required=True)
    rows.add_argument("--serving-ps", default=None, help="HOST:PORT of the serving PS (two hops)")
    rows.add_argument("--tables", choices=["local"], default=None,
                      help="local: hold the serving tables in this process (one hop); trainers push to this "
                           "predictor's port as to a serving PS")
    p.add_argument("--snapshot-dir", default=None,
                   help="with --tables local: start from the newest trainer snapshot here")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (loopback unless told otherwise; another address needs a token)")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--dense-poll", type=float, default=0.5, help="seconds between checks for new dense params")
    p.add_argument("--workers", type=int, default=8, help="threads answering requests")
    p.add_argument("--frames-port", type=int, default=None,
                   help="also answer Predict and Info over frames (a leaner transport than gRPC; clients "
                        "use frames://HOST:P) on this port (0: any free one, printed)")
    wire.add_server_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    security = wire.security_from_args(args)   # also what the serving-PS client sends
    try:
        server, port, predictor = serve(args.model, args.serving_ps, args.port, args.host, args.workers,
                                        dense_poll_s=args.dense_poll, security=security,
                                        metrics_port=args.metrics_port, local_tables=args.tables == "local",
                                        snapshot_dir=args.snapshot_dir, frames_port=args.frames_port)
    except (ValueError, OSError) as err:
        raise SystemExit(f"monolith predictor: {err}") from None
    if predictor.heads is not None:
        log.info("serving heads %s", _hs.describe(predictor.heads, predictor.head_rates))
    if predictor.metrics.port is not None:
        print(f"predictor metrics on http://127.0.0.1:{predictor.metrics.port}/metrics", flush=True)
    if predictor.frames is not None:
        print(f"predictor frames on {args.host}:{predictor.frames.port}", flush=True)
    print(f"predictor listening on {args.host}:{port}", flush=True)
    run_until_signalled(server)
    predictor.metrics.close()
    predictor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
