"""A scale-out training job: N training PS shards and M trainers.

    monolith cluster --config cluster.json                # all of it, on this machine
    monolith cluster --config cluster.json --role ps:1    # one part, on its own machine
    monolith cluster --config cluster.json --role trainer:0

cluster.json ("job" and "bootstrap" are required):

    {"job": "my_job:job",                           the job (MODULE:NAME) every shard and trainer runs
     "bootstrap": "10.0.0.5:9092",                  Kafka, with the examples topic
     "ps": ["10.0.0.1:7100", "10.0.0.2:7100"],      shard addresses, in shard order; or a count
                                                    (that many here, on free loopback ports)
     "trainers": 2,                                 consumers of the examples topic, one group
     "dense": "sync",                               "sync": all-reduce (jax.distributed, the default);
                                                    "async": deltas through the first shard (dense_ps)
     "coordinator": "10.0.0.3:7200",                trainer 0's machine (sync only; default: a free
                                                    loopback port)
     "group": "monolith-trainer",
     "seed": 0,
     "snapshot_dir": "/shared/snapshots",           trainers' and shards' snapshots (optional)
     "serving_ps": "10.0.0.9:50051",                shards push rows, trainer 0 dense params (optional)
     "sync_interval_s": 2.0,
     "run_dir": "run",                              each trainer's summary goes here
     "prequential": false,                          true: each trainer writes the labels and the scores
                                                    it gave before training to run_dir/trainer-<j>.npz
     "trainer_args": ["--batch", "512"]}            passed to every `monolith train`

Several trainers need a Kafka broker that rebalances a consumer group
correctly: a real cluster, or `monolith_jax.stream.broker.BrokerProcess`
(tansu). librdkafka's embedded cluster (`kafka.EmbeddedKafka`, the demo's
default) refuses offset commits during a rebalance, so two trainers there
trained 38,672 examples of a 25,887-example stream; the launcher refuses
more than one trainer on it (recognised by its metadata) and says so. One
trainer on it is fine.

With no `--role`, everything starts here: the shards first (each prints
its address), then the trainers. A shard that dies while the trainers run
is started again on its address from its newest snapshot (the trainers
wait for it meanwhile: `ShardedTable` retries with a log line). When every
trainer has exited, the shards are stopped (SIGTERM: a last push to the
serving PS) and one line `cluster done {...}` gives the trainers'
summaries and the restarts. On several machines, start each part with its
`--role`, from the same file (explicit addresses then).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_config(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if "bootstrap" not in cfg:
        raise ValueError(f"{path}: 'bootstrap' (the Kafka bootstrap servers) is required")
    if not isinstance(cfg.get("job"), str) or ":" not in cfg["job"]:
        raise ValueError(f"{path}: 'job' (the job every shard and trainer runs, as MODULE:NAME) is required")
    unknown = set(cfg) - {"job", "bootstrap", "ps", "trainers", "dense", "coordinator", "group", "seed", "snapshot_dir",
                          "serving_ps", "sync_interval_s", "run_dir", "prequential", "trainer_args"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    if cfg.get("dense", "sync") not in ("sync", "async"):
        raise ValueError(f"{path}: 'dense' must be 'sync' or 'async', got {cfg['dense']!r}")
    return cfg


class EmbeddedClusterRefused(ValueError):
    """Several trainers asked for on librdkafka's embedded cluster."""


def check_broker(cfg: dict) -> None:
    """Refuses several trainers on the embedded cluster (EmbeddedClusterRefused,
    saying which broker to use instead)."""
    trainers = int(cfg.get("trainers", 1))
    if trainers <= 1:
        return
    from monolith_jax.stream import kafka as K

    if K.is_embedded(cfg["bootstrap"]):
        raise EmbeddedClusterRefused(
            f"{cfg['bootstrap']} is librdkafka's embedded cluster, whose group coordinator refuses offset commits "
            f"during a rebalance: {trainers} trainers sharing it would train examples twice. Use a Kafka broker: "
            "a real cluster, or a broker process (monolith_jax.stream.broker.BrokerProcess, tansu), as "
            "'bootstrap'; or run one trainer")


def ps_argv(cfg: dict, shard: int, shards: int, port: int, host: str = "127.0.0.1") -> list:
    argv = ["--shard", str(shard), "--shards", str(shards), "--job", cfg["job"], "--seed", str(cfg.get("seed", 0)),
            "--host", host, "--port", str(port)]
    if cfg.get("snapshot_dir"):
        argv += ["--snapshot-dir", cfg["snapshot_dir"]]
    if cfg.get("serving_ps"):
        argv += ["--serving-ps", cfg["serving_ps"], "--sync-interval", str(cfg.get("sync_interval_s", 2.0))]
    return argv


def trainer_argv(cfg: dict, index: int, addresses: list, coordinator: str | None, run_dir: str) -> list:
    trainers = int(cfg.get("trainers", 1))
    argv = ["--job", cfg["job"], "--bootstrap", cfg["bootstrap"], "--group", cfg.get("group", "monolith-trainer"),
            "--seed", str(cfg.get("seed", 0)), "--ps", ",".join(addresses), "--trainer-index", str(index),
            "--trainers", str(trainers), "--summary", os.path.join(run_dir, f"trainer-{index}.json")]
    if cfg.get("dense", "sync") == "async":
        argv.append("--async-dense")
    elif trainers > 1:
        argv += ["--coordinator", coordinator]
    if cfg.get("snapshot_dir"):
        argv += ["--snapshot-dir", cfg["snapshot_dir"]]
    if cfg.get("serving_ps"):
        argv += ["--serving-ps", cfg["serving_ps"], "--sync-interval", str(cfg.get("sync_interval_s", 2.0))]
    if cfg.get("prequential"):
        argv += ["--prequential-out", os.path.join(run_dir, f"trainer-{index}.npz")]
    return argv + [str(a) for a in cfg.get("trainer_args", [])]


class Shard:
    """One training PS shard process, restartable on its address."""

    def __init__(self, cfg, shard, shards, host, port, out):
        self.cfg, self.shard, self.shards, self.host, self.port = cfg, shard, shards, host, port
        self.out, self.proc, self.restarts = out, None, 0

    def start(self) -> str:
        cmd = [sys.executable, "-m", "monolith_jax.cli", "training-ps",
               *ps_argv(self.cfg, self.shard, self.shards, self.port, self.host)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while True:
            line = self.proc.stdout.readline()
            if "listening on" in line:
                break
            if not line and self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"training PS shard {self.shard} did not start: {line}")
        self.port = int(line.strip().split(" listening on ")[1].split(" ")[0].rsplit(":", 1)[1])
        self.out(f"cluster: ps {self.shard} pid {self.proc.pid} on {self.address} {line.strip()}")
        threading.Thread(target=self._forward, args=(self.proc,), daemon=True).start()
        return self.address

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _forward(self, proc) -> None:
        for line in proc.stdout:
            self.out(f"[ps {self.shard}] {line.rstrip()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_local(cfg: dict, out=print, poll_s: float = 0.2) -> dict:
    """Starts every shard and trainer here, supervises the shards, waits for
    the trainers; returns {"trainers": [summaries], "restarts": {shard: n}}.
    Several trainers on the embedded cluster are refused before anything starts."""
    import tempfile

    check_broker(cfg)
    run_dir = cfg.get("run_dir") or tempfile.mkdtemp(prefix="monolith-cluster-")
    os.makedirs(run_dir, exist_ok=True)
    ps = cfg.get("ps", 1)
    given = ps if isinstance(ps, list) else None
    n = len(given) if given else int(ps)
    shards = []
    for i in range(n):
        host, port = (given[i].rsplit(":", 1)[0], int(given[i].rsplit(":", 1)[1])) if given else ("127.0.0.1", 0)
        shards.append(Shard(cfg, i, n, host, port, out))
    trainers: list = []
    stopping = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        addresses = [s.start() for s in shards]
        coordinator = cfg.get("coordinator") or f"127.0.0.1:{free_port()}"
        for j in range(int(cfg.get("trainers", 1))):
            cmd = [sys.executable, "-m", "monolith_jax.cli", "train",
                   *trainer_argv(cfg, j, addresses, coordinator, run_dir)]
            trainers.append(subprocess.Popen(cmd))
            out(f"cluster: trainer {j} pid {trainers[-1].pid}")
        while any(t.poll() is None for t in trainers):
            if stopping.is_set():
                for t in trainers:
                    if t.poll() is None:
                        t.send_signal(signal.SIGTERM)
                stopping.clear()
            failed = [j for j, t in enumerate(trainers) if t.poll() not in (None, 0)]
            if failed and cfg.get("dense", "sync") == "sync" and any(t.poll() is None for t in trainers):
                # A synchronous group cannot go on without a member: stop the
                # rest (their snapshots hold where to resume) rather than hang.
                out(f"cluster: trainer {failed[0]} exited with code {trainers[failed[0]].returncode}; "
                    "stopping the group")
                for t in trainers:
                    if t.poll() is None:
                        t.kill()
            for s in shards:
                code = s.proc.poll()
                if code is not None:
                    s.restarts += 1
                    out(f"cluster: ps {s.shard} exited with code {code}; starting it again on {s.address} "
                        "from its newest snapshot")
                    s.start()
            time.sleep(poll_s)
    finally:
        for t in trainers:
            if t.poll() is None:
                t.kill()
        for s in shards:
            s.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summaries = []
    for j, t in enumerate(trainers):
        path = os.path.join(run_dir, f"trainer-{j}.json")
        summary = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
        summaries.append({"exit": t.returncode, "summary": summary})
    return {"trainers": summaries, "restarts": {s.shard: s.restarts for s in shards},
            "ps": [s.address for s in shards], "run_dir": run_dir}


def run_role(cfg: dict, role: str) -> int:
    """One part of the job, in this process (addresses from the file)."""
    kind, _, index = role.partition(":")
    if kind not in ("ps", "trainer") or not index.isdigit():
        raise ValueError(f"--role must be ps:<i> or trainer:<j>, got {role!r}")
    i = int(index)
    addresses = cfg.get("ps")
    if not isinstance(addresses, list):
        raise ValueError("--role needs the shards' addresses: 'ps' must be a list of HOST:PORT")
    run_dir = cfg.get("run_dir") or "."
    os.makedirs(run_dir, exist_ok=True)
    if kind == "ps":
        from monolith_jax.distributed import training_ps

        host, port = addresses[i].rsplit(":", 1)
        return training_ps.main(ps_argv(cfg, i, len(addresses), int(port), host))
    if int(cfg.get("trainers", 1)) > 1 and cfg.get("dense", "sync") == "sync" and not cfg.get("coordinator"):
        raise ValueError("several synchronous trainers on several machines need 'coordinator'")
    check_broker(cfg)
    from monolith_jax.online import train

    return train.main(trainer_argv(cfg, i, addresses, cfg.get("coordinator"), run_dir))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="monolith cluster", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="the job's JSON file (see the module docstring)")
    p.add_argument("--role", default=None, help="ps:<i> or trainer:<j>: start only that part, here")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    try:
        if args.role:
            return run_role(cfg, args.role)
        result = run_local(cfg, out=lambda line: print(line, flush=True))
    except EmbeddedClusterRefused as err:
        raise SystemExit(f"monolith cluster: {err}") from None
    print("cluster done " + json.dumps(result, default=float), flush=True)
    return 0 if all(t["exit"] == 0 for t in result["trainers"]) else 1


if __name__ == "__main__":
    sys.exit(main())
