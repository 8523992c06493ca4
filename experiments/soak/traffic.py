"""What the soak sends (valid requests and faults, `Traffic`) and what it
reads back as the topics fill (`Watcher`)."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from experiments.soak.config import DAY_MS, FAULTS, Config


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
