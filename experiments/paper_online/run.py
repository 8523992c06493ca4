"""The paper's Algorithm 1 on MovieLens-1M: batch training against online
training with periodic parameter sync (its Table 2 and Figures 9-10).

Algorithm 1, as here:

    batch-train on the earliest ratings
    cut the rest (the stream) into N shards, in time order
    for each shard:
        score it with the serving copy      (read-only; no rows created)
        train on it                          (one pass, in time order)
        sync the serving copy to the trainer (touched rows + dense params)

The baseline serves the batch-trained model over the whole stream, never
updated. Every arm of a seed starts from the same batch-trained state, so
the arms differ only in how often the serving copy catches up with the
trainer.

The serving copy is a second `Trainer` with its own tables: after a full
copy at the start, each sync pushes only the rows the trainer created or
updated since the last one (`drain_touched` -> `assign`, values only, the
way the serving parameter server is fed) and replaces the dense params.
Between syncs it shares nothing with the trainer, so its scores on a shard
are those of the model as it was at the last sync (the test checks this
against a rebuilt copy). In this sequential replay a shard is scored before
any training on it, so the copy changes no figure here; it is what a
server holds while training goes on, and it puts the sync path (touched
rows, values only, and dense params) inside the experiment.

Shards are cut by number of ratings, not by time: MovieLens-1M's clock is
very skewed (half the ratings fall in the first six months of its 34), so
equal-time shards would leave most of them nearly empty.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
import optax
import pyarrow as pa
from flax import nnx

from experiments.collisionless.run import DIM, FIELDS, HIDDEN, Arm, batches, features, records
from monolith_jax.metrics import auc
from monolith_jax.models import DeepFM
from monolith_jax.sparse import Adagrad, Normal, TableConfig
from monolith_jax.training import Trainer

QUIET = dict(log_every=0, out=lambda *a, **k: None)
SEGMENTS = 10   # AUC over stream time: by tenth of the stream, the same cut for every arm


def make_trainer(seed: int) -> Trainer:
    """DeepFM as in the collisionless experiment: one collisionless table of
    dim 8 + 1, fused Adagrad (0.05) on the rows, Adam (1e-3) on the dense part."""
    tables = [TableConfig("ids", DIM + 1, Normal(0.0, 0.01), Adagrad(0.05), seed=seed)]
    model = DeepFM(FIELDS, DIM, 0, HIDDEN, rngs=nnx.Rngs(seed))
    return Trainer(model, tables, features(), optimizer=optax.adam(1e-3), **QUIET)


@dataclasses.dataclass
class Data:
    train: pa.Table          # the batch-training part (earliest ratings)
    stream: pa.Table         # the rest, in time order
    stream_times: np.ndarray  # seconds, one per stream row
    new_user: np.ndarray      # bool, one per stream row: its user has no rating in the batch part

    @property
    def labels(self) -> np.ndarray:
        return self.stream.column("label").to_numpy()


def split(ratings, batch_share: float) -> Data:
    """The first `batch_share` of the ratings (by count; they are sorted by
    time) for batch training, the rest as the stream."""
    table = records(ratings, Arm("collisionless"))
    cut = int(round(batch_share * len(ratings)))
    new_user = ~np.isin(ratings.user[cut:], ratings.user[:cut])
    return Data(table.slice(0, cut), table.slice(cut), np.asarray(ratings.timestamp[cut:]), new_user)


def shard_edges(n_rows: int, n_shards: int) -> np.ndarray:
    """Row offsets of `n_shards` shards of (nearly) equal counts."""
    return np.linspace(0, n_rows, n_shards + 1).round().astype(int)


def shard_batches(stream: pa.Table, edges: np.ndarray, batch: int) -> list[list]:
    """Each shard as its own list of batches (no batch crosses a sync point;
    a shard's last batch is padded with weight-0 rows)."""
    return [batches(stream.slice(a, b - a), batch) for a, b in zip(edges[:-1], edges[1:])]


def shard_spans(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Stream time each shard covers, in hours (first to last rating)."""
    return np.array([(times[b - 1] - times[a]) / 3600 for a, b in zip(edges[:-1], edges[1:])])


def time_cut_counts(times: np.ndarray, n_shards: int) -> np.ndarray:
    """Ratings per shard if the stream were cut into equal spans of time."""
    edges = np.linspace(times[0], times[-1] + 1, n_shards + 1)
    return np.histogram(times, edges)[0]


def batch_train(train: pa.Table, epochs: int, batch: int, seed: int) -> Trainer:
    """Shuffled epochs over the batch-training part (the seed sets the
    initialisation and the shuffling)."""
    trainer = make_trainer(seed)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        trainer.fit(batches(train, batch, rng.permutation(train.num_rows)))
    return trainer


def score(trainer: Trainer, batch_list) -> np.ndarray:
    """Probabilities of the real (weight 1) rows, read-only."""
    return np.concatenate([trainer.predict(b)[np.asarray(b.weights) > 0] for b in batch_list])


# --------------------------------------------------------------- serving
class Serving:
    """The serving copy: a model that changes only at sync points.

    Its tables hold values only as far as serving is concerned (rows are
    written with `assign`; their optimizer slots are never used), like the
    serving parameter server's."""

    def __init__(self, seed: int):
        self.trainer = make_trainer(seed)
        self.syncs, self.rows_pushed, self.sync_s = 0, 0, 0.0

    def full_sync(self, source: Trainer) -> int:
        """Every row and the dense params; clears the source's touched marks,
        so that later syncs push only what changed after this one."""
        t0 = time.perf_counter()
        rows = 0
        for name, t in source.tables.items():
            t.drain_touched()
            keys, values = t.export()
            mine = self.trainer.tables[name]
            mine.clear()
            mine.assign(keys, values)
            rows += keys.size
        self._dense_from(source)
        self.sync_s += time.perf_counter() - t0
        return rows

    def sync(self, source: Trainer) -> int:
        """The rows created or updated since the last sync, and the dense params."""
        t0 = time.perf_counter()
        rows = 0
        for name, t in source.tables.items():
            keys, values = t.drain_touched()
            self.trainer.tables[name].assign(keys, values)
            rows += keys.size
        self._dense_from(source)
        self.syncs += 1
        self.rows_pushed += rows
        self.sync_s += time.perf_counter() - t0
        return rows

    def _dense_from(self, source: Trainer) -> None:
        """The trainer's dense params, copied (its tables reach this copy row by row)."""
        self.trainer.load_state_dict({"params": source.state_dict(tables=False)["params"]}, strict=False)

    def score(self, batch_list) -> np.ndarray:
        return score(self.trainer, batch_list)


def online(trainer: Trainer, serving: Serving, base: dict, shards: list[list], on_sync=None) -> dict:
    """Algorithm 1 from `base` (a `Trainer.state_dict()`) over `shards`. Returns the serving copy's
    scores on every stream row, in order, and the time spent.

    on_sync(k, trainer, serving): called after the sync that follows shard k
    (the test rebuilds the serving model from what it sees there)."""
    trainer.load_state_dict(base)
    serving.syncs, serving.rows_pushed, serving.sync_s = 0, 0, 0.0
    serving.full_sync(trainer)
    scores, t_score, t_train = [], 0.0, 0.0
    for k, shard in enumerate(shards):
        t0 = time.perf_counter()
        scores.append(serving.score(shard))
        t1 = time.perf_counter()
        trainer.fit(shard)
        t_train += time.perf_counter() - t1
        t_score += t1 - t0
        serving.sync(trainer)
        if on_sync is not None:
            on_sync(k, trainer, serving)
    return {"scores": np.concatenate(scores), "score_s": t_score, "train_s": t_train, "sync_s": serving.sync_s,
            "rows_per_sync": serving.rows_pushed / max(serving.syncs, 1)}


# --------------------------------------------------------------- metrics
def segment_aucs(labels: np.ndarray, scores: np.ndarray, segments: int = SEGMENTS) -> np.ndarray:
    edges = shard_edges(labels.size, segments)
    return np.array([auc(labels[a:b], scores[a:b]) for a, b in zip(edges[:-1], edges[1:])])


def summarize(labels: np.ndarray, scores: np.ndarray, new_user: np.ndarray) -> dict:
    """Stream AUC: of all stream predictions pooled, the mean of the tenths'
    AUCs (each tenth scored on its own, as the paper's figures), and apart
    for ratings by users the batch part knew and by users new to the stream."""
    seg = segment_aucs(labels, scores)
    return {"auc": auc(labels, scores), "mean_tenth_auc": float(seg.mean()), "tenths": seg.tolist(),
            "known_users_auc": auc(labels[~new_user], scores[~new_user]),
            "new_users_auc": auc(labels[new_user], scores[new_user])}


def run_seed(data: Data, shards_by_n: dict, epochs: int, batch: int, seed: int, out=print,
             on_sync=None, keep_scores: bool = False) -> dict:
    """One seed: batch training, then batch-only and online at every N, all
    from the same batch-trained state. on_sync(n, k, trainer, serving) is
    passed on to `online`; keep_scores keeps every arm's stream scores."""
    t0 = time.perf_counter()
    trainer = batch_train(data.train, epochs, batch, seed)
    jax.block_until_ready(trainer.params)
    t_batch = time.perf_counter() - t0
    base = trainer.state_dict()
    labels, new_user = data.labels, data.new_user

    # Batch-only: the batch-trained model serves the whole stream. Its scores
    # do not depend on where shards are cut; the finest cut is scored.
    finest = shards_by_n[max(shards_by_n)]
    t0 = time.perf_counter()
    scores = {"batch-only": score(trainer, [b for s in finest for b in s])}
    res = {"batch-only": {**summarize(labels, scores["batch-only"], new_user), "seconds": time.perf_counter() - t0}}
    out(f"  seed {seed}: batch training {t_batch:.1f} s ({epochs} epochs, {data.train.num_rows:,} ratings); "
        f"batch-only AUC {res['batch-only']['auc']:.4f}")

    serving = Serving(seed)
    for n, shards in shards_by_n.items():
        t0 = time.perf_counter()
        hook = None if on_sync is None else (lambda k, tr, sv, n=n: on_sync(n, k, tr, sv))
        r = online(trainer, serving, base, shards, hook)
        arm = f"online N={n}"
        scores[arm] = r["scores"]
        wall = time.perf_counter() - t0
        res[arm] = {**summarize(labels, r["scores"], new_user), "seconds": wall,
                    **{k: r[k] for k in ("train_s", "score_s", "sync_s", "rows_per_sync")}}
        out(f"  seed {seed}: {arm:<13} AUC {res[arm]['auc']:.4f}  ({wall:.1f} s: train {r['train_s']:.1f}, "
            f"score {r['score_s']:.1f}, {n} syncs {r['sync_s'] * 1e3:.0f} ms, {r['rows_per_sync']:,.0f} rows each)")
    result = {"seed": seed, "batch_train_s": t_batch, "arms": res}
    if keep_scores:
        result["scores"] = scores
    return result


def _pm(values: np.ndarray, scale: float = 1.0, fmt: str = ".4f") -> str:
    return f"{values.mean() * scale:{fmt}} ± {values.std() * scale:{fmt.lstrip('+')}}"


def table_lines(results: list[dict], intervals: dict | None = None) -> list[str]:
    """The paper's Table 2: per arm, the stream AUC (mean ± std over seeds),
    the mean of the tenths' AUCs, and the paired difference to batch-only
    (the same seed's batch-trained model; its spread is the seed noise of
    the gain). intervals: arm -> a label for its sync interval."""
    arms = list(results[0]["arms"])
    get = lambda arm, key: np.array([r["arms"][arm][key] for r in results])
    intervals = intervals or {}
    lines = [f"{'arm':<14}{'sync interval':<22}{'stream AUC':>17}{'mean of tenths':>19}{'vs batch-only':>20}",
             "-" * 92]
    for a in arms:
        diff = "" if a == "batch-only" else _pm(get(a, "auc") - get("batch-only", "auc"), 100, "+.2f") + " pts"
        lines.append(f"{a:<14}{intervals.get(a, ''):<22}{_pm(get(a, 'auc')):>17}"
                     f"{_pm(get(a, 'mean_tenth_auc')):>19}{diff:>20}")
    lines += ["", f"{'arm':<14}{'users known from batch part':>30}{'users new to the stream':>28}", "-" * 72]
    for a in arms:
        lines.append(f"{a:<14}{_pm(get(a, 'known_users_auc')):>30}{_pm(get(a, 'new_users_auc')):>28}")
    return lines


def per_seed_lines(results: list[dict], seeds: list[int]) -> list[str]:
    arms = list(results[0]["arms"])
    lines = [f"{'arm':<16}" + "".join(f"{'seed ' + str(s):>10}" for s in seeds)]
    for a in arms:
        lines.append(f"{a:<16}" + "".join(f"{r['arms'][a]['auc']:>10.4f}" for r in results))
    return lines


def plot(results: list[dict], segment_dates: list[str], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results[0]["arms"])
    x = np.arange(1, SEGMENTS + 1)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for a in arms:
        tenths = np.array([r["arms"][a]["tenths"] for r in results])
        style = "s--" if a == "batch-only" else "o-"
        ax.errorbar(x, tenths.mean(0), yerr=tenths.std(0), fmt=style, capsize=3, ms=4, label=a)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{k * 10}%\n{d[2:]}" for k, d in zip(x, segment_dates)], fontsize=7)
    ax.set_xlabel("stream tenth (end position; date of its first rating)")
    ax.set_ylabel("AUC of the tenth")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
