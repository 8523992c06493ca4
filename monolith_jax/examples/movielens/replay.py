"""The replayer: a logged data set -> the features and actions topics.

    python -m monolith_jax.examples.movielens.replay --bootstrap HOST:PORT [--limit N] [--speed X]

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

import argparse
import json
import sys
import time

import numpy as np

from monolith_jax.features import SparseFeature
from monolith_jax.stream import kafka as K
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


def replay(bootstrap: str, stream: MovieLensStream, topics: dict | None = None, speed: float = 0.0,
           report_every_s: float = 10.0, out=print, stop=None, gate_group: str | None = None,
           max_lag: int = 40_000) -> dict:
    """Produces the stream; returns counts. With `speed` > 0, paces event
    time at `speed` seconds per wall second. With `gate_group`, never runs
    more than `max_lag` messages ahead of that consumer group (the joiner's)."""
    from confluent_kafka import Producer

    topics = {**K.TOPICS, **(topics or {})}
    producer = Producer(K.producer_config(bootstrap))
    gate = K.LagGate(bootstrap, gate_group, [topics["features"], topics["actions"]], max_lag) \
        if gate_group else None
    counts = {"features": 0, "actions": 0}
    t0 = last = time.monotonic()
    first_event = None
    for kind, rid, value, t in stream.messages():
        if stop is not None and stop.is_set():
            break
        if speed > 0:
            first_event = t if first_event is None else first_event
            ahead = (t - first_event) / 1000.0 / speed - (time.monotonic() - t0)
            if ahead > 0:
                producer.poll(0)
                time.sleep(ahead)
        K.produce(producer, topics[kind], value, rid)
        counts[kind] += 1
        if gate is not None:
            gate.step(1, producer, stop)
        if (counts["features"] + counts["actions"]) % 20000 == 0:
            producer.poll(0)
            now = time.monotonic()
            if report_every_s and now - last > report_every_s:
                last = now
                out("replay " + json.dumps(counts), flush=True)
    producer.flush(60)
    counts["seconds"] = time.monotonic() - t0
    if gate is not None:
        counts["backpressure_s"] = round(gate.waited_s, 2)
        gate.close()
    return counts


def main(argv=None) -> int:
    from monolith_jax.examples.movielens.data import load_movielens_1m

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--limit", type=int, default=None, help="replay only the first N ratings")
    p.add_argument("--impressions", type=float, default=1.0, help="unrated impressions per rating")
    p.add_argument("--speed", type=float, default=0.0, help="event seconds per wall second (0: unpaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate-group", default=None, help="consumer group (the joiner's) not to outrun")
    p.add_argument("--max-lag", type=int, default=40_000, help="messages the gate group may fall behind")
    for name in ("features", "actions"):
        p.add_argument(f"--topic-{name}", default=K.TOPICS[name])
    args = p.parse_args(argv)
    stream = MovieLensStream(load_movielens_1m(), args.impressions, seed=args.seed, limit=args.limit)
    counts = replay(args.bootstrap, stream, {"features": args.topic_features, "actions": args.topic_actions},
                    args.speed, gate_group=args.gate_group, max_lag=args.max_lag)
    print("replay done " + json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
