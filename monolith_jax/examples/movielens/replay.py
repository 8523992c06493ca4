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
from monolith_jax.stream.messages import _varint
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


def varints(values: np.ndarray) -> list:
    """Each int64 as protobuf writes it: a varint of its two's complement."""
    v = np.asarray(values, np.int64).astype(np.uint64)
    groups = np.stack([(v >> np.uint64(7 * k)) & np.uint64(0x7F) for k in range(10)], axis=1).astype(np.uint8)
    length = 1 + sum(((v >> np.uint64(7 * k)) != 0).astype(np.int64) for k in range(1, 10))
    more = np.arange(10)[None, :] < (length - 1)[:, None]
    flat = (groups | (more.astype(np.uint8) << 7)).tobytes()
    return [flat[10 * k:10 * k + int(m)] for k, m in enumerate(length.tolist())]


def _length(n: int) -> bytes:
    return _ONE_BYTE[n] if n < 128 else _varint(n)


_ONE_BYTE = [bytes((n,)) for n in range(128)]


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

    def messages(self, chunk: int = 1 << 16):
        """The messages, written field by field as protobuf writes them (the
        same bytes as `FeatureRecord(...)` / `Action(...).SerializeToString()`,
        tests/examples/test_replay.py): the replayer runs in the trainer's
        process, where a protobuf object per message held the GIL for a
        sizable share of the loop. Event times' varints are made a chunk at a
        time with numpy."""
        import struct

        n = self.n_ratings
        user, item, rating = self._user.tolist(), self._item.tolist(), self._rating.tolist()
        imp_src, imp_item = self._imp_src.tolist(), self._imp_item.tolist()
        user_chunk, item_chunk = self.user_chunk, self.item_chunk
        # Action fields 4 and 5 (type "rate", the rating as a float; proto3 leaves out +0.0).
        tails = {}
        for s in range(0, self._kinds.size, chunk):
            kinds = self._kinds[s:s + chunk].tolist()
            times = self._times[s:s + chunk]
            index = self._index[s:s + chunk].tolist()
            for kind, t, tv, i in zip(kinds, times.tolist(), varints(times), index):
                if kind == 0:
                    if i < n:
                        rid, u, it = f"r{i}", user[i], item[i]
                    else:
                        j = i - n
                        rid, u, it = f"i{j}", user[imp_src[j]], imp_item[j]
                    b = rid.encode()
                    head = b"\x08\x01\x12" + _length(len(b)) + b + (b"\x18" + tv if t else b"")
                    yield "features", rid, head + user_chunk[u] + item_chunk[it], t
                else:
                    rid = f"r{i}"
                    b = rid.encode()
                    value = float(rating[i])
                    tail = tails.get(value)
                    if tail is None:
                        bits = struct.pack("<f", value)
                        tail = tails[value] = b'"\x04rate' + (b"\x2d" + bits if bits != bytes(4) else b"")
                    yield "actions", rid, b"\x08\x01\x12" + _length(len(b)) + b + (b"\x18" + tv if t else b"") + tail, t
