"""The whole loop of a job, on one machine, for a few minutes:

    monolith demo --job MODULE:NAME [--data LOG ...] [--seconds 150] [--rate 2000]

    replay (here, paced) --> Kafka (embedded) --> joiner (process) --> examples
      --> online trainer (process: snapshots every few seconds, touched rows
          to the serving PS every second, dense params every few)
      --> serving PS (process) --> predictor (process) <-- this process's client

While the stream plays, a client sends the requests just replayed to the
predictor (latency), and freshness probes: a request of a never-seen id
and its positive action, polled at the predictor until its answer uses the
id's trained row (event -> prediction that uses it). Part way through, the
trainer is SIGKILLed and started again: it resumes from its newest
snapshot, and the examples it trains add up to the joiner's, exactly. A
frozen copy (the newest snapshot when the kill happens, never synced
again) scores the same requests, for the AUC an online model gains. The
end is a short summary and one PNG (AUC over the stream, freshness).

`--quick` plays 40 s. With no Kafka given, librdkafka's built-in cluster
runs inside this process; `--bootstrap` uses a real one.
"""

from __future__ import annotations

import argparse
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

from monolith_jax.stream import kafka as K

log = logging.getLogger("monolith_jax.online.demo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose output goes to a log file and, line by line, to `on_line`."""

    def __init__(self, name: str, argv: list, run_dir: str, on_line=None, env=None):
        self.name, self.argv = name, argv
        self.log_path = os.path.join(run_dir, f"{name}.log")
        self.lines: list = []
        self.on_line = on_line
        self._log = open(self.log_path, "a", encoding="utf-8")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env or {**os.environ, "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            self.lines.append(line)
            if self.on_line is not None:
                self.on_line(line)

    def wait_for(self, text: str, timeout_s: float = 180.0) -> str:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if text in line:
                    return line
            seen = len(self.lines)
            if self.proc.poll() is not None and seen == len(self.lines):
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not say {text!r}; see {self.log_path}:\n" + "".join(self.lines[-20:]))

    def address(self) -> str:
        return self.wait_for(" listening on ").split(" listening on ")[1].split()[0]

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        self._log.close()


class Tap:
    """What the replayer produced, for the client: the newest features
    messages (the requests to score) and each request's label by the job's
    rule (a positive action within the window)."""

    def __init__(self, labels, keep: int = 2000):
        self.rule = labels
        self.recent: list = []
        self.base = 0  # how many features messages came before recent[0]
        self.keep = keep
        self.positive: set = set()
        self.event_ms = 0
        self.lock = threading.Lock()

    def __call__(self, kind, rid, value, t):
        with self.lock:
            self.event_ms = max(self.event_ms, t)
            if kind == "features":
                self.recent.append((rid, value))
                if len(self.recent) > 2 * self.keep:
                    del self.recent[: self.keep]
                    self.base += self.keep
            else:
                from monolith_jax.stream.messages import parse_action

                act = parse_action(value)
                if act.type in self.rule.positive and act.value >= self.rule.min_value:
                    self.positive.add(rid)

    def newest(self):
        with self.lock:
            return self.recent[-1] if self.recent else None

    def since(self, n: int, limit: int) -> tuple[list, int]:
        """Up to `limit` of the newest features messages after the n-th; the new n."""
        with self.lock:
            end = self.base + len(self.recent)
            start = max(n, end - limit, self.base)
            return self.recent[start - self.base:], end


def request_arrays(job, values: list) -> tuple[dict, np.ndarray]:
    """FeatureRecord bytes -> the predictor's (ids by source, dense) arrays."""
    from monolith_jax.stream.messages import parse_features

    recs = [parse_features(v, job.dense) for v in values]
    ids = {}
    for f in job.sparse:
        per = [next((list(s.ids) for s in r.sparse if s.name == f.source), []) for r in recs]
        ids[f.source] = (np.array([k for p in per for k in p], np.uint64), np.array([len(p) for p in per], np.int32))
    dense = np.array([[next((d.values[0] for d in r.dense if d.name == f.source), np.nan) for f in job.dense]
                      for r in recs], np.float32).reshape(len(recs), len(job.dense))
    for k, f in enumerate(job.dense):  # the trainer's rule: a declared fill, else the value must be there
        if f.fill is not None:
            dense[~np.isfinite(dense[:, k]), k] = f.fill
    return ids, dense


class Client:
    """Scores the newest replayed request every `interval_s` (latency, the
    online model's score) and sends freshness probes every `probe_every_s`.
    A probe is missed when its row is not served within `probe_timeout_s`:
    longer than the trainer's SIGKILL, restart and catch-up take on a busy
    machine (tens of seconds), so a miss is a row that never came."""

    def __init__(self, job, address: str, bootstrap: str, tap: Tap, topics: dict, interval_s: float = 0.05,
                 probe_every_s: float = 1.0, probe_timeout_s: float = 120.0, seed: int = 0, max_batch: int = 64):
        from monolith_jax.serving.predictor import PredictorClient

        self.job, self.tap, self.topics = job, tap, topics
        self.client = PredictorClient(address)
        self.bootstrap = bootstrap
        self.interval_s, self.probe_every_s, self.probe_timeout_s = interval_s, probe_every_s, probe_timeout_s
        self.scored: list = []       # (rid, probability, wall time, FeatureRecord bytes)
        self.latency_ms: list = []   # per call (a batch of the requests since the last one)
        self.freshness: list = []    # (wall time, seconds)
        self.missed = 0
        self.errors = 0
        self.probes = 0              # probes produced (each a request and its positive action)
        self._probes: list = []      # (deadline, t_action, ids, dense)
        self._rng = np.random.default_rng(seed)
        self.max_batch = max_batch
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monolith-demo-client", daemon=True)

    def start(self):
        self._thread.start()

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def stop(self):
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(10)
        self.client.close()

    def _probe(self, producer) -> None:
        from monolith_jax.stream.messages import encode_action, parse_features

        newest = self.tap.newest()
        if newest is None:
            return
        rec = parse_features(newest[1], self.job.dense)
        first = self.job.sparse[0].source
        fresh = int(self._rng.integers(1, 2**63, dtype=np.int64))
        ids_of = {s.name: list(s.ids) for s in rec.sparse}
        del rec.sparse[:]
        for f in self.job.sparse:  # the newest request's ids, with a never-seen id for the first feature
            rec.sparse.add(name=f.source, ids=[fresh] if f.source == first else ids_of.get(f.source, []))
        rid = f"probe-{fresh:x}"
        rec.request_id = rid
        t = self.tap.event_ms
        rec.event_time_ms = t
        value = rec.SerializeToString()
        ids, dense = request_arrays(self.job, [value])
        K.produce(producer, self.topics["features"], value, rid)
        rule = self.job.labels
        K.produce(producer, self.topics["actions"],
                  encode_action(rid, t, rule.positive[0], max(1.0, rule.min_value)), rid)
        producer.flush(5)
        self.probes += 1
        now = time.monotonic()
        self._probes.append((now + self.probe_timeout_s, now, ids, dense))

    def _run(self) -> None:
        from confluent_kafka import Producer

        producer = Producer(K.producer_config(self.bootstrap, **{"linger.ms": 0}))
        next_probe = time.monotonic() + self.probe_every_s
        while not self._stop.wait(self.interval_s):
            try:
                new, self._seen = self.tap.since(self._seen, self.max_batch)
                if new:  # the requests served since the last tick, in one call
                    ids, dense = request_arrays(self.job, [v for _, v in new])
                    t0 = time.perf_counter()
                    out = self.client.predict_arrays(ids, dense, len(new))
                    self.latency_ms.append(1000 * (time.perf_counter() - t0))
                    now_s = time.time()
                    self.scored += [(rid, float(p), now_s, v) for (rid, v), p in zip(new, out["probabilities"])]
                now = time.monotonic()
                if now >= next_probe:
                    next_probe = now + self.probe_every_s
                    self._probe(producer)
                kept = []
                for deadline, t_act, ids, dense in self._probes:
                    if self.client.predict_arrays(ids, dense, 1)["unknown"][0] == 0:
                        self.freshness.append((time.time(), time.monotonic() - t_act))
                    elif time.monotonic() > deadline:
                        self.missed += 1
                    else:
                        kept.append((deadline, t_act, ids, dense))
                self._probes = kept
            except Exception as err:  # a restarting server: count and go on
                self.errors += 1
                log.debug("client: %s", err)
        producer.flush(5)


def percentiles(values) -> dict:
    a = np.asarray(values, np.float64)
    if not a.size:
        return {"n": 0}
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def frozen_copy(job, snapshot_dir: str):
    """The newest snapshot restored into a trainer here: the frozen copy."""
    from monolith_jax.snapshot import Snapshots

    trainer = job.make_trainer(log_every=0, out=None)
    snaps = Snapshots(snapshot_dir, read_only=True)
    try:
        meta = snaps.restore(trainer)
    finally:
        snaps.close()
    if meta is None:
        raise RuntimeError(f"no snapshot in {snapshot_dir}")
    return trainer, meta["step"]


def frozen_scores(job, trainer, values: list) -> np.ndarray:
    """Scores of FeatureRecords (bytes) by the frozen copy."""
    from monolith_jax.stream.messages import ExampleDecoder, encode_example

    decoder = ExampleDecoder(job.sparse, job.dense)
    out = []
    for s in range(0, len(values), 1024):
        chunk = [encode_example(v, 0.0, 1.0, 0) for v in values[s:s + 1024]]
        batch, info, bad = decoder.decode(chunk, 1024)
        if bad:
            raise RuntimeError(f"frozen copy: requests it cannot read: {bad[:3]}")
        out.append(trainer.predict(batch)[: info["rows"]])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def plot(path: str, online: list, frozen: list, freshness: list, kill_at: float | None) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if online:
        x = np.arange(1, len(online) + 1)
        a.plot(x, online, marker="o", label="online (synced every second)")
        a.plot(x, frozen, marker="s", label="frozen copy")
        a.set_xlabel("tenth of the requests scored after the copy")
        a.set_ylabel("AUC")
        a.set_title("AUC over the stream")
        a.legend()
    if freshness:
        t0 = freshness[0][0]
        b.plot([t - t0 for t, _ in freshness], [f for _, f in freshness], ".")
        if kill_at is not None:
            b.axvline(kill_at - t0, color="r", linestyle="--", label="trainer SIGKILLed")
            b.legend()
        b.set_xlabel("seconds")
        b.set_ylabel("event -> prediction using the trained row (s)")
        b.set_title("freshness")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(job_spec: str, data=None, seconds: float = 150.0, rate: float = 2000.0, kill_after: float = 0.5,
             bootstrap: str | None = None, run_dir: str | None = None, seed: int = 0, args=None,
             out=print) -> dict:
    from monolith_jax.job import load_job
    from monolith_jax.online.pipeline import joiner_command
    from monolith_jax.online.progress import Progress
    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.rpc import serving_pb2_grpc as pbg
    from monolith_jax.rpc.wire import channel
    from monolith_jax.stream.replay import job_messages, replay

    job = load_job(job_spec)
    if job.label_rules() is not None and len(job.heads) > 1:
        # Its freshness probe and AUC line read one probability per request.
        raise SystemExit(f"monolith demo runs jobs of one label; {job_spec} has the heads "
                         f"{[h.name for h in job.heads]}: run it with monolith replay, join, train, serving-ps "
                         "and predictor (the README's 'Several objectives' section)")
    run_dir = run_dir or tempfile.mkdtemp(prefix="monolith-demo-")
    os.makedirs(run_dir, exist_ok=True)
    messages = job_messages(job, data, args, getattr(args, "limit", None), seed)
    topics = dict(K.TOPICS)
    t_start = time.monotonic()
    embedded = None
    procs: list = []
    if not bootstrap:
        embedded = K.EmbeddedKafka()
        bootstrap = embedded.bootstrap
    progress = Progress(out)
    try:
        K.ensure_topics(bootstrap, {t: K.EMBEDDED_PARTITIONS for t in topics.values()})
        out(f"job {job.name!r}: Kafka at {bootstrap}{' (embedded)' if embedded else ''}; run folder {run_dir}")
        group = f"demo-{os.getpid()}-{int(time.time())}"
        joiner = Proc("joiner", joiner_command(bootstrap, group + "-joiner", job.labels, topics, idle_flush_s=8.0,
                                               emit_positives="on_action", job_spec=job_spec), run_dir)
        procs.append(joiner)
        ps_port = free_port()
        snaps, model = os.path.join(run_dir, "snapshots"), os.path.join(run_dir, "model")
        train_argv = [sys.executable, "-m", "monolith_jax.cli", "train", "--job", job_spec, "--bootstrap", bootstrap,
                      "--group", group + "-trainer", "--seed", str(seed), "--snapshot-dir", snaps,
                      "--snapshot-every-s", "5", "--serving-ps", f"127.0.0.1:{ps_port}", "--sync-interval", "1",
                      "--dense-sync-interval", "5", "--export", model, "--max-wait", "0.2",
                      "--idle-timeout", "12", "--summary", os.path.join(run_dir, "trainer.json")]
        stats: dict = {"reports": 0}

        def on_trainer_line(line):
            if line.startswith("trainer {"):
                stats.update(json.loads(line[len("trainer "):]))
                stats["reports"] += 1

        progress.status("compiling the trainer's steps")
        trainer = Proc("trainer", train_argv, run_dir, on_trainer_line)
        procs.append(trainer)
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(model, "spec.json")):
            if trainer.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the trainer did not export its model; see " + trainer.log_path)
            time.sleep(0.1)
        serving = Proc("serving-ps", [sys.executable, "-m", "monolith_jax.cli", "serving-ps", "--model", model,
                                      "--port", str(ps_port)], run_dir)
        procs.append(serving)
        serving.address()
        predictor = Proc("predictor", [sys.executable, "-m", "monolith_jax.cli", "predictor", "--model", model,
                                       "--serving-ps", f"127.0.0.1:{ps_port}", "--port", "0"], run_dir)
        procs.append(predictor)
        pred_address = predictor.address()
        tap = Tap(job.labels)
        client = Client(job, pred_address, bootstrap, tap, topics, seed=seed)
        stop_replay = threading.Event()
        replayed: dict = {}
        replayer = threading.Thread(target=lambda: replayed.update(replay(
            bootstrap, messages, topics, rate=rate, report_every_s=0, stop=stop_replay, tap=tap)), daemon=True)
        progress.status("waiting for the trainer's first batch (compiling)")
        replayer.start()
        client.start()
        ps_stub = pbg.ServingPSStub(channel(f"127.0.0.1:{ps_port}"))
        killed, frozen_step, frozen = None, None, None
        total = len(messages) if hasattr(messages, "__len__") else None
        play_s = min(seconds, total / rate) if total and rate > 0 else seconds
        t_replay = time.monotonic()
        while True:
            now = time.monotonic()
            if now - t_replay >= seconds and not stop_replay.is_set():
                stop_replay.set()
            if killed is None and now >= t_replay + play_s * kill_after and _newest_step(snaps) is not None:
                trainer.stop(signal.SIGKILL)
                killed = time.time()
                progress.status(f"SIGKILL of the trainer at {now - t_replay:.0f} s; taking the frozen copy")
                frozen, frozen_step = frozen_copy(job, snaps)
                progress.status(f"frozen copy at snapshot step {frozen_step}; starting the trainer again")
                stats["reports"] = 0
                trainer = Proc("trainer", train_argv, run_dir, on_trainer_line)
                procs.append(trainer)
            # The stream is over and the resumed trainer has trained a while:
            # no more probes, so the trainer goes idle and exits.
            if killed is not None and not replayer.is_alive() and stats["reports"] >= 3 and client.running:
                client.stop()
            if trainer.proc.poll() is not None and killed is not None:
                break
            try:
                v = ps_stub.Version(pb.VersionRequest(), timeout=2)
                syncs = sum(v.applied.values())
            except Exception:
                syncs = None
            fresh = [f for _, f in client.freshness[-50:]]
            progress.update(seconds=now - t_replay, examples=stats.get("examples", 0),
                            rate=stats.get("examples_per_s", 0.0), auc=stats.get("running_auc"),
                            syncs=syncs, freshness=float(np.median(fresh)) if fresh else None,
                            predictions=len(client.scored))
            if trainer.proc.poll() is not None and killed is None:
                raise RuntimeError("the trainer exited early; see " + trainer.log_path)
            time.sleep(0.5)
        progress.close()
        client.stop()
        replayer.join(30)
        joiner.stop()
        joined = next((json.loads(line.split(" ", 2)[2]) for line in reversed(joiner.lines)
                       if line.startswith("joiner done ")), None)
        with open(os.path.join(run_dir, "trainer.json"), encoding="utf-8") as f:
            trained = json.load(f)
        # Online vs frozen, on the requests scored after the copy was taken.
        seen: set = set()
        kept, values = [], []
        for rid, p, t, value in client.scored:  # each request once, scored online after the copy was taken
            if killed is not None and t >= killed and rid not in seen:
                seen.add(rid)
                kept.append((rid, p))
                values.append(value)
        summary = {"seconds": time.monotonic() - t_start, "replayed": replayed, "joined": joined,
                   "trained": trained.get("examples"), "trainer": trained, "run_dir": run_dir}
        if kept and frozen is not None:
            from monolith_jax.metrics import auc

            y = np.array([rid in tap.positive for rid, _ in kept], np.float32)
            online = np.array([p for _, p in kept], np.float32)
            scores = frozen_scores(job, frozen, values)
            tenths = [(auc(a, b), auc(a, c)) for a, b, c in zip(np.array_split(y, 10), np.array_split(online, 10),
                                                                np.array_split(scores, 10))]
            summary.update({"auc_online": auc(y, online), "auc_frozen": auc(y, scores), "auc_requests": int(y.size),
                            "auc_tenths": tenths})
        summary.update({"freshness_s": percentiles([f for _, f in client.freshness]), "missed_probes": client.missed,
                        "probes": client.probes,
                        "predictions": len(client.scored), "latency_ms": percentiles(client.latency_ms),
                        "client_errors": client.errors, "killed": killed is not None,
                        "frozen_step": frozen_step})
        tenths = summary.get("auc_tenths", [])
        summary["png"] = plot(os.path.join(run_dir, "demo.png"), [a for a, _ in tenths], [b for _, b in tenths],
                              client.freshness, killed)
        with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, default=float, indent=1)
        return summary
    finally:
        progress.close()
        for p in reversed(procs):
            p.stop()
        if embedded is not None:
            embedded.close()


def _newest_step(folder: str):
    if not os.path.isdir(folder):
        return None
    steps = [int(d) for d in os.listdir(folder) if d.isdigit()]
    return max(steps) if steps else None


def print_summary(s: dict, out=print) -> None:
    j = s.get("joined") or {}
    examples = j.get("positives", 0) + j.get("negatives", 0)
    out("")
    out(f"demo done in {s['seconds']:.0f} s  (run folder {s['run_dir']})")
    out(f"  replayed   {s['replayed'].get('features', 0):,} requests, {s['replayed'].get('actions', 0):,} actions")
    out(f"  joined     {examples:,} examples ({j.get('positives', 0):,} positives, "
        f"{j.get('negatives', 0):,} negatives kept, {j.get('dead_letters', 0)} dead letters; "
        f"{s['probes']} of them freshness probes)")
    out(f"  trained    {s['trained']:,} examples"
        + (f" — the trainer was SIGKILLed and resumed from its snapshot; "
           f"{'every example trained once' if s['trained'] == examples else 'MISMATCH with the joiner'}"
           if s["killed"] else ""))
    if "auc_online" in s:
        out(f"  AUC        online {s['auc_online']:.4f} vs frozen copy {s['auc_frozen']:.4f} "
            f"({100 * (s['auc_online'] - s['auc_frozen']):+.2f} points, {s['auc_requests']:,} requests "
            "scored after the copy)")
    f = s["freshness_s"]
    if f.get("n"):
        out(f"  freshness  p50 {f['p50']:.2f} s, p99 {f['p99']:.2f} s over {f['n']} probes "
            f"(event -> prediction using the trained row; {s['missed_probes']} missed)")
    lat = s["latency_ms"]
    if lat.get("n"):
        out(f"  served     {s['predictions']:,} predictions in {lat['n']:,} calls of up to 64, latency per call "
            f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms")
    if s.get("png"):
        out(f"  plot       {s['png']}")


def main(argv=None) -> int:
    from monolith_jax.stream.replay import add_log_args

    p = argparse.ArgumentParser(prog="monolith demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--job", required=True, help="MODULE:NAME of the job to run")
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap.servers (default: embedded cluster)")
    add_log_args(p)
    p.add_argument("--seconds", type=float, default=150.0, help="seconds the stream plays")
    p.add_argument("--rate", type=float, default=2000.0, help="messages replayed per second")
    p.add_argument("--kill-after", type=float, default=0.5, help="share of the play after which the trainer is killed")
    p.add_argument("--quick", action="store_true", help="play 40 s")
    p.add_argument("--out", default=None, help="run folder (default: a new temporary one)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the tables and the job's source")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (INFO)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only folders
    seconds = 40.0 if args.quick else args.seconds
    s = run_demo(args.job, args.data, seconds, args.rate, args.kill_after, args.bootstrap, args.out, args.seed, args)
    print_summary(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
