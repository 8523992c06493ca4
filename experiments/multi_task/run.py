"""Several objectives and a behaviour sequence on MovieLens-1M, from files.

Two questions, each on the collisionless experiment's split (the last 20%
of each user's ratings, by time, are the test set) and features (user,
movie, age, gender, occupation, release year, genres):

heads: one job of two heads, "like" (rating >= 4, binary) and "rating"
  (the rating, squared error), an MMoE, beside the single-head DeepFM of
  the collisionless experiment and a single-head MMoE (the same model
  with one task): like-AUC per arm, and the rating head's RMSE beside the
  RMSE of predicting each movie's mean training rating.

din: DIN over each user's movies rated before this rating (the last
  `HISTORY`, oldest first; the same key space as the movie, so an item in
  the history and the same item as the target read one row), against
  DeepFM on the same split, and DeepFM given the same history as one more
  mean-pooled field (is it the attention, or only the information?).

Every arm of a seed trains on the same shuffled order; gaps are paired by
seed (a paired t-test).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optax
import pyarrow as pa
from flax import nnx

from experiments.collisionless import run as C
from monolith_jax.features import SparseBatch, SparseFeature, records_to_batch
from monolith_jax.heads import Head
from monolith_jax.models import DIN, DeepFM, MMoE
from monolith_jax.sparse import Adagrad, Keys, Normal, TableConfig
from monolith_jax.training import Trainer

DIM = C.DIM
HISTORY = 20
HEADS = (Head("like", label="rating", threshold=4.0), Head("rating", loss="squared", label="rating", weight=0.2))
OTHERS = ("user", "age", "gender", "occupation", "year", "genres")   # DIN's pooled fields


def history_table(ratings, limit: int = HISTORY) -> tuple[pa.Table, np.ndarray]:
    """(the collisionless records plus "rating" and "history", in (user, time)
    order; the test mask in that order). history: the movies the user rated
    before this rating, the last `limit` of them, oldest first."""
    order = np.lexsort((np.arange(len(ratings)), ratings.timestamp, ratings.user))
    users = ratings.user[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    counts = np.diff(np.r_[starts, users.size])
    first = np.repeat(starts, counts)                  # each row's user's first position
    pos = np.arange(users.size)
    lengths = np.minimum(pos - first, limit)
    idx = pos[:, None] - lengths[:, None] + np.arange(limit)[None, :]
    valid = np.arange(limit)[None, :] < lengths[:, None]
    movies = ratings.item_key[order].view(np.int64)
    history = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32)),
                                       pa.array(movies[idx[valid]]))
    table = C.records(ratings, C.Arm("collisionless")).take(pa.array(order))
    table = table.append_column("rating", pa.array(ratings.rating[order].astype(np.float32)))
    table = table.append_column("history", history)
    return table, C.split_by_user(ratings)[order]


def features(history: str | None = None) -> list:
    """The collisionless features, plus the history: a sequence (DIN) or mean-pooled (DeepFM)."""
    feats = C.features()
    if history == "sequence":
        feats.append(SparseFeature("history", "ids", combiner=None, max_len=HISTORY, id_space="movie"))
    elif history == "mean":
        feats.append(SparseFeature("history", "ids", combiner="mean", max_len=HISTORY, id_space="movie"))
    return feats


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    model: str                     # "deepfm", "mmoe", "din"
    heads: tuple | None = None     # None: one binary head read from "label"
    history: str | None = None     # None, "sequence", "mean"


def build(arm: Arm, seed: int) -> Trainer:
    fields = C.FIELDS + (("history",) if arm.history == "mean" else ())
    if arm.model == "deepfm":
        tables = [TableConfig("ids", DIM + 1, Normal(0.0, 0.01), Adagrad(0.05), seed=seed)]
        model = DeepFM(fields, DIM, 0, C.HIDDEN, rngs=nnx.Rngs(seed))
    elif arm.model == "mmoe":
        tables = [TableConfig("ids", DIM, Normal(0.0, 0.01), Adagrad(0.05), seed=seed)]
        tasks = [h.name for h in arm.heads] if arm.heads else ["like"]
        model = MMoE(fields, DIM, n_experts=4, expert_hidden=C.HIDDEN, tower_hidden=(32,), tasks=tasks,
                     single_task=arm.heads is None, rngs=nnx.Rngs(seed))
    elif arm.model == "din":
        tables = [TableConfig("ids", DIM, Normal(0.0, 0.01), Adagrad(0.05), seed=seed)]
        model = DIN("history", "movie", OTHERS, DIM, hidden=C.HIDDEN, rngs=nnx.Rngs(seed))
    else:
        raise ValueError(f"unknown model {arm.model!r}")
    return Trainer(model, tables, features(arm.history), optimizer=optax.adam(1e-3), heads=arm.heads,
                   log_every=0, out=None)


def prepare(table: pa.Table, arm: Arm):
    """The whole table as one SparseBatch of numpy arrays (read once; epochs slice it)."""
    return records_to_batch(table, features(arm.history), (), arm.heads if arm.heads else "label")


def take(full, idx: np.ndarray):
    """The examples `idx` of a prepared SparseBatch, as a batch of their own."""
    return SparseBatch(ids={n: Keys(k.words[idx]) for n, k in full.ids.items()},
                       lengths={n: v[idx] for n, v in full.lengths.items()}, dense=full.dense[idx],
                       labels=full.labels[idx], weights=full.weights[idx],
                       label_mask=None if full.label_mask is None else full.label_mask[idx])


def batches(full, size: int, order: np.ndarray | None = None) -> list:
    """Batches of `size` in `order` (default: as prepared); the last partial
    batch of a shuffled epoch is left out (under 0.2% of the examples), so
    the step compiles once."""
    n = full.weights.shape[0]
    if order is None:
        return [take(full, np.arange(s, min(s + size, n))) for s in range(0, n, size)]
    return [take(full, order[s:s + size]) for s in range(0, n - size + 1, size)]


def run_arm(arm: Arm, train: pa.Table, test: pa.Table, epochs: int, size: int, seed: int) -> list[dict]:
    """Evaluation after each epoch: {"auc", "logloss"} and, with heads, "heads"."""
    trainer = build(arm, seed)
    rng = np.random.default_rng(seed)
    full = prepare(train, arm)
    test_batches = batches(prepare(test, arm), 8192)
    out = []
    for _ in range(epochs):
        trainer.fit(batches(full, size, rng.permutation(train.num_rows)))
        ev = trainer.evaluate(test_batches)
        out.append({k: ev[k] for k in ("auc", "logloss", "heads") if k in ev})
    trainer.close()
    return out


def movie_mean_rmse(train: pa.Table, test: pa.Table) -> float:
    """RMSE of predicting each movie's mean training rating (the global mean for unseen movies)."""
    m_train, r_train = train.column("movie").to_numpy(), train.column("rating").to_numpy()
    uniq, inv = np.unique(m_train, return_inverse=True)
    means = np.bincount(inv, r_train) / np.bincount(inv)
    m_test, r_test = test.column("movie").to_numpy(), test.column("rating").to_numpy()
    at = np.clip(np.searchsorted(uniq, m_test), 0, uniq.size - 1)
    pred = np.where(uniq[at] == m_test, means[at], r_train.mean())
    return float(np.sqrt(np.mean((pred - r_test) ** 2)))


def paired(a, b) -> tuple[float, float, float]:
    """(mean of a - b over seeds, its standard deviation, the paired t-test's
    two-sided p; scipy comes with jax)."""
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size < 2:
        return float(d.mean()), float("nan"), float("nan")
    return float(d.mean()), float(d.std(ddof=1)), float(stats.ttest_rel(a, b).pvalue)
