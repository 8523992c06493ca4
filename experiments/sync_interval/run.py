"""The sync-interval experiment's parts: the live loop with one serving PS per sync interval.

One repeat, each part its own process, on librdkafka's embedded cluster:

    replay (here) -> Kafka -> joiner -> Kafka -> trainer (experiments.sync_interval.trainer)
        -> serving PS of each arm, at the arm's interval -> predictor of each arm
    scoring (here): every request, at the moment it is replayed, by every arm's predictor

1. Warm start: the ratings before the window are replayed as fast as the
   joiner takes them and trained once, in time order; once the joiner has
   decided every one of them and the trainer has trained all their
   examples, the trainer pushes a full copy (rows and dense params) to
   every arm's serving PS; then each online arm's pusher follows its
   interval. The frozen arm gets this copy only: it serves the
   warm-started model, never updated (the batch-only arm).
2. Paced window: the next ratings are replayed at `speed` event seconds per
   wall second, in ticks of `tick_s`. In each tick the requests due are
   first scored by every arm's predictor (its serving PS's rows and the
   dense params last pushed to it), then produced to Kafka with the actions
   due: a request is scored before its features, let alone its action,
   exist anywhere else. The joiner labels the requests (positive: a rating
   >= 4; unrated impressions and low ratings negative, kept at rate 0.5);
   a consumer of the examples topic in a group of its own collects the
   labels; the AUC of each arm is over the requests the joiner labelled.

Every arm serves the same training run (one trainer fans its touched rows
out to every arm's pusher), so the arms differ only in how often their
serving PS catches up with it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from experiments.serving.run import percentiles, start, stop
from monolith_jax.metrics import auc
from monolith_jax.stream import kafka as K
from monolith_jax.examples.movielens import replay as R

ROW_DIM = 9             # the MovieLens DeepFM's table: dim 8 + the first-order weight
TABLE = "ids"
SEGMENTS = 10           # AUC over stream time: tenths of the window's labelled requests
PER_RATING = ("user", "item", "rating", "timestamp", "user_key", "item_key")
NEGATIVE_RATE = 0.5


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str            # a word: it names the arm's trainer id and pusher
    interval_s: float    # wall seconds between syncs; 0: frozen after the warm start

    @property
    def label(self) -> str:
        return "frozen" if self.interval_s <= 0 else f"sync {self.interval_s:g} s"


def make_arms(intervals) -> list:
    """An arm per sync interval (shortest first), and the frozen arm."""
    return [Arm(f"every{i:g}s", float(i)) for i in sorted(intervals)] + [Arm("frozen", 0.0)]


@dataclasses.dataclass
class Window:
    ratings: object       # the replayed ratings: the warm-up, then the paced window
    warmup: int           # how many of them are the warm-up
    start_ms: int         # event time where the paced window starts
    end_ms: int
    speed: float          # event seconds per wall second in the window


def window(ratings, start: int, warmup: int, seconds: float, speed: float) -> Window:
    """Ratings [start - warmup, start) to warm up on, then those from `start`
    that `seconds` of wall time at `speed` cover."""
    ts = ratings.timestamp
    t0 = int(ts[start])
    end = int(np.searchsorted(ts, t0 + seconds * speed, side="left"))
    a = max(start - warmup, 0)
    sub = dataclasses.replace(ratings, **{f: getattr(ratings, f)[a:end] for f in PER_RATING})
    return Window(sub, start - a, t0 * 1000, int(t0 + seconds * speed) * 1000, speed)


# ----------------------------------------------------------------- processes
class Serving:
    """A serving PS per arm and, once a model is exported, a predictor per arm."""

    def __init__(self, arms: list):
        self.arms = arms
        cmd = [sys.executable, "-m", "monolith_jax.serving.serving_ps", "--table", f"{TABLE}:{ROW_DIM}"]
        with concurrent.futures.ThreadPoolExecutor(len(arms)) as ex:
            started = list(ex.map(lambda _: start(cmd, "listening on"), arms))
        self.ps = {arm.name: s for arm, s in zip(arms, started)}
        self.predictors: dict = {}
        from monolith_jax.rpc import serving_pb2_grpc as pbg
        from monolith_jax.rpc.wire import channel

        self._channels = {name: channel(self.ps_address(name)) for name in self.ps}
        self._stubs = {name: pbg.ServingPSStub(c) for name, c in self._channels.items()}

    def ps_address(self, name: str) -> str:
        return f"127.0.0.1:{self.ps[name][1]}"

    def start_predictors(self, model_dir: str) -> None:
        def one(name):
            return start([sys.executable, "-m", "monolith_jax.serving.predictor", "--model", model_dir, "--serving-ps",
                          self.ps_address(name), "--dense-poll", "0.1"], "listening on", timeout_s=300)

        with concurrent.futures.ThreadPoolExecutor(len(self.ps)) as ex:
            self.predictors = dict(zip(self.ps, ex.map(one, self.ps)))

    def predictor_addresses(self) -> dict:
        return {name: f"127.0.0.1:{port}" for name, (_, port) in self.predictors.items()}

    def version(self, name: str) -> dict:
        from monolith_jax.rpc import serving_pb2 as pb

        v = self._stubs[name].Version(pb.VersionRequest(), timeout=10)
        return {"applied": dict(v.applied), "rows": dict(v.rows), "dense_version": int(v.dense_version)}

    def lookup(self, name: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from monolith_jax.rpc import serving_pb2 as pb

        reply = self._stubs[name].Lookup(pb.LookupRequest(table=TABLE, keys=keys.tobytes(), dtype="float32"),
                                         timeout=30)
        return (np.frombuffer(reply.values, np.float32).reshape(keys.size, ROW_DIM),
                np.frombuffer(reply.found, np.uint8).astype(bool))

    def wait_dense(self, clients: dict, timeout_s: float = 30.0) -> None:
        """Until every predictor holds the dense params last pushed to its serving PS."""
        deadline = time.monotonic() + timeout_s
        for name, client in clients.items():
            want = self.version(name)["dense_version"]
            while client.info()[1]["dense_version"] != want:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"predictor {name} did not take the dense params of version {want}")
                time.sleep(0.05)

    def close(self) -> None:
        for c in self._channels.values():
            c.close()
        stop(*[p for p, _ in self.predictors.values()], *[p for p, _ in self.ps.values()])


class TrainerProcess:
    """experiments.sync_interval.trainer, told what to do on its stdin."""

    def __init__(self, cmd: list):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        self.log: list = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self._lines.put(line)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"the trainer did not say {prefix!r}:\n" + "".join(self.log[-30:]))


class LabelCollector:
    """The examples topic, read in a group of its own: request id -> (label,
    wall time the example was seen)."""

    def __init__(self, bootstrap: str, group: str, joiner_group: str):
        from confluent_kafka import Consumer

        self.labels: dict = {}
        self.count = 0
        self._next: dict = {}   # partition -> next offset to read
        self._consumer = Consumer(K.consumer_config(bootstrap, group, **{"enable.auto.commit": False}))
        self._consumer.subscribe([K.TOPICS["examples"]])
        self._marks = Consumer(K.client_config(bootstrap, **{"group.id": group + "-marks"}))
        self._joiner = K.LagGate(bootstrap, joiner_group, [K.TOPICS["features"], K.TOPICS["actions"]], 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from monolith_jax.stream import messages_pb2 as pb

        while not self._stop.is_set():
            msgs = self._consumer.consume(num_messages=1000, timeout=0.05)
            now = time.time()
            for m in msgs:
                value = m.value()
                if m.error() is not None or not value:
                    continue
                examples = pb.ExampleBatch.FromString(value).examples or [pb.Example.FromString(value)]
                for ex in examples:
                    self.labels[ex.features.request_id] = (float(ex.label), now)
                self.count += len(examples)
                self._next[m.partition()] = m.offset() + 1
        self._consumer.close()

    def caught_up(self) -> bool:
        """The joiner has committed all its input and every example it wrote has been read here."""
        from confluent_kafka import TopicPartition

        if self._joiner.lag() > 0:
            return False
        topic = K.TOPICS["examples"]
        for p in self._marks.list_topics(topic, timeout=10).topics[topic].partitions:
            low, high = self._marks.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > max(self._next.get(p, 0), low):
                return False
        return True

    def settle(self, after: float, idle_flush_s: float, quiet_s: float = 0.5, timeout_s: float = 120.0) -> int:
        """Waits until the joiner has decided every request produced before
        `after` (monotonic): its idle flush has passed, it has committed
        all its input, every example is read here and none came for
        `quiet_s`. Returns the examples seen."""
        deadline = time.monotonic() + timeout_s
        last, changed = self.count, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = time.monotonic()
            if self.count != last:
                last, changed = self.count, now
            elif now - after > idle_flush_s + 0.5 and now - changed >= quiet_s and self.caught_up():
                return last
        raise RuntimeError("the examples topic did not settle")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._marks.close()
        self._joiner.close()


# ------------------------------------------------------------------ scoring
def request_arrays(values: list) -> tuple[dict, np.ndarray]:
    """FeatureRecord bytes -> the predictor's ids (feature -> (flat uint64
    ids, int32 lengths)) and each request's user key."""
    from monolith_jax.stream import messages_pb2 as pb

    n = len(values)
    flat = {name: [] for name in R.FIELDS}
    lengths = {name: np.zeros(n, np.int32) for name in R.FIELDS}
    users = np.zeros(n, np.uint64)
    for i, value in enumerate(values):
        for s in pb.FeatureRecord.FromString(value).sparse:
            if s.name in flat:
                flat[s.name].extend(s.ids)
                lengths[s.name][i] = len(s.ids)
                if s.name == "user" and len(s.ids):
                    users[i] = s.ids[0]
    return {name: (np.array(flat[name], np.uint64), lengths[name]) for name in R.FIELDS}, users


class Scorer:
    """Every arm's predictor, asked at once (one thread per arm)."""

    def __init__(self, addresses: dict):
        from monolith_jax.serving.predictor import PredictorClient

        self.clients = {name: PredictorClient(a) for name, a in addresses.items()}
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self.clients))
        self.max_batch = int(next(iter(self.clients.values())).spec["max_batch"])

    def score(self, ids: dict, n: int) -> dict:
        futures = {name: self._pool.submit(c.predict_arrays, ids, None, n) for name, c in self.clients.items()}
        return {name: f.result() for name, f in futures.items()}

    def close(self) -> None:
        self._pool.shutdown()
        for c in self.clients.values():
            c.close()


def replay_paced(bootstrap: str, messages: list, start_ms: int, speed: float, scorer: Scorer,
                 tick_s: float = 0.05) -> dict:
    """Produces `messages` at `speed` event seconds per wall second, in ticks
    of `tick_s`; in each tick every request due is scored by every arm
    before anything of the tick is produced. Returns per request (in
    replay order): request id, event time, user key, wall time of its score,
    each arm's probability and unknown-id count; and each action's wall time
    of production."""
    from confluent_kafka import Producer

    producer = Producer(K.producer_config(bootstrap, **{"linger.ms": 50}))
    times = np.array([m[3] for m in messages], np.int64)
    rids, event_ms, users, t_score = [], [], [], []
    probs = {name: [] for name in scorer.clients}
    unknown = {name: [] for name in scorer.clients}
    t_action: dict = {}
    late, score_s = [], []
    i, n = 0, len(messages)
    t0 = time.monotonic()
    while i < n:
        tick = time.monotonic()
        due = start_ms + (tick - t0) * speed * 1000.0
        j = int(np.searchsorted(times, due, side="right"))
        if j > i:
            late.append(tick - t0 - (times[i] - start_ms) / 1000.0 / speed)
            chunk = messages[i:j]
            feats = [(rid, value, t) for kind, rid, value, t in chunk if kind == "features"]
            for s in range(0, len(feats), scorer.max_batch):
                part = feats[s:s + scorer.max_batch]
                ids, u = request_arrays([v for _, v, _ in part])
                s0 = time.perf_counter()
                out = scorer.score(ids, len(part))
                score_s.append(time.perf_counter() - s0)
                now = time.time()
                rids.extend(r for r, _, _ in part)
                event_ms.extend(t for _, _, t in part)
                users.append(u)
                t_score.extend([now] * len(part))
                for name, o in out.items():
                    probs[name].append(o["probabilities"])
                    unknown[name].append(o["unknown"])
            for kind, rid, value, _ in chunk:
                K.produce(producer, K.TOPICS[kind], value, rid)
                if kind == "actions":
                    t_action[rid] = time.time()
            i = j
        producer.poll(0)
        if i < n:  # the next tick: tick_s on, or when the next message is due if later
            next_due = t0 + (times[i] - start_ms) / 1000.0 / speed
            time.sleep(max(max(tick + tick_s, next_due) - time.monotonic(), 0.0))
    producer.flush(30)
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return {"rids": rids, "event_ms": np.array(event_ms, np.int64), "users": cat(users, np.uint64),
            "t_score": np.array(t_score), "probs": {k: cat(v, np.float32) for k, v in probs.items()},
            "unknown": {k: cat(v, np.int32) for k, v in unknown.items()}, "t_action": t_action,
            "seconds": time.monotonic() - t0, "late_s": percentiles(late),
            "score_ms": percentiles(np.array(score_s) * 1e3)}


def produce_unpaced(bootstrap: str, messages: list, gate_group: str) -> None:
    """The warm-up, as fast as the joiner takes it (never more than 40,000
    messages ahead: the embedded cluster keeps ~5 MB a partition; the
    joiner in turn never runs more than 40,000 examples ahead of the
    trainer)."""
    from confluent_kafka import Producer

    producer = Producer(K.producer_config(bootstrap, **{"linger.ms": 50}))
    gate = K.LagGate(bootstrap, gate_group, [K.TOPICS["features"], K.TOPICS["actions"]], 40_000)
    for kind, rid, value, _ in messages:
        K.produce(producer, K.TOPICS[kind], value, rid)
        gate.step(1, producer)
    producer.flush(60)
    gate.close()


# ------------------------------------------------------------------- repeat
def run_repeat(win: Window, arms: list, serving: Serving, seed: int, workdir: str, batch: int = 1024,
               max_wait_s: float = 0.1, tick_s: float = 0.05, idle_flush_s: float = 2.0,
               dense_interval_s: float | None = None, out=print) -> dict:
    """One warm start and paced window through the live loop; returns every
    figure of the repeat, and its per-request arrays under "requests"."""
    from monolith_jax.examples.movielens.loop import joiner_command

    t_begin = time.monotonic()
    stream = R.MovieLensStream(win.ratings, 1.0, seed=seed)
    messages = list(stream.messages())
    split = next(k for k, m in enumerate(messages) if m[3] >= win.start_ms)
    warm, paced = messages[:split], messages[split:]
    users, items = R.entity_keys(win.ratings)
    feats = {f.name: f for f in R.movielens_features()}   # the rows' keys: each feature's id space
    keys = np.unique(np.concatenate([feats[n].keys(v) for n, v in users.items()] +
                                    [feats[n].keys(items[n]) for n in ("movie", "year")] +
                                    [feats["genres"].keys(np.concatenate(items["genres"]))]))
    warm_users = np.unique(users["user"][win.ratings.user[:win.warmup]])
    rdir = os.path.join(workdir, f"repeat-{seed}")
    os.makedirs(rdir, exist_ok=True)
    model_dir = os.path.join(workdir, "model")
    group = f"sync-interval-{os.getpid()}-{seed}-{int(time.time())}"
    frozen = [a.name for a in arms if a.interval_s <= 0]
    procs: list = []
    timings = {}
    with K.EmbeddedKafka() as kafka:
        bootstrap = kafka.bootstrap
        K.ensure_topics(bootstrap, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        collector = scorer = None
        try:
            joiner = subprocess.Popen(
                joiner_command(bootstrap, 60.0, NEGATIVE_RATE, group + "-joiner", idle_flush_s=idle_flush_s,
                               gate_group=group + "-trainer", exit_when_idle=False),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "PYTHONPATH": os.getcwd()})
            procs.append(joiner)
            joiner_log: list = []
            joiner_reader = threading.Thread(target=lambda: joiner_log.extend(joiner.stdout), daemon=True)
            joiner_reader.start()
            collector = LabelCollector(bootstrap, group + "-labels", group + "-joiner")
            cmd = [sys.executable, "-m", "experiments.sync_interval.trainer", "--bootstrap", bootstrap,
                   "--group", group + "-trainer", "--seed", str(seed), "--batch", str(batch),
                   "--max-wait", str(max_wait_s), "--summary", os.path.join(rdir, "trainer.json"),
                   "--prequential-out", os.path.join(rdir, "prequential.npz")]
            for arm in arms:
                cmd += ["--arm", f"{arm.name}={serving.ps_address(arm.name)}:{arm.interval_s:g}"]
            if not serving.predictors:
                cmd += ["--export", model_dir]
            if dense_interval_s:
                cmd += ["--dense-interval", str(dense_interval_s)]
            trainer = TrainerProcess(cmd)
            procs.append(trainer.proc)
            trainer.wait_for("trainer ready", 600)
            if not serving.predictors:
                serving.start_predictors(model_dir)
            timings["start_s"] = time.monotonic() - t_begin

            t0 = time.monotonic()
            produce_unpaced(bootstrap, warm, group + "-joiner")
            n_warm = collector.settle(time.monotonic(), idle_flush_s)
            trainer.send("start")
            started = json.loads(trainer.wait_for("syncing ", 300))
            if started["examples"] != n_warm:
                raise RuntimeError(f"the trainer trained {started['examples']:,} warm-up examples, "
                                   f"the joiner wrote {n_warm:,}")
            scorer = Scorer(serving.predictor_addresses())
            serving.wait_dense(scorer.clients)
            timings["warmup_s"] = time.monotonic() - t0
            out(f"  repeat {seed}: warm start on {win.warmup:,} ratings ({len(warm):,} messages, "
                f"{n_warm:,} examples) in {timings['warmup_s']:.1f} s; full copy of "
                f"{started['copies'][arms[0].name]['rows']:,} rows to {len(arms)} serving PSes", flush=True)
            frozen_before = {name: (serving.lookup(name, keys), serving.version(name)) for name in frozen}

            t_wall0 = time.time()
            r = replay_paced(bootstrap, paced, win.start_ms, win.speed, scorer, tick_s)
            t_wall1 = time.time()
            timings["paced_s"] = r["seconds"]
            n_all = collector.settle(time.monotonic(), idle_flush_s)
            frozen_after = {name: (serving.lookup(name, keys), serving.version(name)) for name in frozen}
            trainer.send("stop")
            trainer.wait_for("trainer done", 120)
            trainer.proc.wait(60)
        finally:
            if scorer is not None:
                scorer.close()
            if collector is not None:
                collector.close()
            stop(*reversed(procs))
    joiner_reader.join(5)
    joined = next((json.loads(line.split(" ", 2)[2]) for line in reversed(joiner_log)
                   if line.startswith("joiner done ")), {})
    with open(os.path.join(rdir, "trainer.json"), encoding="utf-8") as f:
        trained = json.load(f)
    with np.load(os.path.join(rdir, "prequential.npz"), allow_pickle=False) as z:
        pre = {k: z[k] for k in ("labels", "scores", "event_ms")}
    timings["total_s"] = time.monotonic() - t_begin

    # ------------------------------------------------------------ figures
    rids = r["rids"]
    lab = np.array([collector.labels.get(rid, (np.nan, np.nan))[0] for rid in rids], np.float64)
    t_label = np.array([collector.labels.get(rid, (np.nan, np.nan))[1] for rid in rids], np.float64)
    labelled = ~np.isnan(lab)
    y = lab[labelled]
    known = np.isin(r["users"], warm_users)[labelled]
    ev = r["event_ms"][labelled]
    segments = np.array_split(np.arange(y.size), SEGMENTS)
    arm_out = {}
    base = r["probs"][frozen[0]][labelled] if frozen else None
    for arm in arms:
        p = r["probs"][arm.name][labelled]
        found = r["unknown"][arm.name][labelled] == 0   # the arm's serving PS held every id of the request
        hist = [h for h in trained["arms"][arm.name]["history"] if t_wall0 <= h["time"] <= t_wall1]
        arm_out[arm.name] = {
            "label": arm.label, "interval_s": arm.interval_s, "auc": auc(y, p),
            "auc_known_users": auc(y[known], p[known]), "auc_new_users": auc(y[~known], p[~known]),
            "tenths": [auc(y[s], p[s]) for s in segments],
            "unknown_share": float(np.mean(r["unknown"][arm.name] > 0)),
            "syncs": len(hist), "rows_pushed": int(sum(h["rows"] for h in hist)),
            "bytes_pushed": int(sum(h["bytes"] for h in hist)),
            "pushes_all": trained["arms"][arm.name]["stats"],
            # Split by whether this arm held every id; the frozen arm's AUC on the same requests beside it.
            "by_ids": {k: {"share": float(m.mean()) if m.size else float("nan"), "auc": auc(y[m], p[m]),
                           "frozen_auc": auc(y[m], base[m]) if base is not None else float("nan")}
                       for k, m in (("all_found", found), ("some_missing", ~found))}}
    pm = pre["event_ms"] >= win.start_ms
    t_act = np.array([r["t_action"].get(rid, np.inf) for rid in rids])
    has_action = np.isfinite(t_act)
    frozen_check = {}
    for name in frozen:
        (v0, f0), ver0 = frozen_before[name]
        (v1, f1), ver1 = frozen_after[name]
        tid = f"{group}-trainer-{name}"   # the trainer's id for this arm's pusher
        frozen_check[name] = {"rows_found": int(f0.sum()),
                              "rows_unchanged": bool(np.array_equal(f0, f1) and np.array_equal(v0, v1)),
                              "pushes_applied": [ver0["applied"].get(tid, 0), ver1["applied"].get(tid, 0)],
                              "dense_unchanged": ver0["dense_version"] == ver1["dense_version"]}
    return {
        "seed": seed, "warmup_ratings": int(win.warmup), "paced_ratings": int(len(win.ratings) - win.warmup),
        "messages": {"warmup": len(warm), "paced": len(paced),
                     "paced_requests": sum(m[0] == "features" for m in paced)},
        "examples": {"warmup": n_warm, "all": n_all},
        "requests_scored": len(rids), "labelled": int(labelled.sum()), "positives": int(y.sum()),
        "known_user_share": float(known.mean()) if known.size else float("nan"),
        "tenth_start_ms": [int(ev[s[0]]) if s.size else None for s in segments],
        "arms": arm_out,
        "trainer_prequential": {"auc": auc(pre["labels"][pm], pre["scores"][pm]), "examples": int(pm.sum())},
        "trainer": {k: trained[k] for k in ("examples", "batches", "examples_per_s", "dead_letters")},
        "scored_before_action": {"actions": int(has_action.sum()),
                                 "before": int(np.sum(r["t_score"][has_action] < t_act[has_action])),
                                 "min_gap_s": float(np.min(t_act[has_action] - r["t_score"][has_action]))
                                 if has_action.any() else float("nan")},
        "scored_before_label": {"labelled": int(labelled.sum()),
                                "before": int(np.sum(r["t_score"][labelled] < t_label[labelled]))},
        "joiner": {k: joined.get(k) for k in ("positives", "negatives", "negatives_sampled_out", "late_actions",
                                              "dead_letters")},
        "frozen": frozen_check, "late_s": r["late_s"], "score_ms": r["score_ms"], "timings": timings,
        "requests": {"rids": rids, "t_score": r["t_score"], "t_action": t_act, "labels": lab,
                     "probs": r["probs"], "event_ms": r["event_ms"]},
    }


def experiment(ratings, intervals, repeats: int = 3, start: int = 560_000, warmup: int = 100_000,
               seconds: float = 150.0, speed: float = 600.0, tick_s: float = 0.05,
               dense_interval_s: float | None = None, out=print) -> dict:
    """Every repeat (seeds 0..repeats-1) of the live loop on one window.
    The serving PSes and predictors stay up across repeats: each repeat's
    trainer starts with a full copy, which replaces a serving PS's tables
    and dense params. `dense_interval_s`: seconds between dense syncs for
    every arm (default: each arm's own interval)."""
    arms = make_arms(intervals)
    win = window(ratings, start, warmup, seconds, speed)
    with tempfile.TemporaryDirectory(prefix="monolith-sync-interval-") as workdir:
        serving = Serving(arms)
        try:
            results = [run_repeat(win, arms, serving, seed, workdir, tick_s=tick_s,
                                  dense_interval_s=dense_interval_s, out=out)
                       for seed in range(repeats)]
        finally:
            serving.close()
    return {"arms": [dataclasses.asdict(a) for a in arms], "speed": speed, "seconds": seconds,
            "start_ms": win.start_ms, "end_ms": win.end_ms, "warmup": win.warmup,
            "paced_ratings": len(win.ratings) - win.warmup, "repeats": results}


# ----------------------------------------------------------------- reports
def summary_rows(res: dict) -> list:
    """One row per arm, then the trainer's own prequential AUC: means over
    repeats, and each repeat's AUC; the gain over the frozen arm is paired
    by repeat."""
    reps = res["repeats"]
    frozen = next(a["name"] for a in res["arms"] if a["interval_s"] <= 0)
    base = np.array([r["arms"][frozen]["auc"] for r in reps])
    mean = lambda key, name: float(np.mean([r["arms"][name][key] for r in reps]))  # noqa: E731
    rows = []
    for a in res["arms"]:
        name = a["name"]
        aucs = np.array([r["arms"][name]["auc"] for r in reps])
        rows.append({"name": name, "label": Arm(name, a["interval_s"]).label, "interval_s": a["interval_s"],
                     "movielens_s": a["interval_s"] * res["speed"], "syncs": mean("syncs", name),
                     "rows_pushed": mean("rows_pushed", name), "unknown_share": mean("unknown_share", name),
                     "requests": float(np.mean([r["requests_scored"] for r in reps])),
                     "labelled": float(np.mean([r["labelled"] for r in reps])),
                     "auc": aucs.tolist(), "auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
                     "gain_mean": float(np.mean(aucs - base)), "gain_std": float(np.std(aucs - base)),
                     "auc_known": mean("auc_known_users", name), "auc_new": mean("auc_new_users", name)})
    pre = np.array([r["trainer_prequential"]["auc"] for r in reps])
    rows.append({"name": "trainer", "label": "trainer's own", "interval_s": None,
                 "labelled": float(np.mean([r["trainer_prequential"]["examples"] for r in reps])),
                 "auc": pre.tolist(), "auc_mean": float(np.mean(pre)), "auc_std": float(np.std(pre)),
                 "gain_mean": float(np.mean(pre - base)), "gain_std": float(np.std(pre - base))})
    return rows


def span(seconds: float) -> str:
    """MovieLens time, readably."""
    if seconds <= 0:
        return "never"
    if seconds < 3600:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h" if seconds < 48 * 3600 else f"{seconds / 86400:.3g} d"


def table_lines(res: dict) -> list:
    """The experiment's table: per arm, syncs and rows pushed during the
    paced window, requests scored and labelled, the share of requests with
    an id its serving PS lacked, and the AUC of the serving model's scores."""
    rows = summary_rows(res)
    n = len(res["repeats"])
    head = (f"{'arm':<13}{'interval':>9}{'ML time':>9}{'syncs':>7}{'rows pushed':>13}{'scored':>9}{'labelled':>10}"
            f"{'ids missing':>12}   {'AUC (mean ± std)':<18}{'vs frozen (paired)':>20}   AUC per repeat")
    lines = [head, "-" * len(head)]
    for r in rows[:-1]:
        gain = f"{r['gain_mean'] * 100:+.2f} ± {r['gain_std'] * 100:.2f} pts" if r["interval_s"] > 0 else ""
        lines.append(f"{r['label']:<13}{_interval(r['interval_s']):>9}"
                     f"{span(r['movielens_s']):>9}{r['syncs']:>7.1f}{r['rows_pushed']:>13,.0f}{r['requests']:>9,.0f}"
                     f"{r['labelled']:>10,.0f}{r['unknown_share']:>12.1%}   {r['auc_mean']:.4f} ± {r['auc_std']:.4f}"
                     f"{gain:>20}   " + " ".join(f"{a:.4f}" for a in r["auc"]))
    t = rows[-1]
    lines.append(f"{'trainer':<13}{'(its own AUC, each batch scored just before training on it)':<69}"
                 f"{t['auc_mean']:.4f} ± {t['auc_std']:.4f}"
                 f"{t['gain_mean'] * 100:>+14.2f} ± {t['gain_std'] * 100:.2f} pts   "
                 + " ".join(f"{a:.4f}" for a in t["auc"]))
    lines.append(f"(means over {n} repeat{'s' if n > 1 else ''}; syncs and rows pushed during the paced window)")
    return lines


def _interval(s: float) -> str:
    return "none" if s <= 0 else f"{s:g} s"


def user_lines(res: dict) -> list:
    """AUC on requests by users the warm-up saw and by users new to the window."""
    rows = summary_rows(res)[:-1]
    share = np.mean([r["known_user_share"] for r in res["repeats"]])
    lines = [f"{'arm':<13}{f'users in the warm-up ({share:.1%})':>30}"
             f"{f'users new to the window ({1 - share:.1%})':>34}"]
    for r in rows:
        lines.append(f"{r['label']:<13}{r['auc_known']:>30.4f}{r['auc_new']:>34.4f}")
    return lines


def ids_lines(res: dict) -> list:
    """Each arm against the frozen arm on the same requests, split by whether
    the arm's serving PS held every id of the request (pooled shares and
    mean AUCs over repeats)."""
    reps = res["repeats"]
    lines = [f"{'arm':<13}{'all ids held: share':>21}{'AUC arm':>9}{'frozen':>8}{'some id missing: share':>25}"
             f"{'AUC arm':>9}{'frozen':>8}"]
    for a in res["arms"]:
        if a["interval_s"] <= 0:
            continue
        cells = ""
        for k in ("all_found", "some_missing"):
            d = [r["arms"][a["name"]]["by_ids"][k] for r in reps]
            cells += (f"{np.mean([x['share'] for x in d]):>{21 if k == 'all_found' else 25}.1%}"
                      f"{np.nanmean([x['auc'] for x in d]):>9.4f}{np.nanmean([x['frozen_auc'] for x in d]):>8.4f}")
        lines.append(f"{Arm(a['name'], a['interval_s']).label:<13}" + cells)
    return lines


def tenths(res: dict) -> tuple[list, dict]:
    """(event ms where each tenth of the labelled requests starts, in the
    first repeat; arm -> AUC per tenth, mean over repeats)."""
    reps = res["repeats"]
    return reps[0]["tenth_start_ms"], {a["name"]: np.nanmean([r["arms"][a["name"]]["tenths"] for r in reps], axis=0)
                                       for a in res["arms"]}


def check_lines(res: dict) -> list:
    """What makes the figure the serving model's, before the action."""
    reps = res["repeats"]
    acts = sum(r["scored_before_action"]["actions"] for r in reps)
    before = sum(r["scored_before_action"]["before"] for r in reps)
    gap = min(r["scored_before_action"]["min_gap_s"] for r in reps)
    lab = sum(r["scored_before_label"]["labelled"] for r in reps)
    lab_before = sum(r["scored_before_label"]["before"] for r in reps)
    frozen = [f for r in reps for f in r["frozen"].values()]
    late = max(r["late_s"]["p99"] for r in reps), max(r["late_s"]["max"] for r in reps)
    score = [r["score_ms"] for r in reps]
    joined = {k: sum(r["joiner"][k] or 0 for r in reps) for k in reps[0]["joiner"]}
    return [
        f"joiner, all repeats: {joined['positives']:,} positives, {joined['negatives']:,} negatives kept "
        f"({joined['negatives_sampled_out']:,} sampled out), {joined['late_actions']:,} late actions, "
        f"{joined['dead_letters']} dead letters",
        f"scored before the action was produced: {before:,} of {acts:,} rated requests (smallest lead "
        f"{gap * 1e3:.2f} ms); before its example was read from the examples topic: {lab_before:,} of {lab:,} labelled",
        f"frozen arm: rows unchanged from its warm-start copy to the end in {sum(f['rows_unchanged'] for f in frozen)} "
        f"of {len(frozen)} repeats ({frozen[0]['rows_found']:,} rows looked up); pushes applied at the start and "
        f"the end of the window: {', '.join('/'.join(map(str, f['pushes_applied'])) for f in frozen)}; dense params "
        f"unchanged in {sum(f['dense_unchanged'] for f in frozen)} of {len(frozen)}",
        f"pacing: a request is scored {late[0] * 1e3:.0f} ms after it is due at p99 (ticks of 50 ms), "
        f"{late[1] * 1e3:.0f} ms at worst; scoring a tick on every predictor "
        f"p50 {np.mean([s['p50'] for s in score]):.1f} ms, p99 {np.mean([s['p99'] for s in score]):.1f} ms "
        f"({np.mean([s['n'] for s in score]):,.0f} batches a repeat)"]


def plot(res: dict, path: str, title: str) -> None:
    """Left: AUC against the sync interval (mean ± std over repeats), the
    frozen arm and the trainer's own AUC as bands. Middle: the gain over
    the frozen arm, paired by repeat. Right: AUC by tenth of the window."""
    import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary_rows(res)
    arms = [r for r in rows if r["interval_s"] and r["interval_s"] > 0]
    frozen = next(r for r in rows if r["interval_s"] is not None and r["interval_s"] <= 0)
    own = rows[-1]
    fig, (ax, gx, bx) = plt.subplots(1, 3, figsize=(18, 5))
    x = np.array([r["interval_s"] for r in arms])
    ticks = [f"{v:g} s\n{span(v * res['speed'])}" for v in x]
    ax.errorbar(x, [r["auc_mean"] for r in arms], yerr=[r["auc_std"] for r in arms], fmt="-o", color="tab:blue",
                capsize=3, label="online: serving model (mean ± std)")
    for r, color, name in ((frozen, "tab:red", "frozen after the warm start"),
                           (own, "tab:green", "trainer's own AUC (no sync delay)")):
        ax.axhline(r["auc_mean"], color=color, ls="--", label=name)
        ax.axhspan(r["auc_mean"] - r["auc_std"], r["auc_mean"] + r["auc_std"], color=color, alpha=0.12)
    gx.axhline(0.0, color="tab:red", ls="--", label="frozen")
    gx.axhline(own["gain_mean"] * 100, color="tab:green", ls="--", label="trainer's own")
    for k in range(len(res["repeats"])):
        gx.plot(x, [(r["auc"][k] - frozen["auc"][k]) * 100 for r in arms], "-o", color="tab:blue", alpha=0.35, ms=3,
                lw=0.8, label="each repeat" if k == 0 else None)
    gx.errorbar(x, [r["gain_mean"] * 100 for r in arms], yerr=[r["gain_std"] * 100 for r in arms], fmt="-o",
                color="tab:blue", capsize=3, lw=2, label="mean ± std")
    for axis, ylabel in ((ax, "AUC, each request scored before its action"), (gx, "AUC gain over frozen, points")):
        axis.set_xscale("log")
        axis.set_xticks(x)
        axis.set_xticklabels(ticks)
        axis.minorticks_off()
        axis.set_xlabel(f"sync interval: wall s / MovieLens time ({res['speed']:g} event s per wall s)")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    starts, by_arm = tenths(res)
    labels = [datetime.datetime.fromtimestamp(t / 1000, datetime.timezone.utc).strftime("%m-%d %H:%M")
              if t is not None else "" for t in starts]
    cmap = plt.get_cmap("viridis")
    for k, r in enumerate(arms):
        bx.plot(range(SEGMENTS), by_arm[r["name"]], "-o", ms=3, color=cmap(k / max(len(arms) - 1, 1)), label=r["label"])
    bx.plot(range(SEGMENTS), by_arm[frozen["name"]], "--", color="tab:red", label="frozen")
    bx.set_xticks(range(SEGMENTS))
    bx.set_xticklabels(labels, rotation=45, fontsize=7)
    bx.set_xlabel("tenth of the window (first request, MovieLens time, UTC)")
    bx.set_ylabel("AUC (mean over repeats)")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
