"""Online training from Kafka on MovieLens-1M: the trainer's input speed
against files, and prequential AUC over the replayed stream against a model
frozen after its first 20%.

Throughput: the same joined examples (made by the joiner's own JoinState
from the replay, so byte for byte what the joiner writes) are trained once
from the examples topic (Kafka consumer -> C++ example decoder -> DeepFM
step) and once from a Parquet file (pyarrow reader -> records_to_batch ->
the same step), in alternating rounds, each on a fresh, compiled trainer.

Stream: the whole loop (replayer -> joiner process -> online trainer)
through the embedded Kafka cluster. Each batch is scored before training on
it; once the stream passes 20% of its time span, a copy of the model (table
dump + dense params) is frozen and scores every later batch too: once the stream
has passed the time of its first 20% of ratings. Then the loop once more,
its trainer as the throughput part's (no scores, no frozen copy): the
loop's rate beside the trainer's own on the same work.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np

from monolith_jax.metrics import auc
from monolith_jax.stream import kafka as K
from monolith_jax.examples.movielens import replay as R
from monolith_jax.stream.join_state import JoinConfig, JoinState
from monolith_jax.examples.movielens.loop import movielens_trainer, run_loop
from monolith_jax.stream.messages import ExampleDecoder, parse_action
from monolith_jax.online.trainer import OnlineTrainer

QUIET = dict(out=lambda *a, **k: None)


def joined_examples(ratings, limit: int, negative_rate: float = 0.5, seed: int = 0) -> list:
    """The joiner's output for the first `limit` ratings, made in-process."""
    stream = R.MovieLensStream(ratings, 1.0, seed=seed, limit=limit)
    out = []
    state = JoinState(JoinConfig(window_s=60, lateness_s=1, positive_types=R.POSITIVE_TYPES,
                                 min_value=R.MIN_VALUE, negative_rate=negative_rate,
                                 emit_positives="at_window_end"), lambda rid, ex: out.append(ex))
    for k, (kind, rid, value, t) in enumerate(stream.messages()):
        if kind == "features":
            state.add_features(rid, t, value)
        else:
            a = parse_action(value)
            state.add_action(rid, t, a.type, a.value)
        if k % 1000 == 0:
            state.advance()
    state.flush()
    state.close()
    return out


def examples_to_parquet(examples: list, path: str) -> None:
    """The same examples as a Parquet file of id-list columns and a label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    feats = R.movielens_features()
    dec = ExampleDecoder(feats)
    batch, info, bad = dec.decode(examples, len(examples))
    assert not bad and info["rows"] == len(examples)
    cols = {}
    for f in feats:
        keys = batch.ids[f.name].to_numpy().view(np.int64)
        lens = np.asarray(batch.lengths[f.name])
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        flat = keys[np.arange(f.max_len)[None, :] < lens[:, None]]
        cols[f.name] = pa.ListArray.from_arrays(offsets, flat) if f.max_len > 1 else flat
    cols["label"] = np.asarray(batch.labels)
    pq.write_table(pa.table(cols), path)


def _warm(trainer, path, batch):
    from monolith_jax.io import iter_batches

    warm = list(iter_batches(path, R.movielens_features(), batch_size=batch))[:2]
    trainer.fit(warm)  # compile; the same two batches for both paths


def throughput(ratings, n_examples: int = 60_000, batch: int = 1024, rounds: int = 5, passes: int = 3,
               out=print) -> dict:
    """examples/s into the DeepFM trainer: from the examples topic vs from a
    Parquet file, alternating, `rounds` each of `passes` passes over the
    same `n_examples` (the embedded cluster keeps ~5 MB per partition, so
    longer runs read the topic again rather than hold more)."""
    from monolith_jax.io import iter_batches

    examples = []
    limit = n_examples
    while len(examples) < n_examples:
        examples = joined_examples(ratings, limit)
        if len(examples) < n_examples and limit >= len(ratings):  # all of them in: more would not come
            raise ValueError(f"{len(ratings):,} ratings join to {len(examples):,} examples, fewer than the "
                             f"{n_examples:,} asked for (--examples)")
        limit = int(limit * 1.5)
    examples = examples[:n_examples]
    rates = {"kafka": [], "file": [], "ratio": []}
    with tempfile.TemporaryDirectory() as tmp, K.EmbeddedKafka() as kafka:
        path = os.path.join(tmp, "examples.parquet")
        examples_to_parquet(examples, path)
        topic = "bench-examples"
        K.ensure_topics(kafka.bootstrap, {topic: K.EMBEDDED_PARTITIONS})
        from confluent_kafka import Producer
        prod = Producer(K.producer_config(kafka.bootstrap))
        from monolith_jax.stream.joiner import ExampleGrouper
        grouper = ExampleGrouper(prod, topic)  # as the joiner writes them: groups of 64 per partition
        for i, ex in enumerate(examples):
            grouper.add(str(i), ex)
        grouper.flush()
        prod.flush(60)
        for r in range(rounds):
            tr = movielens_trainer(seed=r, **QUIET)
            _warm(tr, path, batch)
            t0 = time.perf_counter()
            seen = 0
            for _ in range(passes):
                seen += tr.fit(iter_batches(path, R.movielens_features(), batch_size=batch))["examples"]
            jax.block_until_ready(tr.params)
            rates["file"].append(seen / (time.perf_counter() - t0))

            tr = movielens_trainer(seed=r, **QUIET)
            _warm(tr, path, batch)
            seen, span = 0, 0.0
            for p in range(passes):  # each pass reads the topic again, in a new consumer group
                online = OnlineTrainer(tr, kafka.bootstrap, {"examples": topic}, f"bench-{r}-{p}-{time.time()}",
                                       batch_size=batch, max_wait_s=0.2, prequential=False, **QUIET)
                s = online.run(max_examples=n_examples, max_seconds=120, report_every_s=0)
                assert n_examples <= s["examples"] < n_examples + 64 and s["dead_letters"] == 0, s
                seen += s["examples"]
                span += s["examples"] / s["examples_per_s"]
            rates["kafka"].append(seen / span)
            rates["ratio"].append(rates["kafka"][-1] / rates["file"][-1])
            out(f"  round {r + 1}: file {rates['file'][-1]:>10,.0f} ex/s   kafka {rates['kafka'][-1]:>10,.0f} ex/s"
                f"   ratio {rates['ratio'][-1]:.2f}")
    med = {k: float(np.median(v)) for k, v in rates.items()}
    return {"rounds": rates, "median": med, "ratio": med["ratio"], "examples": n_examples * passes}


def replay_encoding(ratings, limit: int = 200_000, rounds: int = 5, out=print) -> dict:
    """µs per message of the replay's messages (`MovieLensStream.messages`,
    written field by field) against protobuf objects per message (as the
    replayer wrote them before), the same messages, rounds interleaved."""
    from monolith_jax.stream import messages_pb2 as pb

    stream = R.MovieLensStream(ratings, 1.0, seed=0, limit=limit)
    n = stream.n_ratings

    def with_protobuf():
        for kind, t, i in zip(stream._kinds.tolist(), stream._times.tolist(), stream._index.tolist()):
            if kind == 0:
                if i < n:
                    rid, u, it = f"r{i}", stream._user[i], stream._item[i]
                else:
                    rid, u, it = f"i{i - n}", stream._user[stream._imp_src[i - n]], stream._imp_item[i - n]
                head = pb.FeatureRecord(version=1, request_id=rid, event_time_ms=t).SerializeToString()
                yield "features", rid, head + stream.user_chunk[int(u)] + stream.item_chunk[int(it)], t
            else:
                rid = f"r{i}"
                yield "actions", rid, pb.Action(version=1, request_id=rid, event_time_ms=t, type="rate",
                                                value=float(stream._rating[i])).SerializeToString(), t

    assert list(with_protobuf()) == list(stream.messages()), "the same messages, byte for byte"
    per = {"protobuf objects": [], "field by field": []}
    for r in range(rounds):
        for name, make in (("protobuf objects", with_protobuf), ("field by field", stream.messages)):
            t0 = time.perf_counter()
            for _ in make():
                pass
            per[name].append((time.perf_counter() - t0) / len(stream) * 1e6)
        out(f"  round {r + 1}: protobuf objects {per['protobuf objects'][-1]:.2f} µs/message, field by field "
            f"{per['field by field'][-1]:.2f}")
    med = {k: float(np.median(v)) for k, v in per.items()}
    return {"rounds": per, "median_us": med, "messages": len(stream)}


class Frozen:
    """on_batch hook: freezes a copy of the model once the stream passes
    `freeze_ms`, then scores every later batch with it."""

    def __init__(self, freeze_ms: int, seed: int):
        self.freeze_ms = freeze_ms
        self.seed = seed
        self.copy = None
        self.at_example = None
        self.labels, self.frozen, self.online_idx = [], [], []

    def __call__(self, online, batch, info):
        rows = info["rows"]
        if self.copy is None:
            if int(info["event_time_ms"].max()) < self.freeze_ms:
                return
            self.copy = movielens_trainer(self.seed, **QUIET)
            self.copy.load_state_dict(online.trainer.state_dict())
            self.at_example = online.examples
            return
        self.labels.append(np.asarray(batch.labels)[:rows])
        self.frozen.append(self.copy.predict(batch)[:rows])
        self.online_idx.append(online.examples - rows)


def stream(ratings, limit: int | None = None, seed: int = 0, out=print, bootstrap: str | None = None) -> dict:
    n = len(ratings) if limit is None else min(limit, len(ratings))
    freeze_ms = int(np.sort(ratings.timestamp[:n])[int(0.2 * n)]) * 1000  # after 20% of the requests
    frozen = Frozen(freeze_ms, seed)
    t0 = time.perf_counter()
    s = run_loop(limit=limit, bootstrap=bootstrap, seed=seed, ratings=ratings, on_batch=frozen, out=out,
                 report_every_s=15)
    wall = time.perf_counter() - t0
    y, scores, times = s["online"].log.arrays()
    after = slice(frozen.at_example, None)
    fy = np.concatenate(frozen.labels)
    fs = np.concatenate(frozen.frozen)
    assert np.array_equal(fy, y[after][: fy.size]), "frozen and online scored the same examples"
    n_after = fy.size
    seg = 10
    edges = np.linspace(0, y.size, seg + 1).astype(int)
    online_seg = [auc(y[a:b], scores[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    frozen_seg = []
    for a, b in zip(edges[:-1], edges[1:]):
        lo, hi = max(a - frozen.at_example, 0), max(b - frozen.at_example, 0)
        frozen_seg.append(auc(fy[lo:hi], fs[lo:hi]) if hi - lo > 100 else float("nan"))
    online_last = auc(y[after][:n_after], scores[after][:n_after])
    frozen_last = auc(fy, fs)
    last_tenth = slice(edges[-2], None)
    return {"wall_s": wall, "examples": s["examples"], "examples_per_s": s["examples_per_s"],
            "joined": s["joined"], "replayed": s["replayed"], "frozen_at_example": frozen.at_example,
            "trainer_offsets_lost": s["offsets_lost"],
            "online_after_freeze": online_last, "frozen_after_freeze": frozen_last,
            "online_segments": online_seg, "frozen_segments": frozen_seg,
            "online_last_tenth": auc(y[last_tenth], scores[last_tenth]),
            "frozen_last_tenth": frozen_seg[-1], "stream_auc": s["stream_auc"],
            "segment_times": [int(times[a]) // 1000 for a in edges[:-1]]}


def loop_rate(ratings, limit: int | None = None, seed: int = 0, bootstrap: str | None = None) -> dict:
    """The same loop, its trainer set up as `throughput` measures it: no
    prequential scores and no frozen copy scoring each batch (the stream
    part's measurement, done in the trainer's thread)."""
    t0 = time.perf_counter()
    s = run_loop(limit=limit, bootstrap=bootstrap, seed=seed, ratings=ratings, out=QUIET["out"], report_every_s=0,
                 prequential=False)
    return {"wall_s": time.perf_counter() - t0, "examples": s["examples"], "examples_per_s": s["examples_per_s"]}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(1, len(result["online_segments"]) + 1) * 10
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, result["online_segments"], "o-", label="online (prequential)")
    ax.plot(x, result["frozen_segments"], "s--", label="frozen after 20% of the stream")
    ax.set_xlabel("stream position (% of examples)")
    ax.set_ylabel("AUC of the tenth")
    ax.set_title("MovieLens-1M replay: replay -> joiner -> online DeepFM")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
