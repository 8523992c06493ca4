"""The replayer: a logged data set -> the features and actions topics.

    monolith replay --job monolith_jax.examples.movielens.job:job --bootstrap HOST:PORT [--limit N] [--speed X]

MovieLens-1M in time order. Each rating is a request: its features (user,
movie, age, gender, occupation, release year, genres) at the rating's time,
and one action `rate` with the rating as value, `delay` seconds later (a
seeded draw in [1, max_delay_s]). Beside each rating the user is shown, on
average `impressions` times, a movie they did not rate then: a request with
features and no action (the movie is drawn from the ratings before this one,
so by popularity so far, without looking ahead). The joiner's rule for this
data: a `rate` action with value >= 4 is a positive; everything else that
passes its window is a negative.

`speed`: event-time seconds per wall-clock second (0: as fast as Kafka
takes them). Messages are produced in event-time order, keyed by request
id.
"""

from __future__ import annotations

import numpy as np

from monolith_jax.features import SparseFeature
from monolith_jax.stream.replay import replay  # noqa: F401  (the generic producer, for callers of this module)
from monolith_jax.sparse.keys import hash_strings

FIELDS = ("user", "movie", "age", "gender", "occupation", "year", "genres")
POSITIVE_TYPES = ("rate",)
MIN_VALUE = 4.0


def movielens_features(table: str = "ids") -> list:
    """The SparseFeatures of the replayed requests, all in one table."""
    return [SparseFeature(f, table) for f in FIELDS[:-1]] + \
        [SparseFeature("genres", table, combiner="mean", max_len=6)]


def entity_keys(ratings) -> tuple[dict, dict]:
    """The keys a request's features carry, per user and per movie:
    ({"user", "age", "gender", "occupation": uint64 (users,)},
     {"movie", "year": uint64 (movies,), "genres": [uint64 array per movie]})."""
    r = ratings
    genre_lists = [g.split() for g in r.item_genres]
    genres = sorted({g for gl in genre_lists for g in gl})
    genre_keys = dict(zip(genres, hash_strings([f"genre:{g}" for g in genres])))
    users = {"user": hash_strings([f"user:{u}" for u in r.user_names]),
             "age": hash_strings([f"age:{a}" for a in r.user_age]),
             "gender": hash_strings([f"gender:{g}" for g in r.user_gender]),
             "occupation": hash_strings([f"occupation:{o}" for o in r.user_occupation])}
    items = {"movie": hash_strings([f"movie:{t}" for t in r.item_names]),
             "year": hash_strings([f"year:{y}" for y in r.item_year]),
             "genres": [np.array([genre_keys[g] for g in gl], np.uint64) for gl in genre_lists]}
    return users, items


def _id_chunks(names, columns) -> list:
    """Per entity, the protobuf bytes of its IdLists (field 4 of a FeatureRecord)."""
    from monolith_jax.stream import messages_pb2 as pb

    out = []
    for row in zip(*columns):
        rec = pb.FeatureRecord()
        for name, ids in zip(names, row):
            rec.sparse.add(name=name, ids=[int(k) for k in np.atleast_1d(ids)])
        out.append(rec.SerializeToString())
    return out


class MovieLensStream:
    """The replay's messages, built once: `messages()` yields
    (kind, request_id, value bytes, event_ms) in event-time order."""

    def __init__(self, ratings, impressions: float = 1.0, max_delay_s: float = 30.0, seed: int = 0,
                 limit: int | None = None):
        n = len(ratings) if limit is None else min(limit, len(ratings))
        rng = np.random.default_rng(seed)
        r = ratings
        users = np.unique(r.user[:n])
        user_cols, item_cols = entity_keys(r)
        self.user_chunk = dict(zip(users.tolist(), _id_chunks(list(user_cols), [c[users] for c in user_cols.values()])))
        self.item_chunk = _id_chunks(list(item_cols), list(item_cols.values()))
        ts = r.timestamp[:n].astype(np.int64) * 1000
        # Impressions: a movie from an earlier rating (popularity so far), not this one.
        k = rng.poisson(impressions, n) if impressions > 0 else np.zeros(n, np.int64)
        src = np.repeat(np.arange(n), k)
        src = src[src > 0]
        pick = (rng.random(src.size) * src).astype(np.int64)
        imp_item = r.item[:n][pick]
        keep = imp_item != r.item[:n][src]
        src, imp_item = src[keep], imp_item[keep]
        delay = rng.integers(1000, int(max_delay_s * 1000) + 1, n)
        self.n_ratings, self.n_impressions = n, src.size
        # One event list: (time, kind 0 features / 1 action, index); stable sort by time.
        kinds = np.concatenate([np.zeros(n, np.int8), np.zeros(src.size, np.int8), np.ones(n, np.int8)])
        times = np.concatenate([ts, ts[src], ts + delay])
        index = np.concatenate([np.arange(n), n + np.arange(src.size), np.arange(n)])
        order = np.lexsort((kinds, times))
        self._kinds, self._times, self._index = kinds[order], times[order], index[order]
        self._user, self._item, self._rating = r.user[:n], r.item[:n], r.rating[:n]
        self._imp_src, self._imp_item = src, imp_item
        self.labels_positive = int(np.sum(self._rating >= MIN_VALUE))

    def __len__(self) -> int:
        return self._kinds.size

    def messages(self):
        from monolith_jax.stream import messages_pb2 as pb

        n = self.n_ratings
        for kind, t, i in zip(self._kinds.tolist(), self._times.tolist(), self._index.tolist()):
            if kind == 0:
                if i < n:
                    rid, u, it = f"r{i}", self._user[i], self._item[i]
                else:
                    j = i - n
                    rid, u, it = f"i{j}", self._user[self._imp_src[j]], self._imp_item[j]
                head = pb.FeatureRecord(version=1, request_id=rid, event_time_ms=t).SerializeToString()
                yield "features", rid, head + self.user_chunk[int(u)] + self.item_chunk[int(it)], t
            else:
                rid = f"r{i}"
                yield "actions", rid, pb.Action(version=1, request_id=rid, event_time_ms=t, type="rate",
                                                value=float(self._rating[i])).SerializeToString(), t
