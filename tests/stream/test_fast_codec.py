"""The joiner's C++ codec against the protobuf reference: it takes a message
only when the reference reads it the same way, hands every other one back
("slow") for the reference to read or name, never crashes on any input,
and writes the reference's Example and ExampleBatch bytes. A join fed by
it emits what a join fed by the reference emits. The job here is an ad
auction log (advertiser, creative, query terms, bid, position), not
MovieLens."""

import math
import random

import confluent_kafka as ck
import pytest

from monolith_jax.features import DenseFeature, SparseFeature
from monolith_jax.stream import fast_codec
from monolith_jax.stream import messages as M
from monolith_jax.stream import messages_pb2 as pb
from monolith_jax.stream.join_state import JoinConfig, JoinState

SPARSE = (SparseFeature("advertiser", "ads"), SparseFeature("creative", "ads"),
          SparseFeature("terms", "words", column="query_terms", max_len=6))
DENSE = (DenseFeature("bid"), DenseFeature("position", fill=0.0))
T0 = 1_700_000_000_000


def features(rng, i, t=None, **over):
    sparse = {"advertiser": [rng.randrange(50)], "creative": [rng.randrange(500)],
              "query_terms": [rng.randrange(10**6) for _ in range(rng.randrange(0, 5))]}
    dense = {"bid": rng.random(), "position": float(rng.randrange(8))}
    sparse.update(over.get("sparse", {}))
    dense.update(over.get("dense", {}))
    for k in over.get("drop", ()):
        sparse.pop(k, None)
        dense.pop(k, None)
    return M.encode_features(over.get("rid", f"ad{i}"), T0 + i * 10 if t is None else t, sparse, dense)


def msg(topic, value, offset=0, partition=0):
    return ck.Message(topic=topic, partition=partition, offset=offset, value=value, key=b"k")


def reference(topic, value, dense=DENSE, sparse=SPARSE):
    """What the reference reads from a value: a record's fields, or None (refused)."""
    try:
        if topic == "features":
            rec = M.parse_features(value, dense, sparse)
            return rec.request_id, rec.event_time_ms
        act = M.parse_action(value)
        return act.request_id, act.event_time_ms, act.type, act.value
    except M.MessageError:
        return None


def odd_values(rng, topic):
    """Values of every shape: garbled, truncated, nested, huge, JSON, legal but unusual."""
    good = features(rng, 1) if topic == "features" else M.encode_action("ad1", T0, "click", 2.5)
    out = [b"", b"{}", b'{"request_id": "x"}', b"  \n{", b"[" * 10_000, good[:-1], good + b"\x00",
           b"\x08\x03" + good, good + b"\x08\x03",  # a newer schema version, before or after
           good + b"\x0b\x0c",  # an unknown group field: legal, beyond the C++ reader
           good + b"\xa0\x06\x05",  # an unknown varint field: taken
           good + b"\x12\x02\xc3\x28",  # a request id of invalid UTF-8
           good + b"\x12\x03\xe2\x82\xac",  # a request id of valid UTF-8 (the euro sign)
           good + b"\x12\x00",  # an empty request id, last wins
           good + b"\x18" + b"\xff" * 10 + b"\x01",  # a varint of 11 bytes
           good + b"\x1a\x01\x00",  # event time with the length-delimited wire type
           b"\x08\x01" + b"\xff" * 100_000, bytes(2_000_000)]
    out += [good[:k] for k in range(1, len(good))]
    out += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 80))) for _ in range(1500)]
    for _ in range(1500):  # one byte changed
        b = bytearray(good)
        b[rng.randrange(len(b))] = rng.getrandbits(8)
        out.append(bytes(b))
    if topic == "features":
        out += [features(rng, 2, dense={"bid": float("nan")}), features(rng, 3, dense={"position": float("inf")}),
                features(rng, 4, drop=["query_terms"]), features(rng, 5, drop=["bid"]),
                features(rng, 6, drop=["position"]), features(rng, 7, sparse={"query_terms": []}),
                features(rng, 8, rid=""), features(rng, 9, t=-5), features(rng, 10, t=2**63 - 1),
                features(rng, 11, rid="añuncio-€-😀"),
                pb.FeatureRecord(request_id="two", dense=[pb.FloatList(name="bid", values=[1.0, 2.0])],
                                 sparse=[pb.IdList(name=f.source) for f in SPARSE]).SerializeToString()]
    else:
        out += [M.encode_action("a", T0, ""), M.encode_action("", T0, "click"),
                M.encode_action("a", T0, "click", float("nan")), M.encode_action("a", -1, "view", -3.0),
                M.encode_action("a", T0, "clíck")]
    return out


@pytest.mark.parametrize("topic", ["features", "actions"])
def test_the_reader_takes_only_what_the_reference_reads_the_same_way(topic):
    rng = random.Random(7)
    values = odd_values(rng, topic)
    if topic == "features":
        values += [features(rng, i) for i in range(300)]
    else:
        values += [M.encode_action(f"ad{i}", T0 + i, rng.choice(["click", "view"]), rng.random()) for i in range(300)]
    reader = fast_codec.StreamReader("features", DENSE, SPARSE)
    msgs = [msg(topic, v, offset=k) for k, v in enumerate(values)] + [msg(topic, None, offset=len(values))]
    nexts = {}
    items = reader.read(msgs, 1_000_000, nexts)
    assert len(items) == len(msgs) and nexts == {(topic, 0): len(msgs)}
    taken = 0
    for item, m in zip(items, msgs):
        want = reference(topic, m.value())
        if item[0] == "slow":
            assert item[1] is m
            continue
        taken += 1
        assert item[0] == topic and item[-1] is m and item[4] == (topic, 0, m.offset())
        assert want is not None, m.value()[:40]
        if topic == "features":
            assert (item[1], item[2]) == want and item[3] is m.value()
        else:
            assert (item[1], item[2], *item[3]) == want
    # Every usable ordinary message is taken, and the odd ones the reference reads too.
    assert taken >= 300 + 3
    assert sum(reference(topic, v) is not None for v in values) >= taken


def test_the_reader_applies_the_jobs_rules_only_when_given_them():
    rng = random.Random(1)
    values = [features(rng, 0, drop=["query_terms"]), features(rng, 1, dense={"position": float("nan")}),
              features(rng, 2, dense={"bid": float("nan")})]
    msgs = [msg("features", v) for v in values]
    with_job = [i[0] for i in fast_codec.StreamReader("features", DENSE, SPARSE).read(msgs, 10**6, {})]
    without = [i[0] for i in fast_codec.StreamReader("features").read(msgs, 10**6, {})]
    assert with_job == ["slow", "features", "slow"]  # lacks a sparse feature; fill declared; no fill
    assert without == ["features", "slow", "slow"]   # no job: every dense value must be finite
    assert [reference("features", v) is not None for v in values] == [False, True, False]
    assert [reference("features", v, (), ()) is not None for v in values] == [True, False, False]


def test_a_record_too_large_for_the_examples_topic_goes_to_the_reference():
    rng = random.Random(2)
    small, big = features(rng, 0), features(rng, 1, sparse={"query_terms": list(range(3000))})
    items = fast_codec.StreamReader("features").read([msg("features", small), msg("features", big)], 10_000, {})
    assert [i[0] for i in items] == ["features", "slow"]


def test_kafka_events_are_passed_through_in_order():
    eof = ck.Message(topic="actions", partition=3, offset=9, error=ck.KafkaError(ck.KafkaError._PARTITION_EOF))
    ok = msg("actions", M.encode_action("a", T0, "click"), offset=4, partition=3)
    items = fast_codec.StreamReader("features").read([ok, eof], 10**6, {})
    assert [i[0] for i in items] == ["actions", "event"] and items[1][1] is eof


def test_examples_and_batches_are_the_references_bytes():
    rng = random.Random(3)
    times = [0, 1, -1, 127, 128, T0, 2**63 - 1, -(2**63), 2**64 + 5, -(2**70)]
    examples = []
    for k in range(300):
        rec = features(rng, k) if k % 7 else b""
        label, rate, t = float(k % 2), rng.random() or 1.0, times[k % len(times)] if k % 3 else rng.randrange(2**40)
        ours = fast_codec.encode_example(rec, label, rate, t)
        assert ours == M.encode_example(rec, label, rate, t)
        if -(2**63) <= t < 2**63:
            assert pb.Example.FromString(ours) == pb.Example(
                version=1, features=pb.FeatureRecord.FromString(rec), label=label, sample_rate=rate, label_time_ms=t)
        examples.append(ours)
    for n in (0, 1, 2, 64, 300):
        assert fast_codec.encode_example_batch(examples[:n]) == M.encode_example_batch(examples[:n])
    for size in (0, 1, 127, 128, 16_383, 16_384, 2**21):  # the grouper's size accounting, at each varint length
        assert len(M.encode_example_batch([bytes(size)])) == M.BATCH_OVERHEAD + M.batch_entry_size(size)
    with pytest.raises(TypeError):
        fast_codec.encode_example_batch([b"ok", "not bytes"])


def random_stream(seed, n=2500, outliers=0):
    """Features and actions of requests on two partitions, out of order
    within the lateness, with repeats, orphans, late and odd messages, and
    `outliers` records an hour ahead of their place in the stream."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        p = i % 2
        t = T0 + i * 40 + rng.randrange(200)
        events.append((t, "features", features(rng, i, t=t), p))
        for _ in range(rng.choice([0, 0, 1, 1, 1, 2])):
            ta = t + rng.randrange(0, 90_000)
            events.append((ta, "actions", M.encode_action(f"ad{i}", ta, rng.choice(["click", "click", "view"]),
                                                          rng.random()), p))
    for j in range(40):
        t = T0 + rng.randrange(n * 40)
        events.append((t, "actions", M.encode_action(f"orphan{j}", t, "click"), j % 2))
    for j in range(outliers):
        t = T0 + rng.randrange(n * 40)
        value = (features(rng, n + j, t=t + 3_600_000) if j % 2 else
                 M.encode_action(f"ad{rng.randrange(n)}", t + 3_600_000, "click"))
        events.append((t, "features" if j % 2 else "actions", value, j % 2))
    events.sort(key=lambda e: e[0] + rng.randrange(3000))
    odd = odd_values(rng, "features")[:40] + odd_values(rng, "actions")[:40]
    for k, v in enumerate(odd):
        events.insert(rng.randrange(len(events)), (0, "features" if k < 40 else "actions", v, k % 2))
    offsets = {}
    msgs = []
    for _, topic, value, p in events:
        off = offsets.get((topic, p), 0)
        offsets[(topic, p)] = off + 1
        msgs.append(msg(topic, value, off, p))
    return msgs


def run_join(msgs, native: bool, config: JoinConfig, chunk=500):
    """Every message through a JoinState, by the reference or by the C++ reader."""
    out, refused = [], []
    encode = fast_codec.encode_example if native else M.encode_example
    state = JoinState(config, lambda rid, ex: out.append((rid, ex)), reject=lambda ref, why: refused.append(why),
                      clock=lambda: (T0 + 10**9) / 1000, encode=encode)
    state.set_partitions({(t, p) for t in ("features", "actions") for p in (0, 1)})
    reader = fast_codec.StreamReader("features", DENSE, SPARSE)

    def by_reference(m):
        origin = (m.topic(), m.partition(), m.offset())
        try:
            if m.topic() == "features":
                rec = M.parse_features(m.value(), DENSE, SPARSE)
                state.add_features(rec.request_id, rec.event_time_ms, M.features_to_binary(m.value(), rec), origin, m)
            else:
                a = M.parse_action(m.value())
                state.add_action(a.request_id, a.event_time_ms, a.type, a.value, origin, m)
        except M.MessageError as err:
            refused.append(err.reason)

    for s in range(0, len(msgs), chunk):
        part = msgs[s:s + chunk]
        if native:
            for item in reader.read(part, 10**6, {}):
                if item[0] == "slow":
                    by_reference(item[1])
                else:
                    state.add_record(item)
        else:
            for m in part:
                by_reference(m)
        state.advance()
    low = state.low_offsets()
    state.flush()
    counts = dict(state.counts)
    state.close()
    return out, refused, counts, low


@pytest.mark.parametrize("config", [
    JoinConfig(window_s=60, lateness_s=3, negative_rate=0.5, positive_types=("click",), min_value=0.2),
    JoinConfig(window_s=30, lateness_s=3, max_in_memory=50, emit_positives="at_window_end"),
], ids=["sampled", "spilling-at-window-end"])
def test_a_join_fed_by_the_reader_emits_what_one_fed_by_the_reference_emits(config):
    msgs = random_stream(11)
    ours = run_join(msgs, True, config)
    theirs = run_join(msgs, False, config)
    assert ours == theirs
    out, refused, counts, _ = ours
    assert counts["positives"] > 100 and counts["negatives"] > 100 and len(refused) >= 60
    assert all(math.isfinite(pb.Example.FromString(ex).label) for _, ex in out)
    if config.max_in_memory == 50:
        assert counts["spilled"] > 0
