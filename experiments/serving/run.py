"""The serving benchmark's parts: freshness and sync cost on the live loop, then serving speed.

freshness(): the MovieLens-1M replay, paced at a steady rate, into the
embedded Kafka cluster -> joiner process (positives emitted on the action)
-> trainer process (pushes touched rows every second, dense params every
10 s, to a serving PS process) -> predictor process. Among the replayed
requests, a probe every `probe_every_s` on average (each gap drawn
uniformly from 0.5x to 1.5x of it, seeded, so the probes fall at every
phase of the sync ticks rather than at a few fixed ones): a request for a
user id nobody has seen, then its positive action. A prober asks the predictor for that user
every 10 ms; the probe's freshness is the time from producing the action to
the first answer that uses the user's trained row (the reply's `unknown`
count drops to 0: only the trained, pushed row can make it so).

The trainer runs with no idle timeout: the loop stops it (SIGTERM) once the
replay is over, the joiner has flushed and exited, and the trainer's group
has committed every example on the topic. (An idle timeout in the trainer
could end it before the first example: the loop starts the predictor and
the joiner after the trainer, and the trainer's idle clock started on the
partition-EOF events it got on subscribing, so on a busy machine it left
after ~8 s with 0 examples.) A run in which no example was trained or no
probe was served raises `NothingServed`, naming what is missing.

serving(): the predictor under a closed loop of requests (real MovieLens
users and movies), batch 1 and 256, first with no syncs arriving, then
with a sync-load process pushing touched rows every second (as many as the
live loop touched per sync) and dense params every 10 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from monolith_jax.stream import kafka as K
from monolith_jax.examples.movielens import replay as R

ROW_DIM = 9  # the MovieLens DeepFM's table: dim 8 + the first-order weight


def start(cmd: list, marker: str, lines: list | None = None, timeout_s: float = 120.0):
    """Starts a process and waits for its `marker ... HOST:PORT` line;
    returns (process, port). Later output lines go to `lines`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            port = int(line.strip().rsplit(":", 1)[1])
            sink = [] if lines is None else lines
            threading.Thread(target=lambda: sink.extend(proc.stdout), daemon=True).start()
            return proc, port
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not start:\n" + "".join(seen[-20:]))


def stop(*procs) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
    for p in procs:
        if p is not None:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def cpu_seconds(pid: int | str = "self", by_thread: bool = False) -> dict:
    """CPU seconds of a process (Linux /proc; {} elsewhere), or per thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task") if by_thread else [None]
        for tid in tasks:
            base = f"/proc/{pid}/task/{tid}" if tid else f"/proc/{pid}"
            with open(base + "/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(base + "/comm") as f:
                name = f.read().strip() if tid else "process"
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        return {}
    return out


def percentiles(xs) -> dict:
    xs = np.asarray(xs, np.float64)
    if not xs.size:
        return {"n": 0}
    return {"n": int(xs.size), "p50": float(np.percentile(xs, 50)), "p90": float(np.percentile(xs, 90)),
            "p99": float(np.percentile(xs, 99)), "max": float(xs.max())}


class NothingServed(RuntimeError):
    """The live loop trained no example or served no probe: it measured nothing."""


def nothing_served(trained: dict, produced: dict, served: int, missed: int, logs: dict) -> str | None:
    """Why a run measured no freshness (None when it did): no example trained, or no probe served."""
    if trained.get("examples", 0) and served:
        return None
    what = ("the trainer trained no example" if not trained.get("examples", 0) else
            f"no probe was served ({missed} of {produced.get('probes', 0)} probes missed)")
    tails = "".join(f"\n--- {name} (last lines):\n" + "".join(lines[-8:]) for name, lines in logs.items() if lines)
    return (f"the live loop measured no freshness: {what}; {produced.get('messages', 0):,} messages and "
            f"{produced.get('probes', 0)} probes were produced in {produced.get('seconds', 0.0):.0f} s, the trainer "
            f"trained {trained.get('examples', 0):,} examples in {trained.get('seconds', 0.0):.0f} s.{tails}")


def wait_trained(bootstrap: str, group: str, topic: str, trainer, joiner, timeout_s: float = 120.0,
                 logs: dict | None = None) -> bool:
    """Waits until the joiner has exited (the replay is over and its windows
    are flushed) and the trainer's group has committed every message of the
    examples topic: True; False if `timeout_s` passes first. Raises if the
    trainer exits on its own."""
    from confluent_kafka import Consumer, TopicPartition

    def check_trainer():
        if trainer.poll() is not None:
            raise RuntimeError(f"the trainer exited (status {trainer.returncode}) before the loop stopped it:\n"
                               + "".join((logs or {}).get("trainer", [])[-20:]))

    deadline = time.monotonic() + timeout_s
    while joiner.poll() is None and time.monotonic() < deadline:
        check_trainer()
        time.sleep(0.2)
    # Without subscribing, this consumer only reads the group's committed offsets: it joins no group.
    consumer = Consumer(K.consumer_config(bootstrap, group, **{"enable.auto.commit": False}))
    try:
        parts = [TopicPartition(topic, p) for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions]
        while True:
            check_trainer()
            ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
            done = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
            if all(done[p] >= end for p, end in ends.items() if end > 0):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
    finally:
        consumer.close()


class Prober:
    """Asks the predictor, every `every_s`, for the users of the probes whose
    action went out and are not yet served; records action -> served. For
    the breakdown it also notes when each probe's example reaches the
    examples topic (a watcher reads it in its own group) and when the
    probe's row reaches the serving PS (asked directly)."""

    def __init__(self, address: str, ps_address: str, bootstrap: str, group: str, every_s: float = 0.01,
                 give_up_s: float = 30.0):
        from confluent_kafka import Consumer

        from monolith_jax.rpc import serving_pb2_grpc as pbg
        from monolith_jax.serving.predictor import PredictorClient
        from monolith_jax.rpc.wire import channel

        self.client = PredictorClient(address)
        self._ps_channel = channel(ps_address)
        self._ps = pbg.ServingPSStub(self._ps_channel)
        self.every_s, self.give_up_s = every_s, give_up_s
        self.pending: dict = {}   # probe -> (user key, wall time the action was produced)
        self.latency: dict = {}   # probe -> seconds
        self.stages: dict = {}    # probe -> {"example": s, "serving_ps": s} after the action
        self.missed: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = Consumer(K.consumer_config(bootstrap, group, **{"enable.auto.commit": False}))
        self._consumer.subscribe([K.TOPICS["examples"]])
        self._threads = [threading.Thread(target=self._run, daemon=True),
                         threading.Thread(target=self._watch, daemon=True)]
        for t in self._threads:
            t.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            msgs = self._consumer.consume(num_messages=500, timeout=0.01)
            if not msgs:
                continue
            now = time.time()
            with self._lock:
                wanted = [(p, int(k).to_bytes(8, "little"), t) for p, (k, t) in self.pending.items()  # ids: fixed64
                          if "example" not in self.stages.get(p, {})]
            for m in msgs:
                value = m.value()
                if m.error() is not None or not value:
                    continue
                for probe, pattern, t_act in wanted:
                    if pattern in value:
                        with self._lock:
                            self.stages.setdefault(probe, {})["example"] = now - t_act
        self._consumer.close()

    def _request(self, keys: np.ndarray) -> dict:
        """The probe users' ids, every other feature present with no ids."""
        ids = {f.source: (np.zeros(0, np.uint64), np.zeros(keys.size, np.int32)) for f in R.movielens_features()}
        ids["user"] = (keys, np.ones(keys.size, np.int32))
        return ids

    def check_unknown(self, key) -> int:
        out = self.client.predict_arrays(self._request(np.array([key], np.uint64)))
        return int(out["unknown"][0])

    def add(self, probe: int, key, t_action: float) -> None:
        with self._lock:
            self.pending[probe] = (key, t_action)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                items = list(self.pending.items())[:256]
            if not items:
                continue
            from monolith_jax.rpc import serving_pb2 as pb

            keys = np.array([k for _, (k, _) in items], np.uint64)
            user = next(f for f in R.movielens_features() if f.name == "user")
            rows = user.keys(keys)  # the table keys of the user feature's ids
            found = np.frombuffer(self._ps.Lookup(pb.LookupRequest(table="ids", keys=rows.tobytes())).found, np.uint8)
            t_ps = time.time()
            out = self.client.predict_arrays(self._request(keys))
            now = time.time()
            with self._lock:
                for (probe, (_, t_act)), unknown, on_ps in zip(items, out["unknown"], found):
                    if on_ps and "serving_ps" not in self.stages.get(probe, {}):
                        self.stages.setdefault(probe, {})["serving_ps"] = t_ps - t_act
                    if unknown == 0:
                        self.latency[probe] = now - t_act
                        del self.pending[probe]
                    elif now - t_act > self.give_up_s:
                        self.missed.append(probe)
                        del self.pending[probe]

    def finish(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.missed.extend(self.pending)
        self.client.close()
        self._ps_channel.close()


def _probe_features(key, item_chunk: bytes, rid: str, t_ms: int) -> bytes:
    from monolith_jax.stream import messages_pb2 as pb

    rec = pb.FeatureRecord(version=1, request_id=rid, event_time_ms=t_ms)
    rec.sparse.add(name="user", ids=[int(key)])
    for name in ("age", "gender", "occupation"):  # a new user: present, with no ids
        rec.sparse.add(name=name, ids=[])
    return rec.SerializeToString() + item_chunk


def produce_paced(bootstrap: str, stream, rate: float, seconds: float, prober: Prober, probe_every_s: float,
                  run_id: str, warmup_s: float, out=print) -> dict:
    """The replay at `rate` messages/s for `seconds`, with probes; returns counts."""
    from confluent_kafka import Producer

    from monolith_jax.stream import messages_pb2 as pb
    from monolith_jax.sparse.keys import hash_strings

    # The bulk goes in batches of up to 50 ms (as many clients' producers
    # would send it; it also keeps the embedded cluster's per-fetch scan of
    # its message sets short); each probe is flushed as it is produced.
    producer = Producer(K.producer_config(bootstrap, **{"linger.ms": 50}))
    t0 = time.monotonic()
    next_probe = t0 + warmup_s
    # Gaps of 0.5-1.5x probe_every_s: a fixed gap that divides the sync interval
    # would meet the (fixed-rate) sync ticks at the same few phases all run long.
    gaps = np.random.default_rng(20240607)
    sent = probes = 0
    event_ms = 0
    for kind, rid, value, t in stream.messages():
        now = time.monotonic()
        if now - t0 > seconds:
            break
        ahead = t0 + sent / rate - now
        if ahead > 0:
            producer.poll(0)
            time.sleep(ahead)
        K.produce(producer, K.TOPICS[kind], value, rid)
        sent += 1
        event_ms = max(event_ms, t)
        if time.monotonic() >= next_probe:
            next_probe += probe_every_s * gaps.uniform(0.5, 1.5)
            key = hash_strings([f"probe-user:{run_id}:{probes}"])[0]
            if prober.check_unknown(key) != 1:
                raise RuntimeError("a probe user is already known: the probe would measure nothing")
            prid = f"probe-{run_id}-{probes}"
            item = stream.item_chunk[int(stream._item[sent % stream.n_ratings])]
            K.produce(producer, K.TOPICS["features"], _probe_features(key, item, prid, event_ms), prid)
            producer.flush(5)  # the features are in Kafka before the action
            action = pb.Action(version=1, request_id=prid, event_time_ms=event_ms + 1, type="rate",
                               value=5.0).SerializeToString()
            t_action = time.time()
            K.produce(producer, K.TOPICS["actions"], action, prid)
            producer.flush(5)
            prober.add(probes, key, t_action)
            probes += 1
    producer.flush(30)
    return {"messages": sent, "probes": probes, "seconds": time.monotonic() - t0}


def freshness(ratings, rate: float = 3000.0, seconds: float = 120.0, sync_interval_s: float = 1.0,
              dense_interval_s: float = 10.0, probe_every_s: float = 0.25, warmup_s: float = 15.0,
              workdir: str | None = None, out=print, keep_serving=None, bootstrap: str | None = None,
              one_hop: bool = False) -> dict:
    """Runs the live loop with probes. With `keep_serving(ps_port, predictor_port)`,
    calls it after the loop (trainer done, serving still up) before tearing down.
    one_hop: no serving PS; the predictor holds the tables (`--tables local`)
    and the trainer pushes to it (ps_port is then the predictor's)."""
    from monolith_jax.examples.movielens.loop import joiner_command
    from monolith_jax.online.demo import free_port

    workdir = workdir or tempfile.mkdtemp(prefix="monolith-serving-")
    model_dir = os.path.join(workdir, "model")
    summary_path = os.path.join(workdir, "trainer.json")
    run_id = f"{os.getpid()}-{int(time.time())}"
    group = f"serving-bench-{run_id}"
    procs: list = []
    logs = {"ps": [], "trainer": [], "predictor": [], "joiner": []}
    import contextlib

    with (contextlib.nullcontext() if bootstrap else K.EmbeddedKafka()) as kafka:
        bootstrap = bootstrap or kafka.bootstrap
        K.ensure_topics(bootstrap, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        try:
            if one_hop:  # the predictor's port, known before it starts: the trainer pushes there
                ps_port = free_port()
            else:
                ps, ps_port = start([sys.executable, "-m", "monolith_jax.serving.serving_ps", "--table",
                                     f"ids:{ROW_DIM}"], "listening on", logs["ps"])
                procs.append(ps)
            ps_addr = f"127.0.0.1:{ps_port}"
            trainer = subprocess.Popen(
                [sys.executable, "-m", "monolith_jax.online.train", "--job", "monolith_jax.examples.movielens.job:job", "--bootstrap", bootstrap, "--group",
                 group + "-trainer", "--batch", "1024", "--max-wait", "0.1",
                 "--serving-ps", ps_addr, "--sync-interval", str(sync_interval_s),
                 "--dense-sync-interval", str(dense_interval_s), "--export", model_dir, "--summary", summary_path],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
            procs.append(trainer)
            threading.Thread(target=lambda: logs["trainer"].extend(trainer.stdout), daemon=True).start()
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(model_dir, "params.npz")):
                if trainer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the trainer wrote no export:\n" + "".join(logs["trainer"][-20:]))
                time.sleep(0.2)
            pred, pred_port = start([sys.executable, "-m", "monolith_jax.serving.predictor", "--model", model_dir,
                                     *(["--tables", "local", "--port", str(ps_port)] if one_hop else
                                       ["--serving-ps", ps_addr])], "listening on", logs["predictor"])
            procs.append(pred)
            joiner = subprocess.Popen(
                joiner_command(bootstrap, 60.0, 0.5, group + "-joiner", emit_positives="on_action"),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
            procs.append(joiner)
            threading.Thread(target=lambda: logs["joiner"].extend(joiner.stdout), daemon=True).start()
            stream = R.MovieLensStream(ratings, 1.0, limit=int(rate * seconds / 2) + 1000)
            prober = Prober(f"127.0.0.1:{pred_port}", ps_addr, bootstrap, group + "-watcher")
            out(f"replaying at {rate:,.0f} messages/s for {seconds:.0f} s, a probe every {probe_every_s} s "
                f"after {warmup_s:.0f} s; sparse sync every {sync_interval_s} s, dense every {dense_interval_s} s")
            names = ("trainer", "predictor", "joiner") if one_hop else ("ps", "trainer", "predictor", "joiner")
            cpu0 = {"bench": cpu_seconds(by_thread=True), **{name: cpu_seconds(p.pid) for name, p in
                                                               zip(names, procs)}}
            produced = produce_paced(bootstrap, stream, rate, seconds, prober, probe_every_s, run_id, warmup_s, out)
            cpu1 = {"bench": cpu_seconds(by_thread=True), **{name: cpu_seconds(p.pid) for name, p in
                                                               zip(names, procs)}}
            cpu = {f"{name}/{k}": round((v - cpu0[name].get(k, 0.0)) / produced["seconds"], 3)
                   for name in cpu1 for k, v in cpu1[name].items() if v - cpu0[name].get(k, 0.0) > 0.01}
            prober.finish(wait_s=30)
            # The loop, not an idle timeout, ends training (see the module's docstring).
            if not wait_trained(bootstrap, group + "-trainer", K.TOPICS["examples"], trainer, joiner, logs=logs):
                out("warning: the trainer had not trained the whole examples topic 120 s after the replay; "
                    "stopping it")
            trainer.terminate()
            trainer.wait(120)
            with open(summary_path, encoding="utf-8") as f:
                trained = json.load(f)
            why = nothing_served(trained, produced, len(prober.latency), len(prober.missed), logs)
            if why:
                raise NothingServed(why)
            if keep_serving is not None:
                extra = keep_serving(ps_port, pred_port, trained)
            else:
                extra = None
        finally:
            stop(*reversed(procs))
    lat = list(prober.latency.values())
    stages = {name: percentiles([st[name] for st in prober.stages.values() if name in st])
              for name in ("example", "serving_ps")}
    # What follows Kafka: example in the topic -> prediction using the row.
    stages["example_to_served"] = percentiles([prober.latency[p] - st["example"] for p, st in prober.stages.items()
                                               if "example" in st and p in prober.latency])
    return {"cores_used": cpu, "stages_s": stages, "probe_stages": prober.stages, "log_tails": {k: v[-5:] for k, v in logs.items()},"rate": rate, "seconds": seconds, "one_hop": one_hop, "sync_interval_s": sync_interval_s, "dense_interval_s": dense_interval_s,
            "produced": produced, "freshness_s": percentiles(lat), "missed_probes": len(prober.missed),
            "latencies": lat, "trained": {k: v for k, v in trained.items() if k != "sync_history"},
            "sync_cost": sync_cost(trained["sync_history"]), "serving": extra}


def sync_cost(history: list, row_dim: int = ROW_DIM) -> dict:
    """Per delta push: bytes sent over touched rows x (key + values), and
    over a full copy of the tables at that moment."""
    row_bytes = 8 + 4 * row_dim
    deltas = [h for h in history if not h["full"] and h["rows"] > 0]
    if not deltas:
        return {"pushes": 0}
    rows = np.array([h["rows"] for h in deltas], np.float64)
    sent = np.array([h["bytes"] for h in deltas], np.float64)
    full = np.array([h["table_rows"] for h in deltas], np.float64) * row_bytes
    return {"pushes": len(deltas), "row_bytes": row_bytes, "rows_per_sync_median": float(np.median(rows)),
            "bytes_per_sync_median": float(np.median(sent)),
            "over_touched_median": float(np.median(sent / (rows * row_bytes))),
            "over_touched_max": float(np.max(sent / (rows * row_bytes))),
            "over_touched_total": float(sent.sum() / (rows.sum() * row_bytes)),
            "full_copy_bytes_median": float(np.median(full)),
            "share_of_full_copy_median": float(np.median(sent / full))}


def request_batches(ratings, batch: int, count: int, seed: int = 0) -> list:
    """`count` batches of real requests (a rated user and movie each), as
    feature -> (flat uint64 ids, int32 lengths)."""
    users, items = R.entity_keys(ratings)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        idx = rng.integers(0, len(ratings), batch)
        u, m = ratings.user[idx], ratings.item[idx]
        ids = {name: (keys[u], np.ones(batch, np.int32)) for name, keys in users.items()}
        ids.update({name: (items[name][m], np.ones(batch, np.int32)) for name in ("movie", "year")})
        genres = [items["genres"][i] for i in m]
        ids["genres"] = (np.concatenate(genres), np.array([g.size for g in genres], np.int32))
        out.append(ids)
    return out


def closed_loop(address: str, batches: list, seconds: float) -> dict:
    """One client, one request at a time, for `seconds`: predictions/s and latency."""
    from monolith_jax.serving.predictor import PredictorClient

    client = PredictorClient(address)
    for ids in batches[:5]:
        client.predict_arrays(ids)  # warm the connection
    lat, n = [], 0
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        ids = batches[i % len(batches)]
        s = time.perf_counter()
        out = client.predict_arrays(ids)
        lat.append(time.perf_counter() - s)
        n += out["probabilities"].size
        i += 1
    elapsed = time.perf_counter() - t0
    client.close()
    return {"predictions_per_s": n / elapsed, "requests": len(lat), **{k: v * 1e3 if k != "n" else v
                                                                       for k, v in percentiles(lat).items()}}


def save_keys(ratings, directory: str) -> str:
    """Writes the table keys of every MovieLens id (each feature's id space) to keys.npy; returns its path."""
    users, items = R.entity_keys(ratings)
    keys_path = os.path.join(directory, "keys.npy")
    feats = {f.name: f for f in R.movielens_features()}
    np.save(keys_path, np.unique(np.concatenate([feats[n].keys(v) for n, v in users.items()] +
                                                [feats[n].keys(items[n]) for n in ("movie", "year")] +
                                                [feats["genres"].keys(np.concatenate(items["genres"]))])))
    return keys_path


def serving(ratings, ps_port: int, pred_port: int, rows_per_sync: int, seconds: float = 10.0,
            out=print, interval_s: float = 1.0) -> dict:
    """Batch 1 and 256 through the predictor, without and with syncs arriving
    (pushed to `ps_port`: the serving PS, or a one-hop predictor itself)."""
    address = f"127.0.0.1:{pred_port}"
    keys_path = save_keys(ratings, tempfile.mkdtemp(prefix="monolith-sync-load-"))
    result = {}
    for label in ("no_syncs", "syncs"):
        load = None
        if label == "syncs":
            load, _ = start([sys.executable, "-m", "experiments.serving.sync_load", "--serving-ps",
                             f"127.0.0.1:{ps_port}", "--rows", str(rows_per_sync), "--keys", keys_path,
                             "--interval", str(interval_s)],
                            "pushing to")
            time.sleep(3)  # its first (full) push is in; deltas from here on
        try:
            for batch in (1, 256):
                r = closed_loop(address, request_batches(ratings, batch, 64, seed=batch), seconds)
                result[f"{label}/batch{batch}"] = r
                out(f"  {label:>8}  batch {batch:>3}: {r['predictions_per_s']:>9,.0f} predictions/s  "
                    f"p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms")
        finally:
            if load is not None:
                stop(load)
                result["sync_load"] = load.returncode
    return result
