"""The replayer: a time-stamped log -> the features and actions topics.

    monolith replay --job MODULE:NAME --bootstrap HOST:PORT --data log.parquet \\
        --time-column ts --request-id-column request --action click=clicked [--speed 60]
    monolith replay --job MODULE:NAME --bootstrap HOST:PORT        # the job's own `source`

A log is a CSV/Parquet file with one row per request. Its feature columns
are the job's features (each named by its `source`, as in training files);
every row becomes a `FeatureRecord` at the row's time, with the feature's
raw ids (strings hashed with `hash_strings`; the trainer maps ids to
per-feature key spaces). Action columns (`--action TYPE=COLUMN`, or the
job's `LogSpec.actions`) hold an action's value: a row whose cell is present
and not 0 gets one `Action` of that type and value, `--action-delay`
seconds after the request. Rows are produced in event-time order (the log
is read whole and sorted stably by time), keyed by request id.

The joiner must label with the same action types: give the job a
`LabelRule(positive=...)` naming them (or `monolith join --positive`), or,
for a job with heads, one rule per head (`labels={"click": ..., "buy":
...}`, each action type of the log a column); it warns when a stream's
actions made no positive (per label).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Iterable, Sequence

import numpy as np

from monolith_jax.stream import kafka as K


def _read_log(paths: Sequence[str], columns: list):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    import os

    tables = []
    for path in paths:
        ext = os.path.splitext(str(path))[1].lower()
        if ext in (".parquet", ".pq"):
            t = pq.read_table(path)
        elif ext in (".csv", ".tsv"):
            t = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ","))
        else:
            raise ValueError(f"{path}: unknown file type {ext!r} (use .csv, .tsv or .parquet)")
        missing = [c for c in columns if c not in t.column_names]
        if missing:
            raise KeyError(f"{path}: the log lacks columns {missing}; it has {t.column_names}")
        tables.append(t.select(columns))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _times_ms(column, unit: str) -> np.ndarray:
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError(f"time column has {arr.null_count} missing values")
    if pa.types.is_timestamp(arr.type):
        return np.asarray(arr.cast(pa.timestamp("ms")).cast(pa.int64()))
    values = np.asarray(arr.to_numpy(zero_copy_only=False), np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("time column has values that are not finite")
    return np.round(values * (1000.0 if unit == "s" else 1.0)).astype(np.int64)


class LogReplay:
    """The messages of a log, built once; `messages()` yields
    (kind, request_id, value bytes, event_ms) in event-time order."""

    def __init__(self, job, paths, time_column: str | None = None, actions: dict | None = None,
                 time_unit: str | None = None, request_id_column: str | None = None,
                 action_delay_s: float | None = None, limit: int | None = None):
        import pyarrow as pa

        from monolith_jax.features import _id_column
        from monolith_jax.stream import messages_pb2 as pb

        spec = job.log
        time_column = time_column or (spec.time_column if spec else None)
        actions = actions or (spec.actions if spec else None)
        if not time_column:
            raise ValueError("replaying a log needs its time column: --time-column, or the job's LogSpec")
        if not actions:
            raise ValueError("replaying a log needs its action columns: --action TYPE=COLUMN, or the job's LogSpec")
        time_unit = time_unit or (spec.time_unit if spec else "s")
        request_id_column = request_id_column or (spec.request_id_column if spec else None)
        delay_ms = int(round(1000 * (action_delay_s if action_delay_s is not None else
                                     (spec.action_delay_s if spec else 1.0))))
        paths = [paths] if isinstance(paths, str) else list(paths)
        columns = list(dict.fromkeys([time_column] + ([request_id_column] if request_id_column else [])
                                     + [f.source for f in job.sparse] + [f.source for f in job.dense]
                                     + list(actions.values())))
        table = _read_log(paths, columns)
        order = np.argsort(_times_ms(table.column(time_column), time_unit), kind="stable")
        if limit is not None:
            order = order[:limit]
        table = table.take(pa.array(order))
        n = table.num_rows
        times = _times_ms(table.column(time_column), time_unit)
        if request_id_column:
            rid_col = table.column(request_id_column)
            if rid_col.null_count:
                raise ValueError(f"request id column {request_id_column!r} has {rid_col.null_count} missing values")
            rids = [str(r) for r in rid_col.to_pylist()]
        else:
            rids = [f"row{i}" for i in range(n)]
        sparse = []
        for f in job.sparse:
            keys, lengths = _id_column(table.column(f.source), f, raw_ids=True)
            sparse.append((f.source, keys, lengths))
        dense = []
        for f in job.dense:
            col = table.column(f.source)
            valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
            values = np.asarray(col.fill_null(0).to_numpy(zero_copy_only=False), np.float32)
            dense.append((f.source, values, valid & np.isfinite(values)))
        self._features = []
        for i in range(n):
            rec = pb.FeatureRecord(version=1, request_id=rids[i], event_time_ms=int(times[i]))
            for name, keys, lengths in sparse:
                rec.sparse.add(name=name, ids=keys[i, :lengths[i]].tolist())
            for name, values, valid in dense:
                if valid[i]:  # an absent value: the reader's rule for a missing dense value applies
                    rec.dense.add(name=name, values=[float(values[i])])
            self._features.append(rec.SerializeToString())
        events = []  # (time, kind 0 features / 1 action, row, action type, value)
        for i in range(n):
            events.append((int(times[i]), 0, i, None, 0.0))
        self.counts = {"requests": n}
        for kind, column in actions.items():
            col = table.column(column)
            present = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
            values = np.asarray(col.fill_null(0).cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)
            act = present & (values != 0) & np.isfinite(values)
            self.counts[kind] = int(act.sum())
            for i in np.flatnonzero(act).tolist():
                events.append((int(times[i]) + delay_ms, 1, i, kind, float(values[i])))
        events.sort(key=lambda e: (e[0], e[1]))
        self._events, self._rids = events, rids

    def __len__(self) -> int:
        return len(self._events)

    def messages(self):
        from monolith_jax.stream import messages_pb2 as pb

        for t, kind, i, action, value in self._events:
            rid = self._rids[i]
            if kind == 0:
                yield "features", rid, self._features[i], t
            else:
                yield "actions", rid, pb.Action(version=1, request_id=rid, event_time_ms=t, type=action,
                                                value=value).SerializeToString(), t


def replay(bootstrap: str, stream, topics: dict | None = None, speed: float = 0.0,
           report_every_s: float = 10.0, out=print, stop=None, gate_group: str | None = None,
           max_lag: int = 150_000, rate: float = 0.0, tap=None, max_lag_bytes: int | None = None) -> dict:
    """Produces a stream of (kind, request id, value, event ms) — an object
    with `messages()`, or any iterable of them — and returns counts. With
    `speed` > 0, paces event time at `speed` seconds per wall second; with
    `rate` > 0, paces at `rate` messages per wall second. With
    `gate_group`, never runs more than `max_lag` messages ahead of that
    consumer group (the joiner's), nor more than `max_lag_bytes` of keys
    and values where given (the cluster's retention: see LagGate). `tap(kind, rid, value, t)` sees each
    message once it is produced."""
    from confluent_kafka import Producer

    topics = {**K.TOPICS, **(topics or {})}
    messages = stream.messages() if hasattr(stream, "messages") else stream
    producer = Producer(K.producer_config(bootstrap))
    gate = K.LagGate(bootstrap, gate_group, [topics["features"], topics["actions"]], max_lag,
                     max_bytes=max_lag_bytes) \
        if gate_group else None
    counts = {"features": 0, "actions": 0}
    t0 = last = time.monotonic()
    first_event = None
    if speed <= 0 and rate <= 0 and tap is None:  # unpaced: the same, with the per-message Python cut down
        _unpaced(producer, messages, topics, counts, gate, stop, report_every_s, out)
        messages = ()
    for kind, rid, value, t in messages:
        if stop is not None and stop.is_set():
            break
        if speed > 0:
            first_event = t if first_event is None else first_event
            ahead = (t - first_event) / 1000.0 / speed - (time.monotonic() - t0)
            if ahead > 0:
                producer.poll(0)
                time.sleep(ahead)
        if rate > 0:
            ahead = (counts["features"] + counts["actions"]) / rate - (time.monotonic() - t0)
            if ahead > 0:
                producer.poll(0)
                time.sleep(ahead)
        K.produce(producer, topics[kind], value, rid)
        counts[kind] += 1
        if tap is not None:
            tap(kind, rid, value, t)
        if gate is not None:
            gate.step(1, producer, stop, len(value) + (len(rid) if rid else 0))
        if (counts["features"] + counts["actions"]) % 20000 == 0:
            producer.poll(0)
            now = time.monotonic()
            if report_every_s and now - last > report_every_s:
                last = now
                out("replay " + json.dumps(counts), flush=True)
    producer.flush(60)
    counts["seconds"] = time.monotonic() - t0
    if gate is not None:
        counts["backpressure_s"] = round(gate.waited_s, 2)
        gate.close()
    return counts


def _unpaced(producer, messages, topics, counts, gate, stop, report_every_s: float, out,
             chunk: int = 1000) -> None:
    """`replay`'s loop with no pacing and no tap: messages are produced as
    they come and counted (and gated) a chunk at a time. In the loop the
    replayer shares its process with the trainer, so its Python per
    message is the trainer's loss."""
    from itertools import islice

    produce = producer.produce
    topic_of = {kind: topics[kind] for kind in counts}
    it = iter(messages)
    last = time.monotonic()
    while not (stop is not None and stop.is_set()):
        n = nbytes = 0
        for kind, rid, value, t in islice(it, chunk):
            topic = topic_of[kind]
            try:
                produce(topic, value, rid)
            except BufferError:
                K.produce(producer, topic, value, rid)
            counts[kind] += 1
            n += 1
            nbytes += len(value) + (len(rid) if rid else 0)
        if not n:
            return
        producer.poll(0)
        if gate is not None:
            gate.step(n, producer, stop, nbytes)
        now = time.monotonic()
        if report_every_s and now - last > report_every_s:
            last = now
            out("replay " + json.dumps(counts), flush=True)


def job_messages(job, data: Sequence[str] | None, args=None, limit: int | None = None, seed: int = 0) -> Iterable:
    """The messages `monolith replay` / `monolith demo` produce for a job:
    the log files' (`data`), else the job's own `source`."""
    if data:
        a = args
        actions = None
        if a is not None and a.action:
            actions = {}
            for item in a.action:
                kind, sep, column = item.partition("=")
                if not sep or not kind or not column:
                    raise ValueError(f"--action takes TYPE=COLUMN, got {item!r}")
                actions[kind] = column
        return LogReplay(job, data, getattr(a, "time_column", None), actions, getattr(a, "time_unit", None),
                         getattr(a, "request_id_column", None), getattr(a, "action_delay", None), limit)
    if job.source is None:
        raise ValueError(f"job {job.name!r} has no `source`: give the log to replay with --data FILE")
    return job.source(limit=limit, seed=seed)


def add_log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", default=None,
                   help="CSV/Parquet log files, one row per request (default: the job's own source)")
    p.add_argument("--time-column", default=None, help="the request's event time (default: the job's LogSpec)")
    p.add_argument("--time-unit", choices=("s", "ms"), default=None,
                   help="unit of a numeric time column (default: the job's LogSpec, else s)")
    p.add_argument("--request-id-column", default=None,
                   help="the request id (default: the job's LogSpec, else the row number)")
    p.add_argument("--action", action="append", default=None, metavar="TYPE=COLUMN",
                   help="a column holding an action's value (present and not 0: the action happened); "
                        "repeat for several (default: the job's LogSpec)")
    p.add_argument("--action-delay", type=float, default=None,
                   help="seconds after its request that an action happens (default: the job's LogSpec, else 1)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")


def main(argv=None) -> int:
    from monolith_jax.job import load_job

    p = argparse.ArgumentParser(prog="monolith replay", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--job", required=True, help="MODULE:NAME of the job (its features name the log's columns)")
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap.servers")
    add_log_args(p)
    p.add_argument("--speed", type=float, default=0.0, help="event seconds per wall second (0: unpaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the job's own source")
    p.add_argument("--gate-group", default=None, help="consumer group (the joiner's) not to outrun")
    p.add_argument("--max-lag", type=int, default=150_000, help="messages the gate group may fall behind")
    p.add_argument("--max-lag-bytes", type=int, default=None,
                   help="bytes (keys and values) the gate group may fall behind: under the topics' retention")
    for name in ("features", "actions"):
        p.add_argument(f"--topic-{name}", default=K.TOPICS[name], help=f"the {name} topic")
    args = p.parse_args(argv)
    job = load_job(args.job)
    try:
        messages = job_messages(job, args.data, args, args.limit, args.seed)
    except (ValueError, KeyError) as err:
        p.error(str(err))
    counts = replay(args.bootstrap, messages, {"features": args.topic_features, "actions": args.topic_actions},
                    args.speed, gate_group=args.gate_group, max_lag=args.max_lag,
                    max_lag_bytes=args.max_lag_bytes)
    print("replay done " + json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
