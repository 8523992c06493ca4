"""Examples grouped in C++ (`ExampleGrouper.group_in`, ffi/src/example_groups.cc)
against the Python grouper on the same join: the same values, byte for
byte, on the same partitions; and delivery (halves, dead letters) of groups
built there."""

import random
import zlib

import pytest

from monolith_jax.job import LabelRule
from monolith_jax.stream import messages as M
from monolith_jax.stream import messages_pb2 as pb
from monolith_jax.stream.dead_letters import DeadLetters
from monolith_jax.stream.join_state import JoinConfig
from monolith_jax.stream.joiner import ExampleGrouper
from monolith_jax.stream.native_join import NativeJoinState
from tests.stream.test_joiner import BrokerWithLowerLimit


class Recorder:
    """A producer that delivers everything and keeps (partition, value) per topic."""

    def __init__(self, partitions):
        self.partitions, self.sent = partitions, []

    def list_topics(self, topic, timeout=None):
        from types import SimpleNamespace

        return SimpleNamespace(topics={topic: SimpleNamespace(partitions=dict.fromkeys(range(self.partitions)))})

    def produce(self, topic, value=None, key=None, partition=None, headers=None, on_delivery=None):
        self.sent.append((topic, partition, value))
        on_delivery(None, None)

    def poll(self, timeout=0):
        return 0


def by_partition(sent):
    out = {}
    for topic, p, value in sent:
        out.setdefault((topic, p), []).append(value)
    return out


def grouped(msgs, config, group_size, max_bytes, native_groups, partitions=3):
    """The join of `msgs` (batches through `process`), its examples grouped
    by the Python grouper (from `emit`) or in C++; every value produced."""
    prod = Recorder(partitions)
    grouper = ExampleGrouper(prod, "examples", group_size, max_bytes=max_bytes)
    state = NativeJoinState(config, grouper.add, clock=lambda: 2e9)
    state.set_partitions({(t, p) for t in ("features", "actions") for p in (0, 1)})
    if native_groups:
        grouper.group_in(state)
    nexts = {}
    for s in range(0, len(msgs), 300):
        state.process(msgs[s:s + 300], grouper.limit, nexts, lambda m: None)
        state.advance()
        grouper.drain()
    state.flush()
    grouper.flush()
    state.close()
    assert grouper.failed == 0
    return by_partition(prod.sent), state.counts


@pytest.mark.parametrize("config", [
    JoinConfig(window_s=30, lateness_s=2, negative_rate=0.5, seed=3),
    JoinConfig(lateness_s=2, labels={"click": LabelRule(window_s=30), "view": LabelRule(positive=("view",),
                                                                                          negative_rate=0.3)}),
], ids=["one-label", "two-labels"])
@pytest.mark.parametrize("group_size,max_bytes", [(1, 10**6), (7, 10**6), (64, 4096 + 1500), (500, 4096 + 40_000)])
def test_groups_built_in_cpp_are_the_python_groupers(config, group_size, max_bytes):
    from tests.stream.test_fast_codec import random_stream

    msgs = random_stream(11, n=1500)
    ours, counts = grouped(msgs, config, group_size, max_bytes, native_groups=True)
    theirs, their_counts = grouped(msgs, config, group_size, max_bytes, native_groups=False)
    assert counts == their_counts
    assert ours == theirs                  # per partition: the same values, byte for byte, in order
    values = [v for vs in ours.values() for v in vs]
    examples = [M.split_example_batch(v) for v in values] if group_size > 1 else [[v] for v in values]
    if not config.labels:
        assert sum(map(len, examples)) == counts["positives"] + counts["negatives"]
    assert sum(map(len, examples)) > 300
    assert max(map(len, examples)) == min(group_size, max(map(len, examples)))
    if max_bytes < 10**6:
        assert max(len(v) for v in values) <= max_bytes - 4096 and len(values) > sum(map(len, examples)) / group_size


def test_open_groups_leave_by_age_and_full_ones_at_once():
    prod = Recorder(2)
    grouper = ExampleGrouper(prod, "examples", group_size=4)
    state = NativeJoinState(JoinConfig(window_s=10), grouper.add)
    grouper.group_in(state)
    for i in range(6):  # each a positive at once: 6 examples
        rid = f"r{i}"
        state.add_features(rid, 1000 + i, M.encode_features(rid, 1000 + i, {"u": [i]}))
        state.add_action(rid, 1500 + i, "click", 1.0)
    full = state.take_groups(3600.0)       # full groups only: none is an hour old
    rest = state.take_groups(0.0)          # every open group is at least 0 s old
    assert state.take_groups(-1.0) == []
    want, got = {}, {}
    for i in range(6):  # the partition: crc32 of the request id, as the Python grouper picks it
        want.setdefault(zlib.crc32(f"r{i}".encode()) % 2, []).append(f"r{i}")
    for p, value, n in full + rest:
        rids = [pb.Example.FromString(e).features.request_id for e in M.split_example_batch(value)]
        assert len(rids) == n
        got.setdefault(p, []).extend(rids)
    assert got == want
    assert [n for _, _, n in full] == [4] * sum(len(r) // 4 for r in want.values())
    assert all(n < 4 for _, _, n in rest) and prod.sent == []  # taken, not produced: the grouper sends them
    state.close()


def test_a_cpp_group_the_broker_refuses_is_sent_in_halves_and_a_lone_example_dead_lettered():
    prod = BrokerWithLowerLimit(50_000)
    grouper = ExampleGrouper(prod, "examples", group_size=64, dead=DeadLetters(prod, "dead-letters"))
    state = NativeJoinState(JoinConfig(window_s=10), grouper.add)
    grouper.group_in(state)
    sent = {}
    for i in range(40):
        size = 60_000 if i == 7 else 4_000  # example 7 is over the broker's limit by itself
        rid = f"r{i}"
        sent[rid] = M.encode_features(rid, i, {"user": [0] * (size // 8)})
        state.add_features(rid, i, sent[rid])
        state.add_action(rid, i + 1, "click", 1.0)
        grouper.drain()
    grouper.flush()
    out = [pb.ExampleBatch.FromString(v).examples for t, v, _ in prod.delivered if t == "examples"]
    rids = [e.features.request_id for batch in out for e in batch]
    dead = [(v, h) for t, v, h in prod.delivered if t == "dead-letters"]
    assert sorted(rids) == sorted(r for r in sent if r != "r7"), "each example once"
    assert grouper.failed == 1 and grouper.resent > 0 and grouper.limit <= 50_000
    assert len(dead) == 1 and b"not delivered" in dead[0][1]["reason"]
    lone = pb.Example.FromString(dead[0][0])
    assert lone.features.request_id == "r7" and lone.label == 1.0
    for i in range(40, 60):  # groups started after the refusal keep to the lowered limit
        rid = f"r{i}"
        state.add_features(rid, i, M.encode_features(rid, i, {"user": [0] * 500}))
        state.add_action(rid, i + 1, "click", 1.0)
    before = len(prod.delivered)
    grouper.flush()
    assert all(len(v) <= grouper.limit for t, v, _ in prod.delivered[before:])
    state.close()


def test_split_example_batch_gives_back_each_example_and_names_what_is_wrong():
    rng = random.Random(5)
    examples = [bytes(rng.randrange(256) for _ in range(n)) for n in (0, 1, 127, 128, 300, 16_383, 16_384, 70_000)]
    assert M.split_example_batch(M.encode_example_batch(examples)) == examples
    assert M.split_example_batch(M.encode_example_batch([])) == []
    good = M.encode_example_batch(examples[:3])
    for bad, says in [(b"\x08\x02", "version 1"), (good + b"\x0a\x00", "not field 16"),
                      (good[:-5], "runs past"), (b"\x08\x01\x82\x01\xff", "cut off")]:
        with pytest.raises(M.MessageError, match=says):
            M.split_example_batch(bad)
