"""The joiner's throughput: the protobuf reference path against the C++ path, in one run.

    python -m experiments.joiner.main                  # both parts (~3 min); replaces results/
    python -m experiments.joiner.main --part stages    # no Kafka, ~30 s, into a run folder
    python -m experiments.joiner.main --part kafka --requests 40000

Part "stages" feeds pre-made Kafka messages (confluent_kafka.Message
objects, batches of 5,000 as `consume` returns them) through each stage of
the joiner's processing without a broker, and prints microseconds per
input message for the reference (Python) and the C++ path side by side:
reading features/actions messages, the join state (with its Example
encoding), and grouping the examples into ExampleBatch values.

Part "kafka" runs the whole `Joiner` (consume features and actions,
join, produce ExampleBatches, commit) on the embedded cluster over the
same messages with `--codec python` and `--codec native`, alternating,
and prints input messages per second from its first consumed message to
its last; beside them, a consumer that only reads the same messages (the
Kafka client's and the cluster's own ceiling).

Any run with flags writes to a fresh run folder (experiments/run_folder.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import time
import zlib

from experiments import run_folder

AD_TYPES = ("click", "click", "view", "convert")


def make_messages(n: int, seed: int = 0, partitions: int = 4):
    """An ad-serving stream: n requests (advertiser, creative, query terms,
    bid, position), ~60% with one or two actions up to 20 s later; the
    event times end an hour before now. Values in partition order as a
    producer keyed by request id would write them: [(topic, partition, key, value)]."""
    from monolith_jax.stream.messages import encode_action, encode_features

    rng = random.Random(seed)
    t0 = int(time.time() * 1000) - 3_600_000 - n * 2
    events = []
    for i in range(n):
        rid = f"req-{seed}-{i}"
        t = t0 + i * 2
        p = zlib.crc32(rid.encode()) % partitions
        events.append((t, "features", p, rid, encode_features(
            rid, t, {"advertiser": [rng.randrange(2000)], "creative": [rng.randrange(50_000)],
                     "query_terms": [rng.randrange(10**6) for _ in range(rng.randrange(1, 5))]},
            {"bid": rng.random() * 3, "position": float(rng.randrange(10))})))
        for _ in range(rng.choice((0, 0, 0, 0, 1, 1, 1, 1, 1, 2))):
            ta = t + rng.randrange(20_000)
            events.append((ta, "actions", p, rid, encode_action(rid, ta, rng.choice(AD_TYPES), rng.random())))
    events.sort(key=lambda e: e[0])
    return [(topic, p, rid, value) for _, topic, p, rid, value in events]


def join_config():
    from monolith_jax.stream.join_state import JoinConfig

    return JoinConfig(window_s=10.0, lateness_s=2.0, positive_types=("click", "convert"), negative_rate=0.5)


# ------------------------------------------------------------------ stages
def stages(n: int, rounds: int) -> dict:
    import confluent_kafka as ck

    from monolith_jax.stream import fast_codec
    from monolith_jax.stream import messages as M
    from monolith_jax.stream.join_state import JoinState
    from monolith_jax.stream.native_join import NativeJoinState

    offsets = {}
    msgs = []
    for topic, p, rid, value in make_messages(n):
        off = offsets.get((topic, p), 0)
        offsets[(topic, p)] = off + 1
        msgs.append(ck.Message(topic=topic, partition=p, offset=off, value=value, key=rid.encode()))
    chunks = [msgs[s:s + 5000] for s in range(0, len(msgs), 5000)]
    enc_batch = fast_codec.encoders()[1]

    def join_reference():
        """As the joiner with --codec python: parse each message, into JoinState."""
        examples = []
        state = JoinState(join_config(), lambda rid, ex: examples.append((rid, ex)))
        for chunk in chunks:
            for m in chunk:
                value, origin = m.value(), (m.topic(), m.partition(), m.offset())
                if m.topic() == "features":
                    rec = M.parse_features(value)
                    state.add_features(rec.request_id, rec.event_time_ms, M.features_to_binary(value, rec), origin, m)
                else:
                    a = M.parse_action(value)
                    state.add_action(a.request_id, a.event_time_ms, a.type, a.value, origin, m)
            state.advance()
        state.flush()
        state.close()
        return examples

    def join_native():
        """As the joiner with --codec native: each batch read and joined in C++."""
        examples, nexts = [], {}
        state = NativeJoinState(join_config(), lambda rid, ex: examples.append((rid, ex)))
        for chunk in chunks:
            state.process(chunk, 1 << 20, nexts, slow)
            state.advance()
        state.flush()
        state.close()
        return examples

    def slow(msg):
        raise AssertionError(f"every message here is one the C++ reader takes: {msg.value()[:40]!r}")

    examples = join_reference()
    assert examples == join_native(), "the C++ join emits the reference's examples"

    def group(encode_batch):
        groups, values = {}, []
        for rid, ex in examples:  # as ExampleGrouper.add: a partition by request id, 64 per value
            g = groups.setdefault(zlib.crc32(rid.encode()) % 4, [])
            g.append(ex)
            if len(g) >= 64:
                values.append(encode_batch(g))
                groups[zlib.crc32(rid.encode()) % 4] = []
        return values + [encode_batch(g) for g in groups.values() if g]

    assert group(M.encode_example_batch) == group(enc_batch)
    work = {"read+join": (join_reference, join_native),
            "group": (lambda: group(M.encode_example_batch), lambda: group(enc_batch))}
    per = {k: {"python": [], "native": []} for k in work}
    for _ in range(rounds):
        for k, (py, nat) in work.items():
            for name, fn in (("python", py), ("native", nat)):
                t = time.perf_counter()
                fn()
                per[k][name].append((time.perf_counter() - t) / len(msgs) * 1e6)
    med = {k: {name: statistics.median(v) for name, v in d.items()} for k, d in per.items()}
    return {"messages": len(msgs), "examples": len(examples), "rounds": per, "median_us": med}


# ------------------------------------------------------------------- kafka
def kafka(n: int, rounds: int, bootstrap: str | None) -> dict:
    from monolith_jax.stream import kafka as K
    from monolith_jax.stream.joiner import Joiner

    with (K.EmbeddedKafka() if bootstrap is None else contextlib.nullcontext()) as cluster:
        bs = bootstrap or cluster.bootstrap
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        from confluent_kafka import Producer

        prod = Producer(K.producer_config(bs))
        msgs = make_messages(n, partitions=K.EMBEDDED_PARTITIONS)
        for topic, p, rid, value in msgs:
            K.produce(prod, topic, value, rid, partition=p)
        assert prod.flush(60) == 0
        per = {"python": [], "native": [], "consume only": []}
        stats = {}
        for r in range(rounds):
            rate = consume_only(bs, f"bench-consume-{r}", len(msgs))
            per["consume only"].append(rate)
            print(f"  round {r + 1}: consume only {rate:10,.0f} messages/s  (the Kafka client's ceiling: "
                  f"consume(5000, 10 ms), nothing done with them)", flush=True)
            for codec in ("python", "native"):
                joiner = Joiner(bs, join_config(), group=f"bench-{codec}-{r}", codec=codec)
                first = last = None
                process = joiner.process

                def timed(batch, process=process):
                    nonlocal first, last
                    if batch:
                        first = first or time.perf_counter()
                        process(batch)
                        last = time.perf_counter()

                joiner.process = timed
                try:
                    s = joiner.run(idle_flush_s=1.0, exit_when_idle=True, max_seconds=300, report_every_s=0)
                finally:
                    joiner.close()
                rate = (s["features"] + s["actions"]) / (last - first)
                per[codec].append(rate)
                stats[codec] = s
                print(f"  round {r + 1}: {codec:12s} {rate:10,.0f} messages/s  "
                      f"({s['positives']:,} positives, {s['negatives']:,} negatives, "
                      f"{s['dead_letters']} dead letters)", flush=True)
        same = {k: stats["python"][k] == stats["native"][k] for k in stats["python"]}
        assert all(same.values()), {k: (stats["python"][k], stats["native"][k]) for k, v in same.items() if not v}
    med = {k: statistics.median(v) for k, v in per.items()}
    return {"messages": len(msgs), "rounds": per, "median": med, "ratio": med["native"] / med["python"],
            "stats": stats}


def consume_only(bs: str, group: str, n: int) -> float:
    """Messages/s of a consumer configured as the joiner's that only counts
    what it reads: the ceiling the Kafka client and broker set."""
    from confluent_kafka import Consumer

    from monolith_jax.stream import kafka as K

    con = Consumer(K.consumer_config(bs, group, **{"enable.auto.commit": False}))
    con.subscribe([K.TOPICS["features"], K.TOPICS["actions"]])
    got, first, last, t0 = 0, None, None, time.monotonic()
    try:
        while got < n and time.monotonic() - t0 < 300:
            batch = con.consume(num_messages=5000, timeout=0.01)
            real = sum(m.error() is None for m in batch)
            if real:
                first = first or time.perf_counter()
                got += real
                last = time.perf_counter()
    finally:
        con.close()
    return got / (last - first)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["stages", "kafka", "both"], default="both")
    p.add_argument("--requests", type=int, default=60_000, help="requests in the stream (~1.1 messages each)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bootstrap", default=None, help="a Kafka cluster to use instead of the embedded one")
    p.add_argument("--out", default=None, help="results folder (default: results/ for the default command)")
    args = p.parse_args(argv)
    out_dir = str(run_folder.output_dir("joiner", p, args, full_size_flags=("bootstrap",)))
    logging.basicConfig(level=logging.WARNING)
    results = {}
    if args.part in ("stages", "both"):
        s = stages(args.requests, args.rounds)
        print(f"Joiner stages without Kafka, {s['messages']:,} messages ({s['examples']:,} examples), "
              f"µs per input message, median of {args.rounds} rounds:")
        for k, m in s["median_us"].items():
            print(f"  {k:9s} python {m['python']:6.2f}   native {m['native']:6.2f}   "
                  f"{m['python'] / m['native']:5.1f}x")
        tot = {c: sum(m[c] for m in s["median_us"].values()) for c in ("python", "native")}
        print(f"  total     python {tot['python']:6.2f}   native {tot['native']:6.2f}   "
              f"{tot['python'] / tot['native']:5.1f}x  ({1e6 / tot['python']:,.0f} vs "
              f"{1e6 / tot['native']:,.0f} messages/s)")
        results["stages"] = s
    if args.part in ("kafka", "both"):
        print(f"\nJoiner process on the embedded cluster (consume, join, produce, commit), "
              f"--codec python vs native:")
        k = kafka(args.requests, args.rounds, args.bootstrap)
        print(f"median of {args.rounds} rounds: python {k['median']['python']:,.0f} messages/s, native "
              f"{k['median']['native']:,.0f} messages/s, {k['ratio']:.2f}x; same counts in both; consume only "
              f"{k['median']['consume only']:,.0f} messages/s (native at "
              f"{k['median']['native'] / k['median']['consume only']:.2f}x of it)")
        results["kafka"] = k
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    shown = os.path.relpath(out_dir) if not os.path.relpath(out_dir).startswith("..") else out_dir
    print(f"wrote {shown}/results.json")
    return results


if __name__ == "__main__":
    main()
