"""The main job: replay -> join -> online training, on MovieLens-1M.

    python -m monolith_jax.examples.movielens.loop [--limit N] [--bootstrap HOST:PORT]

With no `--bootstrap`, librdkafka's built-in cluster starts inside this
process; with it, that cluster is used. The joiner runs as its own process
(`python -m monolith_jax.stream.joiner`) against the same cluster; the
replayer runs in a thread; the DeepFM trainer trains here, scoring each
batch before training on it (prequential), and prints examples/s and the
running AUC as it goes, then the AUC of each tenth of the stream.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time


from monolith_jax.stream import kafka as K
from monolith_jax.examples.movielens import replay as R

log = logging.getLogger("monolith_jax.examples.movielens.loop")


def movielens_tables(seed: int = 0, dim: int = 8) -> list:
    """The MovieLens DeepFM's one table: dim + 1 (the first-order weight), fused Adagrad."""
    from monolith_jax.sparse import Adagrad, Normal, TableConfig

    return [TableConfig("ids", dim + 1, Normal(0.0, 0.01), Adagrad(0.05), seed=seed)]


def movielens_trainer(seed: int = 0, dim: int = 8, hidden=(128, 64), metrics_path: str | None = None,
                      out=print, log_every: int = 0):
    """DeepFM over the replayed requests' features, one collisionless table
    (dim + 1 for the first-order weight), fused Adagrad, dense Adam."""
    import optax
    from flax import nnx

    from monolith_jax.models import DeepFM
    from monolith_jax.training import Trainer

    tables = movielens_tables(seed, dim)
    model = DeepFM(R.FIELDS, dim, 0, tuple(hidden), rngs=nnx.Rngs(seed))
    return Trainer(model, tables, R.movielens_features(), optimizer=optax.adam(1e-3),
                   metrics_path=metrics_path, log_every=log_every, out=out)


def joiner_command(bootstrap: str, window_s: float, negative_rate: float, group: str,
                   topics: dict | None = None, idle_flush_s: float = 3.0, gate_group: str | None = None,
                   emit_positives: str = "at_window_end", exit_when_idle: bool = True) -> list:
    cmd = [sys.executable, "-m", "monolith_jax.stream.joiner", "--bootstrap", bootstrap, "--group", group,
           "--window", str(window_s), "--lateness", "1", "--positive", ",".join(R.POSITIVE_TYPES),
           "--min-value", str(R.MIN_VALUE), "--negative-rate", str(negative_rate),
           "--idle-flush", str(idle_flush_s), "--report-every", "0",
           # The replay packs a user's session into seconds: emitting at window
           # end keeps each request's label from reaching the model before the
           # negatives served beside it (delayed-feedback bias). "on_action"
           # is the freshest (the serving benchmark's choice).
           "--emit-positives", emit_positives]
    if exit_when_idle:
        cmd.append("--exit-when-idle")
    if gate_group:
        cmd += ["--gate-group", gate_group]
    for name, topic in (topics or {}).items():
        cmd += [f"--topic-{name.replace('_', '-')}", topic]
    return cmd


def run_loop(limit: int | None = None, bootstrap: str | None = None, impressions: float = 1.0,
             negative_rate: float = 0.5, window_s: float = 60.0, batch_size: int = 1024, speed: float = 0.0,
             seed: int = 0, metrics_path: str | None = None, out=print, ratings=None, report_every_s=5.0,
             topics: dict | None = None, trainer=None, on_batch=None) -> dict:
    from monolith_jax.examples.movielens.data import load_movielens_1m

    topics = {**K.TOPICS, **(topics or {})}
    embedded = None
    if not bootstrap:
        embedded = K.EmbeddedKafka()
        bootstrap = embedded.bootstrap
        out(f"embedded Kafka cluster (librdkafka's built-in) at {bootstrap}")
    try:
        K.ensure_topics(bootstrap, {t: K.EMBEDDED_PARTITIONS for t in topics.values()})
        ratings = load_movielens_1m() if ratings is None else ratings
        stream = R.MovieLensStream(ratings, impressions, seed=seed, limit=limit)
        out(f"replaying {stream.n_ratings:,} ratings and {stream.n_impressions:,} unrated impressions "
            f"({len(stream):,} messages)")
        group = f"monolith-{os.getpid()}-{int(time.time())}"
        joiner = subprocess.Popen(joiner_command(bootstrap, window_s, negative_rate, group + "-joiner", topics,
                                                 gate_group=group + "-trainer"),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        joiner_lines: list = []
        reader = threading.Thread(target=lambda: joiner_lines.extend(joiner.stdout), daemon=True)
        reader.start()
        stop = threading.Event()
        replayed: dict = {}
        replayer = threading.Thread(target=lambda: replayed.update(
            R.replay(bootstrap, stream, topics, speed, report_every_s=0, stop=stop, gate_group=group + "-joiner")),
            daemon=True)
        replayer.start()
        trainer = trainer or movielens_trainer(seed, metrics_path=metrics_path, out=out)
        from monolith_jax.online.trainer import OnlineTrainer

        online = OnlineTrainer(trainer, bootstrap, topics, group + "-trainer", batch_size=batch_size, out=out)
        online.on_batch = on_batch
        try:
            summary = online.run(idle_timeout_s=3.0, report_every_s=report_every_s,
                                 upstream_done=lambda: joiner.poll() is not None and not replayer.is_alive())
        finally:
            stop.set()
            if joiner.poll() is None:
                joiner.terminate()
            joiner.wait(30)
            reader.join(5)
        joined = next((json.loads(line.split(" ", 2)[2]) for line in reversed(joiner_lines)
                       if line.startswith("joiner done ")), None)
        if joined is None:
            raise RuntimeError("the joiner did not finish cleanly:\n" + "".join(joiner_lines[-30:]))
        summary.update({"replayed": replayed, "joined": joined, "segment_aucs": online.log.segment_aucs(10),
                        "bootstrap": bootstrap})
        summary["online"] = online
        return summary
    finally:
        if embedded is not None:
            embedded.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=300_000, help="ratings to replay (MovieLens-1M has 1,000,209)")
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap.servers (default: embedded cluster)")
    p.add_argument("--impressions", type=float, default=1.0)
    p.add_argument("--negative-rate", type=float, default=0.5)
    p.add_argument("--window", type=float, default=60.0)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--speed", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", default=None, help="append metrics as JSON lines to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    s = run_loop(args.limit, args.bootstrap, args.impressions, args.negative_rate, args.window, args.batch,
                 args.speed, args.seed, args.metrics)
    j = s["joined"]
    print(f"\njoined: {j['positives']:,} positives, {j['negatives']:,} negatives kept "
          f"({j['negatives_sampled_out']:,} sampled out), {j['late_actions']:,} late actions, "
          f"{j['dead_letters']} dead letters")
    print(f"trained: {s['examples']:,} examples in {s['batches']:,} batches, {s['examples_per_s']:,.0f} ex/s, "
          f"{s['dead_letters']} dead letters")
    print("prequential AUC by tenth of the stream: " + " ".join(f"{a:.3f}" for a in s["segment_aucs"]))
    print(f"stream AUC {s['stream_auc']:.4f}, last {s['online'].log.window:,} examples {s['running_auc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
