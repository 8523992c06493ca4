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

    def join_grouped(in_cpp: bool):
        """The joiner's whole path to produced values: read, join and group,
        the groups built in C++ (`ExampleGrouper.group_in`) or by the
        grouper from one `emit` callback per example (C++ batch encoder)."""
        from monolith_jax.stream.joiner import ExampleGrouper

        prod = Collect()
        grouper = ExampleGrouper(prod, "examples", 64, encode_batch=enc_batch)
        state = NativeJoinState(join_config(), grouper.add)
        if in_cpp:
            grouper.group_in(state)
        nexts = {}
        for chunk in chunks:
            state.process(chunk, grouper.limit, nexts, slow)
            state.advance()
            grouper.drain()  # no linger (`poll`): where groups end then depends on timing alone
        state.flush()
        grouper.flush()
        state.close()
        return prod.by_partition()

    assert join_grouped(True) == join_grouped(False), "groups built in C++ are the grouper's, byte for byte"
    work = {"read+join": (join_reference, join_native),
            "group": (lambda: group(M.encode_example_batch), lambda: group(enc_batch))}
    whole = {"emit + Python grouper": lambda: join_grouped(False), "groups in C++": lambda: join_grouped(True)}
    per = {k: {"python": [], "native": []} for k in work}
    per["whole"] = {k: [] for k in whole}
    for _ in range(rounds):
        for k, (py, nat) in work.items():
            for name, fn in (("python", py), ("native", nat)):
                t = time.perf_counter()
                fn()
                per[k][name].append((time.perf_counter() - t) / len(msgs) * 1e6)
        for name, fn in whole.items():
            t = time.perf_counter()
            fn()
            per["whole"][name].append((time.perf_counter() - t) / len(msgs) * 1e6)
    med = {k: {name: statistics.median(v) for name, v in d.items()} for k, d in per.items()}
    return {"messages": len(msgs), "examples": len(examples), "rounds": per, "median_us": med}


class Collect:
    """A producer for the stages without a broker: keeps each value it is given
    (delivery is Kafka's part, measured in part "kafka")."""

    def __init__(self, partitions: int = 4):
        self.partitions, self.values = partitions, []

    def list_topics(self, topic, timeout=None):
        from types import SimpleNamespace

        return SimpleNamespace(topics={topic: SimpleNamespace(partitions=dict.fromkeys(range(self.partitions)))})

    def produce(self, topic, value=None, key=None, partition=None, on_delivery=None, **kw):
        self.values.append((partition, value))

    def poll(self, timeout=0):
        return 0

    def by_partition(self) -> dict:
        out = {}
        for p, v in self.values:
            out.setdefault(p, []).append(v)
        return out


# ------------------------------------------------------------------- kafka
def thread_cpu() -> dict:
    """{thread id: (name, CPU seconds)} of this process's threads (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_split(before: dict, after: dict, broker_threads: set) -> dict:
    """CPU seconds between two `thread_cpu` readings, by whose threads: the
    Python thread, the embedded cluster's broker threads (there before the
    joiner's clients), the joiner's Kafka clients (librdkafka threads)."""
    split = {"python": 0.0, "cluster": 0.0, "clients": 0.0}
    for tid, (name, t) in after.items():
        used = t - before.get(tid, (name, 0.0))[1]
        who = "python" if tid == os.getpid() else "cluster" if tid in broker_threads else "clients"
        split[who] += used
    return split


def kafka(n: int, rounds: int, bootstrap: str | None, broker: str = "embedded") -> dict:
    from monolith_jax.stream import kafka as K
    from monolith_jax.stream.broker import BrokerProcess
    from monolith_jax.stream.joiner import Joiner

    start = {"embedded": K.EmbeddedKafka, "tansu": BrokerProcess}[broker] if bootstrap is None else None
    with (start() if start is not None else contextlib.nullcontext()) as cluster:
        bs = bootstrap or (cluster.bootstrap if broker == "embedded" else cluster)
        broker_threads = set(thread_cpu()) - {os.getpid()}  # the embedded cluster's (none for a broker process)
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        from confluent_kafka import Producer

        prod = Producer(K.producer_config(bs))
        msgs = make_messages(n, partitions=K.EMBEDDED_PARTITIONS)
        for topic, p, rid, value in msgs:
            K.produce(prod, topic, value, rid, partition=p)
        assert prod.flush(60) == 0
        per = {**{c: [] for c in CODECS}, "consume only": []}
        cpu = {c: [] for c in CODECS}
        stats = {}
        for r in range(rounds):
            rate = consume_only(bs, f"bench-consume-{r}", len(msgs))
            per["consume only"].append(rate)
            print(f"  round {r + 1}: consume only {rate:10,.0f} messages/s  (the Kafka client's ceiling: "
                  f"consume(5000, 10 ms), nothing done with them)", flush=True)
            for codec in CODECS:
                joiner = Joiner(bs, join_config(), group=f"bench-{codec}-{r}",
                                codec="python" if codec == "python" else "native")
                if codec == PYTHON_GROUPER:
                    python_grouper(joiner)
                process_gc(codec == "native")
                first = last = None
                c0 = c1 = None
                process = joiner.process

                def timed(batch, process=process):
                    nonlocal first, last, c0, c1
                    if batch:
                        if first is None:
                            c0, first = thread_cpu(), time.perf_counter()
                        process(batch)
                        # The clients' threads end with the run: read them after each batch.
                        last, c1 = time.perf_counter(), thread_cpu()

                joiner.process = timed
                try:
                    s = joiner.run(idle_flush_s=1.0, exit_when_idle=True, max_seconds=300, report_every_s=0)
                finally:
                    joiner.close()
                process_gc(False)
                used = cpu_split(c0, c1, broker_threads)
                used["wall"] = last - first
                cpu[codec].append(used)
                rate = (s["features"] + s["actions"]) / (last - first)
                per[codec].append(rate)
                stats[codec] = s
                print(f"  round {r + 1}: {codec:24s} {rate:10,.0f} messages/s  "
                      f"({s['positives']:,} positives, {s['negatives']:,} negatives, "
                      f"{s['dead_letters']} dead letters); CPU s, first to last batch: Python thread "
                      f"{used['python']:.2f}, Kafka clients {used['clients']:.2f}, embedded cluster "
                      f"{used['cluster']:.2f}, in {used['wall']:.2f} s", flush=True)
        for other in CODECS[1:]:
            same = {k: stats["python"][k] == stats[other][k] for k in stats["python"]}
            assert all(same.values()), {k: (stats["python"][k], stats[other][k]) for k, v in same.items() if not v}
    med = {k: statistics.median(v) for k, v in per.items()}
    cpu_med = {c: {k: statistics.median(u[k] for u in v) for k in v[0]} for c, v in cpu.items()}
    return {"messages": len(msgs), "rounds": per, "median": med, "ratio": med["native"] / med["python"],
            "stats": stats, "cpu": cpu, "cpu_median": cpu_med, "broker": broker if bootstrap is None else bootstrap}


PYTHON_GROUPER = "native, Python grouper"
CODECS = ("python", PYTHON_GROUPER, "native")


def python_grouper(joiner) -> None:
    """The C++ joiner as it was before its examples were grouped in C++:
    one `emit` callback per example into the Python grouper."""
    from monolith_jax.stream.native_join import NativeJoinState

    joiner.state.close()
    joiner.state = NativeJoinState(join_config(), joiner._emit, reject=joiner.dead.send,
                                   features_topic=joiner.topics["features"])
    joiner.grouper._native = None


def process_gc(joiner_process: bool) -> None:
    """This process's cyclic collector as the joiner process sets it
    (`joiner.quiet_gc`, for "native"), or as Python's defaults (the joiner
    before it did, for the other two)."""
    import gc

    from monolith_jax.stream.joiner import quiet_gc

    if joiner_process:
        quiet_gc()
    else:
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)


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
    p.add_argument("--broker", choices=["embedded", "tansu", "both"], default="both",
                   help="part kafka on the embedded cluster (its broker threads in this process), on a broker "
                        "process (tansu, monolith_jax.stream.broker), or on each in turn")
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
            if k == "whole":
                continue
            print(f"  {k:9s} python {m['python']:6.2f}   native {m['native']:6.2f}   "
                  f"{m['python'] / m['native']:5.1f}x")
        tot = {c: sum(m[c] for k, m in s["median_us"].items() if k != "whole") for c in ("python", "native")}
        print(f"  total     python {tot['python']:6.2f}   native {tot['native']:6.2f}   "
              f"{tot['python'] / tot['native']:5.1f}x  ({1e6 / tot['python']:,.0f} vs "
              f"{1e6 / tot['native']:,.0f} messages/s)")
        w = s["median_us"]["whole"]
        a, b = w["emit + Python grouper"], w["groups in C++"]
        print(f"  read+join+group, native: emit + Python grouper {a:5.2f}   groups in C++ {b:5.2f}   {a / b:5.2f}x  "
              f"({1e6 / a:,.0f} vs {1e6 / b:,.0f} messages/s)")
        results["stages"] = s
    brokers = ["embedded", "tansu"] if args.broker == "both" else [args.broker]
    for broker in (brokers if args.part in ("kafka", "both") else []):
        where = {"embedded": "on the embedded cluster", "tansu": "on a broker process (tansu)"}[broker]
        print(f"\nJoiner process {where if args.bootstrap is None else 'at ' + args.bootstrap} "
              f"(consume, join, produce, commit), --codec python vs native:")
        k = kafka(args.requests, args.rounds, args.bootstrap, broker)
        m = k["median"]
        print(f"median of {args.rounds} rounds: python {m['python']:,.0f} messages/s, native with the Python "
              f"grouper {m[PYTHON_GROUPER]:,.0f}, native {m['native']:,.0f} messages/s ({k['ratio']:.2f}x python, "
              f"{m['native'] / m[PYTHON_GROUPER]:.2f}x the Python grouper); same counts in all; consume only "
              f"{m['consume only']:,.0f} messages/s (native at {m['native'] / m['consume only']:.2f}x of it)")
        c = k["cpu_median"]
        for codec in CODECS:
            per_msg = {w: c[codec][w] / k["messages"] * 1e6 for w in ("python", "clients", "cluster")}
            print(f"  CPU µs per input message, median: {codec:24s} Python thread {per_msg['python']:.2f}, Kafka "
                  f"clients {per_msg['clients']:.2f}, embedded cluster {per_msg['cluster']:.2f} "
                  f"(first to last batch {c[codec]['wall']:.2f} s)")
        results["kafka" if broker == "embedded" else f"kafka_{broker}"] = k
        if args.bootstrap is not None:
            break
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    shown = os.path.relpath(out_dir) if not os.path.relpath(out_dir).startswith("..") else out_dir
    print(f"wrote {shown}/results.json")
    return results


if __name__ == "__main__":
    main()
