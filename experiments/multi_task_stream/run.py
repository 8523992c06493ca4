"""One round of the two-task stream experiment, through `monolith` commands.

A log is replayed into Kafka (librdkafka's embedded cluster, in this
process), joined by `monolith join` with the two-head job's label rules,
and the one examples topic is then trained by `monolith train` several
times, each in its own consumer group: the two-head model and one
single-task model per head it is compared on. Two worlds:

- shop: a synthetic log (tests/jobs/shop_tasks.py) of clicks and of
  purchases only after a click; the two-head model (shared bottom) also
  syncs its rows to a serving PS, and beside it a click-only and a
  buy-only model;
- movielens: MovieLens-1M's replay (ratings and unrated impressions); an
  MMoE of "like" (rating >= 4, half the negatives kept) and "rating" (the
  rating, defined where the user rated), beside the single-head DeepFM.

Each
trainer scores every batch before training on it (prequential); the AUC of
those scores, per head, compares the models on the same stream. Last, a
predictor serves the two-head model from the serving PS, and its per-head
scores on held-out requests are compared with the trainer's own forward
pass (its newest snapshot, loaded here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from monolith_jax.online.demo import Proc, free_port
from monolith_jax.stream import kafka as K

JOBS = "experiments.multi_task_stream.jobs"
MONOLITH = [sys.executable, "-m", "monolith_jax.cli"]


def cmd(*args) -> list:
    return [*MONOLITH, *map(str, args)]


def _json_after(lines: list, marker: str) -> dict:
    for line in reversed(lines):
        if marker in line:
            return json.loads(line.split(marker, 1)[1])
    raise RuntimeError(f"no {marker!r} line")


def requests_of(cols: dict, rows) -> list:
    out = []
    for k in rows:
        r = {"user": int(cols["user"][k]), "item": int(cols["item"][k]), "category": cols["category"][k],
             "recent_items": [int(i) for i in cols["recent_items"][k]]}
        if cols["price"][k] is not None:
            r["price"] = cols["price"][k]
        out.append(r)
    return out


def train(name: str, spec: str, bootstrap: str, out: str, extra: list = ()) -> Proc:
    return Proc(f"train-{name}", cmd("train", "--job", spec, "--bootstrap", bootstrap,
                                     "--group", f"trainer-{name}", "--idle-timeout", "6", "--no-warmup",
                                     "--summary", os.path.join(out, f"{name}.json"), *extra), out)


def own_scores(spec: str, folder: str, test_path: str, n: int) -> dict:
    """The multi-head trainer's own per-head scores on the test log, from its newest snapshot."""
    from monolith_jax.job import load_job
    from monolith_jax.snapshot import Snapshots

    job = load_job(spec)
    trainer = job.make_trainer(log_every=0)
    snaps = Snapshots(folder)
    assert snaps.restore(trainer) is not None, f"no snapshot in {folder}"
    snaps.close()
    parts = [trainer.predict(b) for b in job.batches([test_path])]
    sizes = [int(np.sum(b.weights)) for b in job.batches([test_path])]
    trainer.close()
    return {h: np.concatenate([p[h][:s] for p, s in zip(parts, sizes)])[:n] for h in parts[0]}


@dataclasses.dataclass(frozen=True)
class World:
    """A stream and its jobs: the multi-head job and the single-task jobs it
    is compared on, name -> (head, MODULE:NAME)."""

    name: str
    multi: str
    singles: dict
    serve_check: bool   # compare the predictor's per-head scores with the trainer's (needs a test log)
    # Partitions per topic: the embedded cluster keeps only ~5 MB of each
    # partition, so a longer stream needs more of them to keep every message.
    partitions: int = 2
    train_args: tuple = ()   # flags of every `monolith train` of this world


SHOP = World("shop", f"{JOBS}:job", {"click only": ("click", f"{JOBS}:click_only"),
                                     "buy only": ("buy", f"{JOBS}:buy_only")}, True)
ML = "monolith_jax.examples.movielens.job"
MOVIELENS = World("movielens", f"{ML}:two_heads", {"DeepFM, like only": ("like", f"{ML}:like_only"),
                                                   "MMoE, like only": ("like", f"{ML}:like_only_mmoe")},
                  False, partitions=8,
                  # A short stream: batches of 256 give the dense towers 4x the steps of 1,024.
                  train_args=("--batch", "256"))
WORLDS = {w.name: w for w in (SHOP, MOVIELENS)}


def running_mean_rmse(path: str, heads: dict) -> dict:
    """Per value head, the prequential RMSE of predicting the mean of the
    labels seen before (the baseline a value head must beat on a stream)."""
    arrays = np.load(path)
    out = {}
    for head, metrics in heads.items():
        if "rmse" not in metrics:
            continue
        y = arrays[f"{head}.labels"].astype(np.float64)
        before = np.concatenate([[0.0], np.cumsum(y)[:-1]]) / np.maximum(np.arange(y.size), 1)
        out[head] = float(np.sqrt(np.mean(np.square(before[1:] - y[1:])))) if y.size > 1 else float("nan")
    return out


def round_(out: str, world: World, n: int, seed: int, serve_n: int = 500, log=print) -> dict:
    """One stream of `n` requests (MovieLens: of the first `n` ratings, with
    their impressions; seed: the shop's world, or MovieLens's impressions);
    returns the round's figures, with every count that shows each message
    was trained once."""
    from monolith_jax.serving.predictor import PredictorClient

    os.makedirs(out, exist_ok=True)
    result = {"world": world.name, "seed": seed, "requests": n}
    if world.name == "shop":
        from experiments.multi_task_stream import jobs

        log_path, test_path = os.path.join(out, "log.parquet"), os.path.join(out, "test.parquet")
        cols = jobs.make_log(log_path, n=n, seed=seed, part=0)
        test_cols = jobs.make_log(test_path, n=serve_n, seed=seed, part=1)
        result.update(clicked=int(np.sum(cols["clicked"])), bought=int(sum(1 for b in cols["bought"] if b)))
        source = ["--data", log_path]
    else:
        source = ["--limit", n, "--seed", seed]
    t0 = time.monotonic()
    with K.EmbeddedKafka() as kafka:
        b = kafka.bootstrap
        K.ensure_topics(b, {t: world.partitions for t in K.TOPICS.values()})
        # Examples leave when their window closes, in request order: emitted
        # on the action, the purchases would be trained on before the
        # requests served beside them that were not bought, and the scores
        # those get before training would carry what came after them (the
        # delayed-feedback bias; measured: a buy AUC of 0.28 on 4,000 requests).
        joiner = Proc("join", cmd("join", "--job", world.multi, "--bootstrap", b, "--idle-flush", "3",
                                  "--exit-when-idle", "--report-every", "0", "--lateness", "1",
                                  "--emit-positives", "at_window_end"), out)
        # The replay waits for the joiner when it runs ahead (the embedded
        # cluster drops what a partition holds beyond its ~5 MB).
        replay = Proc("replay", cmd("replay", "--job", world.multi, "--bootstrap", b, *source,
                                    "--gate-group", "monolith-joiner"), out)
        replay.proc.wait(900)
        joiner.proc.wait(900)
        replay.stop(), joiner.stop()
        result["replayed"] = _json_after(replay.lines, "replay done ")
        result["joined"] = _json_after(joiner.lines, "joiner done ")
        log(f"  {world.name} seed {seed}: replayed {json.dumps(result['replayed'])}, "
            f"joined {json.dumps(result['joined'])}", flush=True)

        port = free_port()
        extra = ["--prequential-out", os.path.join(out, "multi.npz")]
        if world.serve_check:
            extra += ["--serving-ps", f"127.0.0.1:{port}", "--sync-interval", "0.5", "--dense-sync-interval", "1",
                      "--export", os.path.join(out, "model"), "--snapshot-dir", os.path.join(out, "snaps")]
        multi = train("multi", world.multi, b, out, [*extra, *world.train_args])
        ps = pred = None
        try:
            if world.serve_check:
                deadline = time.monotonic() + 180
                while not os.path.exists(os.path.join(out, "model", "spec.json")):  # the trainer exports at start
                    if multi.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the two-head trainer did not export; see " + multi.log_path)
                    time.sleep(0.2)
                ps = Proc("serving-ps", cmd("serving-ps", "--model", os.path.join(out, "model"), "--port", port), out)
                ps.address()
            multi.proc.wait(1800)
            for k, (head, spec) in enumerate(world.singles.values()):
                single = train(f"single{k}", spec, b, out, ["--prequential-out", os.path.join(out, f"single{k}.npz"),
                                                            *world.train_args])
                single.proc.wait(1800)
                single.stop()
            if world.serve_check:
                pred = Proc("predictor", cmd("predictor", "--model", os.path.join(out, "model"),
                                             "--serving-ps", f"127.0.0.1:{port}", "--port", 0), out)
                client = PredictorClient(pred.address())
                served = [client.predict(requests_of(test_cols, range(s, min(s + 100, serve_n))))
                          for s in range(0, serve_n, 100)]
                client.close()
        finally:
            for p in (pred, multi, ps):
                if p is not None:
                    p.stop()
    summaries = {}
    files = {"multi": "multi", **{name: f"single{k}" for k, name in enumerate(world.singles)}}
    for name, file in files.items():
        with open(os.path.join(out, f"{file}.json"), encoding="utf-8") as f:
            summaries[name] = json.load(f)
    result["trained"] = {name: s["examples"] for name, s in summaries.items()}
    result["multi"] = summaries["multi"]["heads"]
    result["single"] = {name: summaries[name]["heads"][head] for name, (head, _) in world.singles.items()}
    result["running_mean_rmse"] = running_mean_rmse(os.path.join(out, "multi.npz"), result["multi"])
    if world.serve_check:
        own = own_scores(world.multi, os.path.join(out, "snaps"), test_path, serve_n)
        served = {h: np.concatenate([s[h] for s in served]) for h in own}
        result["served_vs_own_max_abs_diff"] = {h: float(np.max(np.abs(served[h] - own[h]))) for h in own}
        result["served_std"] = {h: float(np.std(served[h])) for h in own}
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result
