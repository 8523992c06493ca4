"""Soak test of the online path under faults.

    python -m experiments.soak.run --job MODULE:NAME --minutes 10 [--seed S] [--out DIR]

Processes (each its own, started here, on loopback only):

    Kafka (librdkafka's built-in cluster, experiments.soak.kafka_server)
    joiner      monolith join --job J --negative-rate 1.0 (every valid request: exactly one example)
    trainer     monolith train --job J --snapshot-dir --snapshot-every-s 2 --serving-ps --export
    serving PS  monolith serving-ps --model --snapshot-dir (same port after a restart)
    predictor   monolith predictor --model --serving-ps

This process produces valid requests of the job (a features record, and a
positive action for some) at a steady rate and, at seeded random intervals
within bounds, injects faults: malformed messages (random bytes, truncated
protobuf, JSON nested past any parser's depth, empty values), oversize ones
(over 1 MB, which the embedded cluster's topics take; and just under the
producer's 1 MB limit), event times far in the future and negative,
duplicates (a features message sent twice, a positive action sent twice),
a large valid record that still fits an example, and a record lacking one
sparse feature. It SIGKILLs the joiner, the trainer or the serving PS at
seeded random intervals (`--kill-every 40 90`, or a fixed `--kill-at
S:NAME ...` plan; the trainer's first kill waits for its first snapshot)
and restarts the process at once with the same command.
A watcher reads the dead-letter and the examples topics as they fill.

At the end it stops producing, waits (bounded) until the joiner and the
trainer have consumed everything, checks that every process is up, stops
the trainer (SIGTERM: last snapshot, last push), compares a sample of the
trainer's final snapshot rows with the serving PS's, stops everything, and
prints one JSON line and a short table. Exit code 0 only if: examples
trained == valid requests, every injected bad message is accounted for
(in the dead letters, or in the joiner's or trainer's duplicate counters),
the serving PS holds the trainer's rows, and every process was up at the
end (no process exited unless killed here, the stream drained in time).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

KILLABLE = ("joiner", "trainer", "serving-ps")
DAY_MS = 86_400_000
# What a fault is expected to become: a dead letter from the joiner (source
# topic features or actions), a dead letter from the trainer (the example
# it is in), a joiner counter (duplicates), or a trained example (valid).
FAULTS = {  # kind -> relative weight in the mix
    "garbage": 4, "truncated": 4, "nested_json": 2, "empty": 3, "oversize": 1, "near_limit": 1,
    "future_time": 3, "negative_time": 3, "dup_features": 4, "dup_action": 4, "large_valid": 1,
    "missing_sparse": 1,
}


@dataclasses.dataclass
class Config:
    job: str
    minutes: float = 10.0
    seed: int = 0
    out: str | None = None
    rate: float = 50.0                     # valid requests per second
    positive_share: float = 0.3            # of them, with a positive action
    fault_every_s: tuple = (0.5, 3.0)      # seconds between injected faults (uniform)
    kill_every_s: tuple = (40.0, 90.0)     # seconds between SIGKILLs (uniform), of a random victim
    kill_at: list | None = None            # instead: [(seconds after the traffic starts, name), ...]
    faults: tuple = tuple(FAULTS)
    window_s: float = 10.0                 # the joiner's window (event time)
    lateness_s: float = 2.0
    idle_flush_s: float = 4.0              # the joiner decides what waits after this long without input
    drain_timeout_s: float = 180.0
    start_timeout_s: float = 300.0
    stop_timeout_s: float = 60.0
    sample_rows: int = 500
    compile_cache: bool = True             # JAX's persistent compilation cache, in the run folder
    ids_per_feature: int = 5000


# ------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """One process of the soak, by name and command; `kill()` SIGKILLs it
    and starts it again with the same command. Its output goes to
    `<run>/<name>.log` (every life appended) and, line by line, to
    `on_line(life, line)`."""

    def __init__(self, name: str, argv: list, run_dir: str, env: dict, on_line=None, stdin_pipe: bool = False,
                 restartable: bool = True):
        self.name, self.argv, self.env, self.on_line = name, argv, env, on_line
        self.restartable = restartable
        self.log_path = os.path.join(run_dir, f"{name}.log")
        self.stdin_pipe = stdin_pipe
        self.lives = 0
        self.kills = 0
        self.restarts = 0
        self.exits: list = []   # exits not caused here: (life, returncode, last lines)
        self.proc = None
        self._reader = None
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        self.lives += 1
        self.lines: list = []
        life = self.lives
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"==== {self.name} life {life}: {' '.join(self.argv)}\n")
        self.proc = subprocess.Popen(guarded(self.argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
                                     env=self.env, errors="replace")
        lines, proc = self.lines, self.proc

        def read():
            with open(self.log_path, "a", encoding="utf-8") as log:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    lines.append(line)
                    if self.on_line is not None:
                        try:
                            self.on_line(life, line)
                        except Exception:  # a line it cannot read is in the log
                            pass

        self._reader = threading.Thread(target=read, name=f"soak-{self.name}-{life}", daemon=True)
        self._reader.start()

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            lines = self.lines
            for line in lines[seen:]:
                if text in line:
                    return line
            seen = len(lines)
            if self.proc.poll() is not None:
                self._reader.join(2)
                if len(self.lines) == seen:
                    break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not say {text!r} within {timeout_s:.0f} s; see {self.log_path}:\n"
                           + "".join(self.lines[-20:]))

    def kill(self) -> None:
        """SIGKILL, then the same command again at once."""
        with self._lock:
            if self.up:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(30)
            self._reader.join(5)
            self.kills += 1
            self.restarts += 1
            self.start()

    def check(self) -> bool:
        """If it exited by itself: record it (once), start it again if it
        may be; False then."""
        with self._lock:
            if self.up or (self.exits and self.exits[-1][0] == self.lives):
                return True
            self._reader.join(5)
            self.exits.append((self.lives, self.proc.returncode, "".join(self.lines[-15:])))
            if self.restartable:
                self.restarts += 1
                self.start()
            return False

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 30.0):
        """Stops it (sig, then SIGKILL after timeout_s); its return code, or
        None if it had to be killed."""
        with self._lock:
            if self.proc is None:
                return None
            rc = self.proc.poll()
            if rc is None:
                try:
                    if self.stdin_pipe and self.proc.stdin:
                        self.proc.stdin.close()
                except OSError:
                    pass
                self.proc.send_signal(sig)
                try:
                    rc = self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
                    rc = None
            if self._reader is not None:
                self._reader.join(5)
            return rc


# Run before a child's own program (Linux): it is SIGKILLed when the soak
# dies, however it dies (prctl PR_SET_PDEATHSIG survives the exec; it fires
# when the thread that started the child ends: soak() starts them all).
_ORPHAN_GUARD = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
                 "os.getppid() == {parent} or os._exit(1); os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def guarded(argv: list) -> list:
    """`argv` (a Python command) run so that it dies with this process."""
    if sys.platform.startswith("linux") and argv[:1] == [sys.executable]:
        return [sys.executable, "-c", _ORPHAN_GUARD.format(parent=os.getpid()), *argv[1:]]
    return argv


def monolith(*args) -> list:
    return [sys.executable, "-m", "monolith_jax.cli", *map(str, args)]


# --------------------------------------------------------------- the traffic
def _request_ids(job) -> tuple[list, list]:
    """The record names of the job's sparse and dense features, each once,
    with the most ids a sparse one keeps."""
    sparse: dict = {}
    for f in job.sparse:
        sparse[f.source] = max(sparse.get(f.source, 1), f.max_len)
    dense: dict = {}
    for f in job.dense:
        dense[f.source] = dense.get(f.source, False) or f.fill is not None
    return list(sparse.items()), list(dense.items())


class Traffic:
    """Valid requests at `rate` per second and, between them, faults.

    Counts what the broker acknowledged: `valid` (features messages of
    valid requests delivered), and for each fault `injected[kind]`; `bad`
    maps the key of every delivered message expected as a dead letter to
    (kind, topic, bytes); `expect_trainer_dead` the request ids a trainer
    is expected to dead-letter; `dups` the duplicates delivered."""

    def __init__(self, job, bootstrap: str, cfg: Config, rng: np.random.Generator):
        from confluent_kafka import Producer

        from monolith_jax.stream import kafka as K

        self.K = K
        self.job, self.cfg, self.rng = job, cfg, rng
        self.sparse, self.dense = _request_ids(job)
        rule = job.labels
        self.positive = (rule.positive[0], max(1.0, float(rule.min_value)))
        # Oversize faults need a producer that sends more than 1 MB (the
        # embedded cluster's topics take it); normal traffic is unchanged.
        self.producer = Producer(K.producer_config(bootstrap, **{"linger.ms": 5, "message.max.bytes": 3_000_000}))
        self.lock = threading.Lock()
        self.valid = 0
        self.valid_failed = 0
        self.actions = 0
        self.injected = collections.Counter()
        self.undelivered = collections.Counter()
        self.bad: dict = {}                 # (source topic, key) -> (kind, bytes)
        self.expect_trainer_dead: dict = {}  # request id -> kind
        self.dups = collections.Counter()   # dup_features / dup_action delivered
        self.valid_rids: set = set()
        self.recent: collections.deque = collections.deque(maxlen=200)   # (rid, features bytes, action or None)
        self.stop = threading.Event()
        self.n_bad = 0
        self.n = 0
        self.thread = threading.Thread(target=self._run, name="soak-traffic", daemon=True)

    # -- messages
    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    def _record(self, rid: str, t_ms: int, drop_sparse: str | None = None, big: int = 0):
        from monolith_jax.stream.messages import encode_features

        sparse = {}
        for name, max_len in self.sparse:
            if name == drop_sparse:
                continue
            n = 1 if max_len == 1 else int(self.rng.integers(0, max_len + 1))
            sparse[name] = self.rng.integers(0, self.cfg.ids_per_feature, n)
        if big:
            name = max(self.sparse, key=lambda s: s[1])[0]   # a sequence feature: its first max_len ids are kept
            sparse[name] = np.concatenate([sparse[name], self.rng.integers(0, self.cfg.ids_per_feature, big)])
        dense = {}
        for name, fill in self.dense:
            if fill and self.rng.random() < 0.05:
                continue   # missing: the job fills it
            dense[name] = float(np.round(self.rng.uniform(0, 100), 2))
        return encode_features(rid, t_ms, sparse, dense)

    def _action(self, rid: str, t_ms: int) -> bytes:
        from monolith_jax.stream.messages import encode_action

        return encode_action(rid, t_ms, *self.positive)

    def _send(self, topic: str, key: str, value: bytes, on_ok=None, on_fail=None) -> None:
        def delivered(err, msg):
            with self.lock:
                if err is None:
                    if on_ok:
                        on_ok()
                elif on_fail:
                    on_fail(err)

        self.K.produce(self.producer, topic, value, key, on_delivery=delivered)

    def _lost(self, kind: str):
        def fail(err):
            self.undelivered[kind] += 1

        return fail

    def send_valid(self) -> None:
        rid = f"v{self.cfg.seed}-{self.n}"
        self.n += 1
        t = self._now_ms()
        features = self._record(rid, t)
        self._send_valid(rid, t, features)

    def _send_valid(self, rid: str, t: int, features: bytes, kind: str | None = None) -> None:
        def ok():
            self.valid += 1
            self.valid_rids.add(rid)
            if kind:
                self.injected[kind] += 1

        def fail(err):
            self.valid_failed += 1

        self._send("features", rid, features, ok, fail)
        action = None
        if self.rng.random() < self.cfg.positive_share:
            action = self._action(rid, t + int(self.rng.integers(0, 1000)))

            def acted():
                self.actions += 1

            self._send("actions", rid, action, acted)
        self.recent.append((rid, features, action))

    def inject(self, kind: str) -> None:
        """One fault of `kind`."""
        from monolith_jax.stream.messages import MessageError, parse_action, parse_features

        rng = self.rng
        self.n_bad += 1
        rid = f"bad{self.cfg.seed}-{self.n_bad}"
        t = self._now_ms()
        topic = "features" if rng.random() < 0.6 else "actions"
        parse = parse_features if topic == "features" else parse_action

        def unusable(value) -> bool:
            try:
                parse(value)
            except MessageError:
                return True
            return False

        def dead(topic, value):
            def ok():
                self.injected[kind] += 1
                self.bad[(topic, rid)] = (kind, len(value))

            self._send(topic, rid, value, ok, self._lost(kind))

        def valid_bytes():
            return self._record(rid, t) if topic == "features" else self._action(rid, t)

        if kind == "garbage":
            for _ in range(100):
                value = bytes(rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8))
                if unusable(value):
                    break
            dead(topic, value)
        elif kind == "truncated":
            whole = valid_bytes()
            for _ in range(100):
                value = whole[:int(rng.integers(1, len(whole)))]
                if unusable(value):
                    break
            else:
                value = whole[:3]
            dead(topic, value)
        elif kind == "nested_json":
            depth = int(rng.integers(5_000, 50_000))
            value = (b'{"request_id": "' + rid.encode() + b'", "sparse": ' + b"[" * depth + b"]" * depth + b"}"
                     if rng.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth)
            dead(topic, value)
        elif kind == "empty":
            dead(topic, b"")
        elif kind == "oversize":   # over 1 MB: garbage, or a well-formed record too large for any example
            size = int(rng.integers(1_050_000, 2_000_000))
            if topic == "features" and rng.random() < 0.5:
                value = self._record(rid, t, big=size // 8)
            else:
                value = b"\xff" * size   # a varint that never ends
            dead(topic, value)
        elif kind == "near_limit":  # just under the producer's 1 MB default; too large for an example
            target = int(rng.integers(996_500, 999_500))
            value = self._record(rid, t)
            value = self._record(rid, t, big=max(target - len(value), 0) // 8)
            dead("features", value)
        elif kind == "future_time":
            t_bad = t + int(rng.integers(2, 365)) * DAY_MS
            value = self._record(rid, t_bad) if topic == "features" else self._action(rid, t_bad)
            dead(topic, value)
        elif kind == "negative_time":
            t_bad = -int(rng.integers(1, 10**12))
            value = self._record(rid, t_bad) if topic == "features" else self._action(rid, t_bad)
            dead(topic, value)
        elif kind in ("dup_features", "dup_action"):
            pick = [r for r in self.recent if kind == "dup_features" or r[2] is not None]
            if not pick:
                return
            r_id, features, action = pick[int(rng.integers(0, len(pick)))]
            value, topic = (features, "features") if kind == "dup_features" else (action, "actions")

            def ok():
                self.injected[kind] += 1
                self.dups[kind] += 1

            self._send(topic, r_id, value, ok, self._lost(kind))
        elif kind == "large_valid":  # a valid request of 0.6-0.8 MB: one example, still within a message
            rid = f"v{self.cfg.seed}-big{self.n_bad}"
            self._send_valid(rid, t, self._record(rid, t, big=int(rng.integers(80_000, 100_000))), kind)
        elif kind == "missing_sparse":  # readable, but one sparse feature absent: the joiner refuses it
            drop = self.sparse[int(rng.integers(0, len(self.sparse)))][0]
            dead("features", self._record(rid, t, drop_sparse=drop))
        else:
            raise ValueError(f"unknown fault {kind!r}")

    def _run(self) -> None:
        cfg, rng = self.cfg, self.rng
        kinds = [k for k in FAULTS if k in cfg.faults]
        weights = np.array([FAULTS[k] for k in kinds], np.float64)
        weights /= weights.sum() if weights.size else 1
        t0 = time.monotonic()
        next_fault = t0 + float(rng.uniform(*cfg.fault_every_s))
        while not self.stop.is_set():
            now = time.monotonic()
            due = int((now - t0) * cfg.rate) + 1
            while self.n < due and not self.stop.is_set():
                self.send_valid()
            if kinds and now >= next_fault:
                self.inject(kinds[int(rng.choice(len(kinds), p=weights))])
                next_fault = now + float(rng.uniform(*cfg.fault_every_s))
            self.producer.poll(0)
            time.sleep(min(0.02, max(0.0, t0 + self.n / cfg.rate - time.monotonic())))
        self.producer.flush(30)

    def start(self):
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(60)
        if self.producer is not None:
            self.producer.flush(30)
            self.producer = None   # gone before the cluster is


# --------------------------------------------------------------- the watcher
class Watcher:
    """Reads the dead-letter and examples topics as they fill (the embedded
    cluster keeps only the newest few MB of a partition)."""

    def __init__(self, bootstrap: str, group: str):
        from confluent_kafka import Consumer

        from monolith_jax.stream import kafka as K

        self.topics = [K.TOPICS["dead_letters"], K.TOPICS["examples"]]
        self.consumer = Consumer(K.consumer_config(bootstrap, group, **{"enable.auto.commit": False,
                                                                         "enable.partition.eof": False}))
        self.dead: list = []        # (source topic, key, reason, truncated, request ids inside when examples)
        self.examples = collections.Counter()   # request id -> examples with it in the examples topic
        self.example_messages = 0
        self.unreadable_examples = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._ask, self._done, self._answer = threading.Event(), threading.Event(), False
        self._parts = None
        self.thread = threading.Thread(target=self._run, name="soak-watcher", daemon=True)

    def start(self):
        self.consumer.subscribe(self.topics)
        self.thread.start()

    @staticmethod
    def _rids(value) -> list | None:
        from monolith_jax.stream import messages_pb2 as pb

        try:
            batch = pb.ExampleBatch.FromString(value)
            examples = list(batch.examples) or [pb.Example.FromString(value)]
            return [e.features.request_id for e in examples]
        except Exception:
            return None

    def _run(self) -> None:
        while not self.stop.is_set():
            if self._ask.is_set():   # the consumer is used from this thread only
                self._answer = self._caught_up()
                self._ask.clear()
                self._done.set()
            for msg in self.consumer.consume(500, 0.2):
                if msg.error() is not None:
                    continue
                value = msg.value() or b""
                if msg.topic() == self.topics[1]:
                    rids = self._rids(value)
                    with self.lock:
                        self.example_messages += 1
                        if rids is None:
                            self.unreadable_examples += 1
                        else:
                            self.examples.update(rids)
                    continue
                h = {k: (v or b"").decode("utf-8", "replace") for k, v in (msg.headers() or [])}
                key = msg.key().decode("utf-8", "replace") if msg.key() is not None else None
                src = h.get("source.topic", "")
                rids = self._rids(value) if src == self.topics[1] and not h.get("truncated") else None
                with self.lock:
                    self.dead.append((src, key, h.get("reason", ""), bool(h.get("truncated")), rids))

    def _caught_up(self) -> bool:
        from confluent_kafka import TopicPartition

        try:
            parts = self.consumer.assignment()
            if self._parts is None:
                md = self.consumer.list_topics(timeout=5).topics
                self._parts = sum(len(md[t].partitions) for t in self.topics)
            if len(parts) < self._parts:
                return False
            for tp in self.consumer.position(parts):
                low, high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=5)
                if (tp.offset if tp.offset >= 0 else low) < high:
                    return False
            return True
        except Exception:
            return False

    def caught_up(self, timeout_s: float = 15.0) -> bool:
        """Whether every partition of both topics has been read to its end."""
        self._done.clear()
        self._ask.set()
        return self._done.wait(timeout_s) and self._answer

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.consumer.close()


def sample_rss(children: dict, into: dict) -> None:
    """Each process's resident memory now (MB, Linux /proc): first and
    latest sample and the largest, over its lives."""
    for name, child in children.items():
        try:
            with open(f"/proc/{child.proc.pid}/status", encoding="ascii") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
        mb = round(kb / 1024, 1)
        r = into.setdefault(name, {"first": mb, "max": mb})
        r["last"], r["max"] = mb, max(r["max"], mb)


def has_snapshot(folder: str) -> bool:
    """Whether the trainer has completed a snapshot there (Orbax names a finished one by its step)."""
    return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))


def trainer_idle(trainer_stats: dict, since: float) -> bool:
    """Whether the trainer's current life has reported since `since`
    (monotonic) the same counts as in its report before: it trained nothing
    in a report interval (5 s) while everything there was had been written.
    (Its committed offsets may stay behind: it commits them with a
    snapshot, and takes one only after a batch.)"""
    if not trainer_stats:
        return False
    reports = trainer_stats[max(trainer_stats)]
    key = lambda s: (s.get("examples"), s.get("duplicates"), s.get("dead_letters"))  # noqa: E731
    return len(reports) >= 2 and reports[-1][0] > since + 0.5 and key(reports[-1][1]) == key(reports[-2][1])


def group_lag(bootstrap: str, group: str, topics: list) -> int | None:
    """Messages of `topics` the consumer group has not committed; None if unknown."""
    from monolith_jax.stream import kafka as K

    gate = K.LagGate(bootstrap, group, topics, 0)
    try:
        return gate.lag()
    except Exception:
        return None
    finally:
        gate.close()


# ------------------------------------------------------------------- checks
def serving_rows(snapshot_dir: str, ps_address: str, sample: int, rng: np.random.Generator) -> dict:
    """A sample of each table's rows in the trainer's newest snapshot, read
    back through the serving PS: found and equal?"""
    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.rpc import serving_pb2_grpc as pbg
    from monolith_jax.rpc.wire import channel
    from monolith_jax.snapshot import Snapshots

    snaps = Snapshots(snapshot_dir, every_s=None, read_only=True)
    try:
        found = snaps.load(tables_only=True)
    finally:
        snaps.close()
    if found is None:
        return {"ok": False, "why": "no snapshot"}
    step, _, tables, meta = found
    ch = channel(ps_address)
    stub = pbg.ServingPSStub(ch)
    out = {"snapshot_step": int(step), "tables": {}}
    try:
        version = stub.Version(pb.VersionRequest(), timeout=10, wait_for_ready=True)
        serving_counts = dict(version.rows)
        ok = True
        for i, name in enumerate(meta["names"]["tables"]):
            dump = tables[f"t{i}"]
            keys, values = np.asarray(dump["keys"], np.uint64), np.asarray(dump["values"], np.float32)
            idx = rng.choice(keys.size, min(sample, keys.size), replace=False) if keys.size else np.zeros(0, int)
            reply = stub.Lookup(pb.LookupRequest(table=name, keys=keys[idx].tobytes(), dtype="float32"), timeout=30)
            got = np.frombuffer(reply.values, np.float32).reshape(idx.size, values.shape[1])
            hit = np.frombuffer(reply.found, np.uint8).astype(bool)
            equal = hit & np.all(got == values[idx], axis=1)
            t = {"trainer_rows": int(keys.size), "serving_rows": int(serving_counts.get(name, -1)),
                 "sampled": int(idx.size), "found": int(hit.sum()), "equal": int(equal.sum()),
                 "max_abs_diff": float(np.max(np.abs(got[hit] - values[idx][hit]))) if hit.any() else 0.0}
            t["ok"] = t["equal"] == t["sampled"] and t["serving_rows"] == t["trainer_rows"]
            ok = ok and t["ok"]
            out["tables"][name] = t
        out["ok"] = ok
    except Exception as err:
        out.update(ok=False, why=f"{type(err).__name__}: {err}")
    finally:
        ch.close()
    return out


def rpc_up(kind: str, address: str) -> bool:
    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.rpc import serving_pb2_grpc as pbg
    from monolith_jax.rpc.wire import channel

    ch = channel(address)
    try:
        if kind == "serving-ps":
            pbg.ServingPSStub(ch).Version(pb.VersionRequest(), timeout=10, wait_for_ready=True)
        else:
            pbg.PredictorStub(ch).Info(pb.InfoRequest(), timeout=10, wait_for_ready=True)
        return True
    except Exception:
        return False
    finally:
        ch.close()


def predict_check(job, address: str, values: list) -> dict:
    """Scores recent valid requests at the predictor."""
    from monolith_jax.online.demo import request_arrays
    from monolith_jax.serving.predictor import PredictorClient

    client = PredictorClient(address, timeout_s=20)
    try:
        ids, dense = request_arrays(job, values)
        out = client.predict_arrays(ids, dense, len(values))
        p = out["probabilities"]
        return {"ok": bool(p.size == len(values) and np.all(np.isfinite(p))), "requests": len(values),
                "unknown_ids": int(np.sum(out["unknown"]))}
    except Exception as err:
        return {"ok": False, "why": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        client.close()


# ---------------------------------------------------------------------- run
def short_reason(reason: str) -> str:
    return reason.split(":")[0]


def soak(cfg: Config, out=None) -> dict:
    """Runs the soak; returns its result with `checks` and `ok` (also
    written to `<run>/summary.json`). Progress lines go to `out`
    (default: standard error)."""
    from monolith_jax.job import load_job

    if out is None:
        out = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    job = load_job(cfg.job)
    run_dir = os.path.abspath(cfg.out or tempfile.mkdtemp(prefix="monolith-soak-"))
    os.makedirs(run_dir, exist_ok=True)
    snaps, model = os.path.join(run_dir, "snapshots"), os.path.join(run_dir, "model")
    summary_path = os.path.join(run_dir, "trainer.json")
    if os.path.exists(summary_path):
        os.remove(summary_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cfg.compile_cache:   # a restarted trainer or predictor loads its programs instead of compiling them
        env.update({"JAX_COMPILATION_CACHE_DIR": os.path.join(run_dir, "jax-cache"),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    tag = f"soak-{os.getpid()}-{int(time.time())}"
    children: dict = {}
    t_start = time.monotonic()
    res: dict = {"job": cfg.job, "minutes": cfg.minutes, "seed": cfg.seed, "rate": cfg.rate, "run_dir": run_dir,
                 "faults": list(cfg.faults)}
    traffic = watcher = None
    joiner_stats: dict = {}    # life -> its last stats line
    trainer_stats: dict = {}   # life -> [(monotonic time, progress line)]
    kills_log: list = []

    def on_joiner(life, line):
        if line.startswith("joiner {") or line.startswith("joiner done {"):
            joiner_stats[life] = json.loads(line[line.index("{"):])

    def on_trainer(life, line):
        if line.startswith("trainer {"):
            trainer_stats.setdefault(life, []).append((time.monotonic(), json.loads(line[len("trainer "):])))

    def check_children(at: float) -> None:
        for name, child in list(children.items()):
            if not child.check():
                out(f"  {at:5.0f} s  {name} EXITED by itself (code {child.exits[-1][1]})"
                    + ("; started again" if child.restartable else ""))

    try:
        kafka = children["kafka"] = Child("kafka", [sys.executable, "-m", "experiments.soak.kafka_server",
                                                    "--watch-stdin"], run_dir, env, stdin_pipe=True,
                                          restartable=False)
        bootstrap = kafka.wait_for("kafka listening on ", 60).split(" listening on ")[1].strip()
        out(f"soak: job {cfg.job}, {cfg.minutes:g} min of traffic at {cfg.rate:g} requests/s, seed {cfg.seed}; "
            f"Kafka (embedded, own process) at {bootstrap}; run folder {run_dir}")
        watcher = Watcher(bootstrap, tag + "-watcher")
        watcher.start()
        children["joiner"] = Child("joiner", monolith(
            "join", "--bootstrap", bootstrap, "--group", tag + "-joiner", "--job", cfg.job,
            "--negative-rate", "1.0", "--window", cfg.window_s, "--lateness", cfg.lateness_s,
            "--emit-positives", "on_action", "--idle-flush", cfg.idle_flush_s, "--report-every", "1",
            "--seed", cfg.seed), run_dir, env, on_joiner)
        ps_address, pred_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        children["trainer"] = Child("trainer", monolith(
            "train", "--job", cfg.job, "--bootstrap", bootstrap, "--group", tag + "-trainer", "--seed", cfg.seed,
            "--snapshot-dir", snaps, "--snapshot-every-s", "2", "--serving-ps", ps_address, "--sync-interval", "1",
            "--dense-sync-interval", "5", "--export", model, "--max-wait", "0.2", "--summary", summary_path),
            run_dir, env, on_trainer)
        traffic = Traffic(job, bootstrap, cfg, np.random.default_rng([cfg.seed, 1]))
        traffic.start()   # the stream starts now; the trainer catches up once compiled
        t_traffic = time.monotonic()
        deadline = time.monotonic() + cfg.start_timeout_s
        while not os.path.exists(os.path.join(model, "spec.json")):
            if time.monotonic() > deadline or not children["trainer"].up:
                raise RuntimeError("the trainer did not export its model; see " + children["trainer"].log_path)
            time.sleep(0.2)
        children["serving-ps"] = Child("serving-ps", monolith(
            "serving-ps", "--model", model, "--snapshot-dir", snaps, "--port", ps_address.rsplit(":", 1)[1]),
            run_dir, env)
        children["serving-ps"].wait_for(" listening on ", cfg.start_timeout_s)
        children["predictor"] = Child("predictor", monolith(
            "predictor", "--model", model, "--serving-ps", ps_address, "--port", pred_address.rsplit(":", 1)[1]),
            run_dir, env)
        children["predictor"].wait_for(" listening on ", cfg.start_timeout_s)
        out(f"  {time.monotonic() - t_traffic:5.0f} s  all up: joiner, trainer, serving PS at {ps_address}, "
            f"predictor at {pred_address}")

        # ---- traffic, faults and kills
        kill_rng = np.random.default_rng([cfg.seed, 2])
        plan = sorted((float(s), n) for s, n in cfg.kill_at) if cfg.kill_at is not None else None
        next_kill = None if plan is not None else float(kill_rng.uniform(*cfg.kill_every_s))
        length = cfg.minutes * 60.0
        last_report = time.monotonic()
        rss: dict = {}
        pending_victim = None
        while True:
            now = time.monotonic()
            at = now - t_traffic
            if at >= length:
                break
            victim = None
            if plan:
                if at >= plan[0][0]:
                    victim = plan[0][1]
            elif next_kill is not None and at >= next_kill:
                victim = pending_victim or KILLABLE[int(kill_rng.integers(0, len(KILLABLE)))]
            if victim == "trainer" and not has_snapshot(snaps):
                pending_victim = victim   # the trainer's first kill waits for its first snapshot
                victim = None
            elif victim is not None:
                pending_victim = None
                if plan:
                    plan.pop(0)
                else:
                    next_kill = at + float(kill_rng.uniform(*cfg.kill_every_s))
            if victim is not None:
                children[victim].kill()
                kills_log.append((round(at, 1), victim))
                out(f"  {at:5.0f} s  SIGKILL {victim}; started again")
            check_children(at)
            if now - last_report >= 15:
                last_report = now
                sample_rss(children, rss)
                life = max(trainer_stats) if trainer_stats else None
                out(f"  {at:5.0f} s  sent {traffic.valid:,} valid requests, {sum(traffic.injected.values()):,} "
                    f"faults; trainer at {trainer_stats[life][-1][1]['examples'] if life else 0:,} examples; "
                    f"{len(watcher.dead):,} dead letters")
            time.sleep(0.2)

        # ---- the end: no more traffic; drain, check, stop
        traffic.finish()
        at = time.monotonic() - t_traffic
        out(f"  {at:5.0f} s  traffic stopped: {traffic.valid:,} valid requests, "
            f"{sum(traffic.injected.values()):,} faults; waiting for the joiner and the trainer to drain")
        t_drain = time.monotonic()
        drained, stable, joiner_done = False, 0, None
        while time.monotonic() - t_drain < cfg.drain_timeout_s:
            check_children(time.monotonic() - t_traffic)
            lags = (group_lag(bootstrap, tag + "-joiner", [K_TOPIC["features"], K_TOPIC["actions"]]),
                    group_lag(bootstrap, tag + "-trainer", [K_TOPIC["examples"]]))
            stable = stable + 1 if lags[0] == 0 else 0
            if stable >= 3 and joiner_done is None and watcher.caught_up():
                joiner_done = time.monotonic()   # every input decided, every example in the topic read
            if joiner_done is not None and (lags[1] == 0 or trainer_idle(trainer_stats, joiner_done)):
                drained = True
                break
            time.sleep(1.0)
        res["drained"] = drained
        res["drain_s"] = round(time.monotonic() - t_drain, 1)
        out(f"  {time.monotonic() - t_traffic:5.0f} s  " + (f"drained in {res['drain_s']:.0f} s" if drained else
            f"NOT drained within {cfg.drain_timeout_s:.0f} s (lags {lags})") + "; stopping")
        up = {name: child.up for name, child in children.items()}
        up["serving-ps"] = up["serving-ps"] and rpc_up("serving-ps", ps_address)
        up["predictor"] = up["predictor"] and rpc_up("predictor", pred_address)
        res["up_at_end"] = up
        sample_rss(children, rss)
        res["rss_mb"] = rss
        recent = [f for _, f, _ in list(traffic.recent)[-32:]]
        res["trainer_exit"] = children["trainer"].stop(signal.SIGTERM, cfg.stop_timeout_s)
        trainer = None
        if os.path.exists(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                trainer = json.load(f)
        res["serving_rows"] = serving_rows(snaps, ps_address, cfg.sample_rows, np.random.default_rng([cfg.seed, 3]))
        res["predict"] = predict_check(job, pred_address, recent) if recent else {"ok": False, "why": "no requests"}
        res["joiner_exit"] = children["joiner"].stop(signal.SIGTERM, cfg.stop_timeout_s)
        watcher.caught_up()   # the last dead letters, if any
        for name in ("predictor", "serving-ps"):
            res[f"{name}_exit"] = children[name].stop(signal.SIGTERM, 30)
        res.update(account(traffic, watcher, trainer, joiner_stats, children, kills_log))
    except BaseException as err:
        res["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        if traffic is not None:
            traffic.finish()
        if watcher is not None:
            watcher.close()
        for name in reversed(list(children)):
            children[name].stop(signal.SIGTERM, 15)
        res["seconds"] = round(time.monotonic() - t_start, 1)
        verdict(res)
        with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1, default=str)
    return res


JOINER_GAUGES = ("waiting", "in_memory")   # states, not counts: the last life's
K_TOPIC = {"features": "features", "actions": "actions", "examples": "examples", "dead_letters": "dead-letters"}


def account(traffic: Traffic, watcher: Watcher, trainer: dict | None, joiner_stats: dict, children: dict,
            kills_log: list) -> dict:
    """The counts the soak reports."""
    with watcher.lock:
        dead = list(watcher.dead)
        emitted = collections.Counter(watcher.examples)
        example_messages, unreadable = watcher.example_messages, watcher.unreadable_examples
    with traffic.lock:
        valid, valid_rids = traffic.valid, set(traffic.valid_rids)
        bad, expect_trainer = dict(traffic.bad), dict(traffic.expect_trainer_dead)
        injected, undelivered, dups = dict(traffic.injected), dict(traffic.undelivered), dict(traffic.dups)
    trained = trainer.get("examples") if trainer else None
    duplicates = trainer.get("duplicates") if trainer else None
    by_reason = collections.Counter(short_reason(r) for _, _, r, _, _ in dead)
    joiner_dead = {(src, key) for src, key, _, _, _ in dead if src in ("features", "actions")}
    trainer_dead_rids = collections.Counter(rid for src, _, _, _, rids in dead if src == "examples" and rids
                                            for rid in rids)
    # Every injected bad message: among the dead letters?
    missing = sorted(f"{kind} {topic} {key}" for (topic, key), (kind, _) in bad.items()
                     if (topic, key) not in joiner_dead)
    missing += sorted(f"{kind} {rid} (expected from the trainer)" for rid, kind in expect_trainer.items()
                      if rid not in trainer_dead_rids)
    counters: collections.Counter = collections.Counter()
    for stats in joiner_stats.values():   # summed over the joiner's lives (a restarted one re-reads some)
        counters.update({k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)
                         and k not in JOINER_GAUGES})
    last = joiner_stats[max(joiner_stats)] if joiner_stats else {}
    dup_counted = counters.get("duplicate_features", 0) + counters.get("repeat_actions", 0)
    emitted_valid = {r: n for r, n in emitted.items() if r in valid_rids}
    twice = {r: n for r, n in emitted_valid.items() if n > 1}
    return {
        "valid_requests": valid, "valid_undelivered": traffic.valid_failed, "positive_actions": traffic.actions,
        "examples_trained": trained, "duplicates_dropped": duplicates,
        "trained_minus_valid": None if trained is None else trained - valid,
        "faults_injected": injected, "faults_undelivered": undelivered,
        "bad_messages_expected_dead": len(bad) + len(expect_trainer),
        "bad_messages_unaccounted": missing[:50], "bad_messages_unaccounted_n": len(missing),
        "duplicates_injected": dups, "duplicates_counted_by_joiner": dup_counted,
        "dead_letters": len(dead), "dead_letters_by_reason": dict(by_reason.most_common()),
        "dead_letters_by_source": dict(collections.Counter(src for src, _, _, _, _ in dead)),
        "trainer_dead_letter_examples": sum(trainer_dead_rids.values()),
        "trainer_dead_letter_valid_examples": sum(n for r, n in trainer_dead_rids.items() if r in valid_rids),
        "trainer_dead_letters_unreadable": sum(1 for src, _, _, _, rids in dead if src == "examples" and rids is None),
        "joiner_counters": dict(counters), "joiner_lives": len(joiner_stats),
        "joiner_at_end": {k: last.get(k) for k in JOINER_GAUGES},
        "examples_topic": {"messages": example_messages, "unreadable": unreadable, "examples": sum(emitted.values()),
                           "valid_requests_emitted": len(emitted_valid),
                           "valid_requests_emitted_twice_or_more": len(twice),
                           "extra_emissions": sum(n - 1 for n in twice.values()),
                           "valid_requests_never_emitted": len(valid_rids) - len(emitted_valid)},
        "kills": {name: children[name].kills for name in KILLABLE if name in children},
        "restarts": {name: c.restarts for name, c in children.items()},
        "kill_log": kills_log,
        "unexpected_exits": {name: [(life, rc) for life, rc, _ in c.exits] for name, c in children.items() if c.exits},
        "trainer_summary": {k: trainer.get(k) for k in ("examples", "batches", "resumed_from", "dead_letters",
                                                         "dead_letter_reasons", "table_rows", "sync")}
        if trainer else None,
    }


def verdict(res: dict) -> dict:
    """`checks` (each True or False) and `ok`: all of them."""
    trained, valid = res.get("examples_trained"), res.get("valid_requests")
    duplicates = res.get("duplicates_dropped")
    dup_injected = sum((res.get("duplicates_injected") or {}).values())
    dup_counted = res.get("duplicates_counted_by_joiner", 0) + (duplicates if isinstance(duplicates, int) else 0)
    up = res.get("up_at_end") or {}
    res["checks"] = {
        "trained_equals_valid": trained is not None and trained == valid,
        "bad_messages_accounted": "bad_messages_unaccounted_n" in res and res["bad_messages_unaccounted_n"] == 0
        and dup_counted >= dup_injected,
        "serving_holds_trainer_rows": bool((res.get("serving_rows") or {}).get("ok")),
        "all_up_at_end": bool(up) and all(up.values()) and not res.get("unexpected_exits")
        and bool(res.get("drained")) and res.get("trainer_exit") == 0 and "error" not in res,
    }
    res["ok"] = all(res["checks"].values())
    return res


def table(res: dict) -> str:
    """The short table printed after the JSON line."""
    n = lambda v: "None" if v is None else f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    lines = [f"soak of {res['job']}: {res['minutes']:g} min of traffic, seed {res['seed']}, "
             f"{res.get('seconds', 0):.0f} s in all (run folder {res['run_dir']})"]
    valid, trained = res.get("valid_requests"), res.get("examples_trained")
    diff, dups = res.get("trained_minus_valid"), res.get("duplicates_dropped")
    et = res.get("examples_topic", {})
    why = [f"{et.get('extra_emissions', 0):,} examples emitted again by the joiner (at-least-once after its SIGKILL)"
           + (": the trainer has no 'duplicates' field" if dups is None else f", {dups:,} dropped by the trainer"),
           f"{res.get('trainer_dead_letter_valid_examples', 0):,} valid examples dead-lettered by the trainer",
           f"{et.get('valid_requests_never_emitted', 0):,} valid requests never emitted"]
    note = "MISMATCH (no trainer summary)" if diff is None else "equal" if diff == 0 else \
        f"MISMATCH {diff:+,}: " + "; ".join(why)
    lines.append(f"  {'valid requests sent':28} {n(valid)}")
    lines.append(f"  {'examples trained':28} {n(trained)}   {note}")
    lines.append(f"  {'duplicates dropped (trainer)':28} {n(dups)}   (the joiner emitted "
                 f"{et.get('extra_emissions', 0):,} examples again, of {et.get('valid_requests_emitted', 0):,} "
                 f"valid requests it emitted)")
    fi = res.get("faults_injected", {})
    lines.append(f"  {'faults injected':28} {sum(fi.values()):,}: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(fi.items())))
    expected = res.get("bad_messages_expected_dead", 0)
    lines.append(f"  {'bad messages accounted':28} {expected - res.get('bad_messages_unaccounted_n', 0):,}"
                 f" of {expected:,} expected dead letters found; duplicates "
                 f"{sum(res.get('duplicates_injected', {}).values()):,} injected, "
                 f"{res.get('duplicates_counted_by_joiner', 0):,} counted by the joiner (over its lives)"
                 + (f" and {dups:,} by the trainer" if isinstance(dups, int) else ""))
    lines.append(f"  {'dead letters by reason':28} " + "; ".join(f"{k} {v}" for k, v in
                                                              res.get("dead_letters_by_reason", {}).items()))
    jc = res.get("joiner_counters", {})
    keys = ("features", "actions", "positives", "negatives", "duplicate_features", "repeat_actions", "late_actions",
            "orphan_actions", "bad_times", "dead_letters")
    lines.append(f"  {'joiner counters (all lives)':28} " + ", ".join(f"{k} {jc.get(k, 0):,}" for k in keys))
    kills, restarts = res.get("kills", {}), res.get("restarts", {})
    lines.append(f"  {'kills / restarts':28} " + ", ".join(f"{k} {kills.get(k, 0)}/{restarts.get(k, 0)}"
                                                            for k in KILLABLE))
    sr = res.get("serving_rows", {})
    if sr.get("tables"):
        lines.append(f"  {'serving PS vs trainer rows':28} " + "; ".join(
            f"{t}: {v['equal']}/{v['sampled']} sampled rows equal, {v['serving_rows']:,} vs {v['trainer_rows']:,} rows"
            for t, v in sr["tables"].items()) + f" (snapshot step {sr.get('snapshot_step')})")
    else:
        lines.append(f"  {'serving PS vs trainer rows':28} not compared: {sr.get('why')}")
    up = res.get("up_at_end", {})
    lines.append(f"  {'up at the end':28} " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in up.items())
                 + (f"; exited by themselves: {res['unexpected_exits']}" if res.get("unexpected_exits") else "")
                 + ("" if res.get("drained") else "; NOT DRAINED in time"))
    rss = res.get("rss_mb") or {}
    if rss:
        lines.append(f"  {'memory (RSS MB, first/last)':28} " + ", ".join(
            f"{k} {v['first']:.0f}/{v['last']:.0f}" for k, v in rss.items()))
    failed = [k for k, v in res.get("checks", {}).items() if not v]
    lines.append(f"  {'verdict':28} {'PASS' if res.get('ok') else 'FAIL: ' + ', '.join(failed)}")
    return "\n".join(lines)


def parse_kill_at(specs) -> list | None:
    """`--kill-at` values -> a plan; no flag: None (random kills), the flag alone: no kills."""
    if specs is None:
        return None
    plan = []
    for spec in specs:
        at, _, name = spec.partition(":")
        if name not in KILLABLE:
            raise SystemExit(f"--kill-at takes SECONDS:NAME with NAME one of {KILLABLE}, got {spec!r}")
        plan.append((float(at), name))
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.soak.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = Config(job="")
    p.add_argument("--job", required=True, help="MODULE:NAME of the job")
    p.add_argument("--minutes", type=float, default=d.minutes, help="minutes of traffic")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the traffic, the faults and the kills")
    p.add_argument("--out", default=None, help="run folder (default: a new temporary one)")
    p.add_argument("--rate", type=float, default=d.rate, help="valid requests per second")
    p.add_argument("--positive-share", type=float, default=d.positive_share, help="requests with a positive action")
    p.add_argument("--fault-every", type=float, nargs=2, default=d.fault_every_s, metavar=("MIN", "MAX"),
                   help="seconds between faults")
    p.add_argument("--kill-every", type=float, nargs=2, default=d.kill_every_s, metavar=("MIN", "MAX"),
                   help="seconds between SIGKILLs of the joiner, the trainer or the serving PS")
    p.add_argument("--kill-at", nargs="*", default=None, metavar="S:NAME",
                   help="a fixed plan instead (e.g. 20:serving-ps 30:joiner 40:trainer)")
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated fault kinds: " + ", ".join(FAULTS))
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, help="seconds to wait for the drain")
    p.add_argument("--no-compile-cache", action="store_true", help="no JAX compilation cache for the processes")
    args = p.parse_args(argv)
    faults = tuple(k for k in args.faults.split(",") if k)
    unknown = [k for k in faults if k not in FAULTS]
    if unknown:
        p.error(f"unknown fault kinds {unknown}; known: {', '.join(FAULTS)}")
    cfg = Config(job=args.job, minutes=args.minutes, seed=args.seed, out=args.out, rate=args.rate,
                 positive_share=args.positive_share, fault_every_s=tuple(args.fault_every),
                 kill_every_s=tuple(args.kill_every), kill_at=parse_kill_at(args.kill_at), faults=faults,
                 drain_timeout_s=args.drain_timeout, compile_cache=not args.no_compile_cache)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stops every process it started on the way out
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)   # Orbax's notes on reading the trainer's snapshots
    res = soak(cfg)
    print(json.dumps(res, default=str), flush=True)
    print(table(res), flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
