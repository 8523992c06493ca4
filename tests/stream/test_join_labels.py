"""The multi-label join (`JoinConfig(labels=...)`) against a reference written
here: a dict of request -> actions, each label computed by its rule, on
random, shuffled, delayed streams, in Python and in C++ (and the two against
each other through the joiner's batch path); and through the real
processes, replay -> join, for the two-objective shop job."""

import json
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from monolith_jax.job import LabelRule
from monolith_jax.stream.join_state import JoinConfig, JoinState
from monolith_jax.stream.labels import parse_label_arg, rules_from_args
from monolith_jax.stream.messages import encode_example, encode_features, parse_example
from monolith_jax.stream.native_join import NativeJoinState

RULES = {
    "click": LabelRule(positive=("click",), window_s=60, negative_rate=0.5),
    "buy": LabelRule(positive=("buy",), given="click", window_s=40, negative_rate=0.7),
    "like": LabelRule(positive=("like", "love"), min_value=3.0, window_s=20),
    "watch": LabelRule(value_of="watch", default=0.0, window_s=60),
    "dwell": LabelRule(value_of="dwell", window_s=30),
}
# Labels that may all be undefined: such examples are dropped.
SPARSE_RULES = {
    "click": LabelRule(positive=("click",), window_s=50, negative_rate=0.3),
    "buy": LabelRule(positive=("buy",), given="click", window_s=60),
    "dwell": LabelRule(value_of="dwell", window_s=30),
}
TYPES = ["click", "buy", "like", "love", "watch", "dwell", "view"]


def make_stream(n, window_ms, lateness_ms, seed, orphans=40):
    """Requests r0..r{n-1}, each with 0-4 actions of random types, delays
    (up to 1.5 windows) and values (distinct times within a request);
    delivery shuffled by less than `lateness`. Returns the events in
    delivery order and {rid: (feature time, [(time, type, value)])}."""
    rng = np.random.default_rng(seed)
    tf = np.sort(rng.integers(0, 40 * window_ms, n))
    events, truth = [], {}
    for i in range(n):
        rid = f"r{i}"
        events.append((int(tf[i]), "f", rid, None, None))
        k = int(rng.integers(0, 5))
        delays = rng.choice(int(1.5 * window_ms), size=k, replace=False)
        acts = []
        for d in delays:
            kind = str(rng.choice(TYPES))
            value = float(rng.integers(1, 6))
            acts.append((int(tf[i] + d), kind, value))
            events.append((int(tf[i] + d), "a", rid, kind, value))
        truth[rid] = (int(tf[i]), acts)
    for j in range(orphans):
        events.append((int(rng.integers(0, 40 * window_ms)), "a", f"orphan{j}", "click", 1.0))
    jitter = rng.integers(0, lateness_ms, len(events))
    order = np.argsort([e[0] + j for e, j in zip(events, jitter)], kind="stable")
    return [events[k] for k in order], truth


def reference_labels(rid, tf, actions, rules, seed=0):
    """Each label by its rule; None where every label is undefined (dropped)."""
    out = {}
    for name, r in rules.items():  # givens come first in RULES
        w = int(round(r.window_s * 1000))
        inside = [(ta, kind, v) for ta, kind, v in actions if ta - tf <= w]
        if r.given is not None and not (out[r.given][0] == 1.0 and not out[r.given][2]):
            out[name] = (0.0, 1.0, True)
        elif r.value_of is None:
            if any(kind in r.positive and v >= r.min_value for _, kind, v in inside):
                out[name] = (1.0, 1.0, False)
            else:
                h = zlib.crc32(f"{rid}\0{name}".encode(), zlib.crc32(f"{seed}\0".encode()))
                kept = r.negative_rate >= 1.0 or h < int(r.negative_rate * 2**32)
                out[name] = (0.0, r.negative_rate, False) if kept else (0.0, 1.0, True)
        else:
            vals = sorted((ta, v) for ta, kind, v in inside if kind == r.value_of)
            if vals:
                out[name] = (vals[0][1], 1.0, False)
            elif r.default is not None:
                out[name] = (r.default, 1.0, False)
            else:
                out[name] = (0.0, 1.0, True)
    if all(u for _, _, u in out.values()):
        return None
    return {k: (f32(v), f32(r), u) for k, (v, r, u) in out.items()}


def f32(x):
    return float(np.float32(x))


def run(config, events, cls=JoinState):
    out = []
    state = cls(config, lambda rid, ex: out.append((rid, ex)))
    try:
        for k, (t, kind, rid, atype, value) in enumerate(events):
            if kind == "f":
                state.add_features(rid, t, encode_features(rid, t, {"user": [k]}))
            else:
                state.add_action(rid, t, atype, value)
            if k % 37 == 0:
                state.advance()
        state.flush()
        return out, dict(state.counts)
    finally:
        state.close()


def labels_of(ex):
    return {lab.name: (lab.value, lab.sample_rate or 1.0, lab.undefined) for lab in ex.labels}


@pytest.mark.parametrize("cls", [JoinState, NativeJoinState], ids=["python", "native"])
@pytest.mark.parametrize("rules", ["all", "sparse"])
@pytest.mark.parametrize("emit_positives", ["on_action", "at_window_end"])
@pytest.mark.parametrize("max_in_memory", [1_000_000, 30])
def test_labels_match_the_reference_on_shuffled_delayed_streams(emit_positives, max_in_memory, rules, cls):
    sparse = rules == "sparse"
    rules = SPARSE_RULES if sparse else RULES
    events, truth = make_stream(1500, 60_000, 5_000, seed=max_in_memory % 7 + sparse)
    config = JoinConfig(lateness_s=5, labels=rules, max_in_memory=max_in_memory, emit_positives=emit_positives)
    out, counts = run(config, events, cls)
    rids = [rid for rid, _ in out]
    assert len(rids) == len(set(rids)), "each request at most once"
    ref = {rid: reference_labels(rid, tf, acts, rules) for rid, (tf, acts) in truth.items()}
    kept = {rid for rid, labs in ref.items() if labs is not None}
    assert set(rids) == kept
    for rid, ex in out:
        ex = parse_example(ex)
        assert ex.version == 2 and [lab.name for lab in ex.labels] == list(rules)
        assert labels_of(ex) == ref[rid], rid
        if emit_positives == "at_window_end":
            assert ex.label_time_ms == truth[rid][0] + 60_000
    assert counts["negatives_sampled_out"] == len(truth) - len(kept)
    assert (len(kept) < len(truth)) == sparse
    assert counts["positives"] + counts["negatives"] == len(kept)
    assert counts["orphan_actions"] == 40
    for name, r in rules.items():
        got = [ref[rid][name] for rid in kept]
        if r.value_of is None:
            assert counts[f"{name}:positives"] == sum(v == 1.0 and not u for v, _, u in got) > 0
            assert counts[f"{name}:negatives"] == sum(v == 0.0 and not u for v, _, u in got) > 0
        else:
            assert counts[f"{name}:values"] + counts[f"{name}:defaults"] == sum(not u for _, _, u in got) > 0
        # the undefined ones of the examples kept, and those of the dropped ones (all undefined)
        assert counts[f"{name}:undefined"] == sum(u for _, _, u in got) + len(truth) - len(kept)
    if max_in_memory < 100:
        assert counts["spilled"] > 0 and counts["unspilled"] > 0


def test_negative_rates_are_carried_per_label_and_sampling_is_stable():
    events, truth = make_stream(1200, 60_000, 5_000, seed=3)
    config = JoinConfig(lateness_s=5, labels=RULES)
    a, _ = run(config, events)
    assert run(config, events)[0] == a, "a re-read decides alike"
    rates = {(lab.name, lab.sample_rate) for _, ex in a for lab in parse_example(ex).labels
             if not lab.undefined and lab.value == 0.0 and lab.name in ("click", "buy")}
    assert rates == {("click", 0.5), ("buy", f32(0.7))}
    # About half of the click negatives are sampled out, independently of buy's.
    ref = [reference_labels(rid, tf, acts, RULES) for rid, (tf, acts) in truth.items()]
    out_of_click = sum(1 for r in ref if r is not None and r["click"][2]) / sum(1 for r in ref if r is not None)
    assert 0.1 < out_of_click < 0.6


@pytest.mark.parametrize("cls", [JoinState, NativeJoinState], ids=["python", "native"])
def test_a_request_waits_for_its_longest_window_and_each_label_counts_its_own(cls):
    rules = {"click": LabelRule(positive=("click",), window_s=10), "buy": LabelRule(positive=("buy",), window_s=100)}
    out = []
    state = cls(JoinConfig(lateness_s=0, labels=rules), lambda rid, ex: out.append(parse_example(ex)))
    state.add_features("r", 0, encode_features("r", 0, {"user": [1]}))
    state.add_action("r", 50_000, "click", 1.0)   # past click's 10 s: late for it
    state.add_action("r", 60_000, "buy", 1.0)     # within buy's 100 s
    state.add_features("s", 70_000, encode_features("s", 70_000, {"user": [2]}))
    state.advance()
    assert out == [], "r waits for buy's window"
    state.add_features("t", 200_000, encode_features("t", 200_000, {"user": [3]}))
    state.advance()
    assert [e.features.request_id for e in out] == ["r", "s"]
    assert labels_of(out[0]) == {"click": (0.0, 1.0, False), "buy": (1.0, 1.0, False)}
    assert state.counts["late_actions"] == 1 and state.counts["buy:positives"] == 1


@pytest.mark.parametrize("cls", [JoinState, NativeJoinState], ids=["python", "native"])
def test_on_action_an_example_leaves_once_every_label_is_one(cls):
    rules = {"click": LabelRule(positive=("click",)), "buy": LabelRule(positive=("buy",), given="click")}
    out = []
    state = cls(JoinConfig(lateness_s=0, labels=rules), lambda rid, ex: out.append(parse_example(ex)))
    state.add_action("r", 5, "click", 1.0)           # before its features
    state.add_features("r", 0, encode_features("r", 0, {"user": [1]}))
    assert out == []
    state.add_action("r", 9, "buy", 1.0)
    assert len(out) == 1 and out[0].label_time_ms == 9
    assert labels_of(out[0]) == {"click": (1.0, 1.0, False), "buy": (1.0, 1.0, False)}
    state.add_action("r", 10, "buy", 1.0)
    assert state.counts["repeat_actions"] == 1 and len(out) == 1


def test_single_label_output_is_unchanged():
    """A config without labels writes what the C++ join (unchanged) writes, byte for byte."""
    events, _ = make_stream(800, 60_000, 5_000, seed=5)
    config = JoinConfig(window_s=60, lateness_s=5, negative_rate=0.5, positive_types=("click", "buy"),
                        max_in_memory=50)
    py, py_counts = run(config, events)
    out = []
    native = NativeJoinState(config, lambda rid, ex: out.append((rid, ex)))
    for k, (t, kind, rid, atype, value) in enumerate(events):
        if kind == "f":
            native.add_features(rid, t, encode_features(rid, t, {"user": [k]}))
        else:
            native.add_action(rid, t, atype, value)
        if k % 37 == 0:
            native.advance()
    native.flush()
    assert py == out and py_counts == dict(native.counts)
    assert all(parse_example(ex).version == 1 and not parse_example(ex).labels for _, ex in py)
    native.close()


@pytest.mark.parametrize("config,drop_at", [
    (JoinConfig(lateness_s=3, seed=2, labels={
        "click": LabelRule(positive=("click",), min_value=0.2, window_s=60, negative_rate=0.5),
        "view": LabelRule(positive=("view",), given="click", window_s=30, negative_rate=0.6),
        "v": LabelRule(value_of="view", window_s=45)}), None),
    (JoinConfig(lateness_s=3, max_in_memory=50, emit_positives="at_window_end", labels={
        "click": LabelRule(positive=("click",), window_s=30), "dwell": LabelRule(value_of="click", default=-1.0,
                                                                                 window_s=20)}), None),
    (JoinConfig(lateness_s=1, max_in_memory=200, max_future_s=15, seed=4, labels={
        "click": LabelRule(positive=("click",), window_s=20, negative_rate=0.3),
        "view": LabelRule(positive=("view",), window_s=10)}), 1500),
], ids=["sampled-given-value", "spilling-at-window-end", "held-far-ahead-and-rebalanced"])
def test_the_native_join_writes_the_python_joins_labels_through_the_batch_path(config, drop_at):
    """Message for message, as the joiner feeds each (the C++ one batch by
    batch, reading what it can): the same examples, bytes, counts, refusals
    and low offsets."""
    from tests.stream.test_fast_codec import random_stream
    from tests.stream.test_native_join import run_both

    msgs = random_stream(6, outliers=30)
    ours, theirs = run_both(msgs, config, drop_at)
    assert ours[2] == theirs[2] and ours[1] == theirs[1] and ours[3] == theirs[3] and ours[4] == theirs[4]
    assert ours[0] == theirs[0]
    counts = ours[2]
    assert counts["positives"] > 100 and counts["negatives"] > 100 and all(
        parse_example(ex).version == 2 for _, ex in ours[0])
    if config.max_in_memory < 1000:
        assert counts["spilled"] > 0 and counts["unspilled"] > 0


def test_the_size_check_of_a_features_record_counts_the_labels_bytes():
    """A record whose example fits a message of the examples topic without
    labels, but not with them, is left by the C++ reader to the reference
    (which dead-letters it as too large)."""
    from monolith_jax.stream.messages import BATCH_OVERHEAD, EXAMPLE_OVERHEAD, batch_entry_size, labels_overhead
    from tests.stream.test_fast_codec import T0, msg

    config = JoinConfig(labels={"a_rather_long_label_name": LabelRule(), "buy": LabelRule(positive=("buy",))})
    payload = encode_features("r1", T0, {"user": [1]})
    limit = BATCH_OVERHEAD + batch_entry_size(len(payload) + EXAMPLE_OVERHEAD)
    left = {}
    for name, cfg in (("one label", JoinConfig()), ("named labels", config)):
        state = NativeJoinState(cfg, lambda rid, ex: None)
        left[name] = []
        state.process([msg("features", payload)], limit, {}, left[name].append)
        state.close()
    assert len(left["one label"]) == 0 and len(left["named labels"]) == 1
    overhead = labels_overhead([(n, 0.0, 1.0, True) for n, _ in config.labels])
    assert NativeJoinState(config, lambda rid, ex: None)._core.labels_overhead == overhead
    example = encode_example(payload, 0.0, 1.0, 2**63 - 1, labels=[(n, 0.5, 0.5, True) for n, _ in config.labels])
    assert len(example) <= len(payload) + EXAMPLE_OVERHEAD + overhead


def test_label_rules_are_checked_with_clear_errors():
    with pytest.raises(ValueError, match="'buy' is given 'cart', which is not among"):
        JoinConfig(labels={"buy": LabelRule(positive=("buy",), given="cart")})
    with pytest.raises(ValueError, match="cycle"):
        JoinConfig(labels={"a": LabelRule(given="b"), "b": LabelRule(given="a")})
    with pytest.raises(ValueError, match="a value label"):
        JoinConfig(labels={"w": LabelRule(value_of="watch"), "b": LabelRule(given="w")})
    with pytest.raises(ValueError, match="window_s describes a single label"):
        JoinConfig(window_s=60, labels={"a": LabelRule()})
    with pytest.raises(ValueError, match="not both"):
        LabelRule(positive=("click",), value_of="watch")
    with pytest.raises(ValueError, match="binary labels only"):
        LabelRule(value_of="watch", negative_rate=0.5)
    with pytest.raises(ValueError, match="value labels"):
        LabelRule(default=0.0)


def test_label_flags_parse():
    assert parse_label_arg("click:positive=click+like,window=60,rate=0.5,min=2") == (
        "click", LabelRule(positive=("click", "like"), window_s=60, negative_rate=0.5, min_value=2))
    assert parse_label_arg("watch:value=watch,default=0") == ("watch", LabelRule(value_of="watch", default=0.0))
    rules = rules_from_args(["click:positive=click", "buy:positive=buy,given=click"])
    assert rules["buy"].given == "click" and rules["click"].min_value == -math.inf
    for bad, why in [("click", "expected NAME"), ("c:positive=click,windw=3", "'windw=3' is not one of"),
                     ("c:window=3", "say what makes the label"), ("c:value=w,rate=0.5", "binary labels only"),
                     ("c:positive=a,window=x", "not a number")]:
        with pytest.raises(ValueError, match=why):
            parse_label_arg(bad)
    with pytest.raises(ValueError, match="defined twice"):
        rules_from_args(["a:positive=x", "a:positive=y"])


@pytest.mark.parametrize("codec", ["native", "python"])
def test_replay_then_join_labels_the_shop_jobs_heads_from_its_log(tmp_path, codec):
    """`monolith replay` and `monolith join --job tests.jobs.shop_tasks:job`
    as processes on the embedded cluster: each example's labels are the
    log's clicked and bought columns (buy undefined where not clicked)."""
    from monolith_jax.stream import kafka as K
    from monolith_jax.stream import messages_pb2 as pb
    from tests.jobs import shop_tasks
    from tests.stream.kafka_util import read_topic

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monolith = os.path.join(os.path.dirname(sys.executable), "monolith")
    job = "tests.jobs.shop_tasks:job"
    log = tmp_path / "log.parquet"
    cols = shop_tasks.make_log(str(log), n=1200, part=0)
    with K.EmbeddedKafka() as kafka:
        b = kafka.bootstrap
        K.ensure_topics(b, {t: 2 for t in K.TOPICS.values()})
        joiner = subprocess.Popen([monolith, "join", "--job", job, "--bootstrap", b, "--idle-flush", "3",
                                   "--exit-when-idle", "--report-every", "0", "--lateness", "1", "--codec", codec],
                                  cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        done = subprocess.run([monolith, "replay", "--job", job, "--bootstrap", b, "--data", str(log)], cwd=root,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        replayed = json.loads(done.stdout.split("replay done ", 1)[1])
        clicks, buys = int(np.sum(cols["clicked"])), sum(1 for v in cols["bought"] if v)
        assert replayed["actions"] == clicks + buys and buys > 0
        joined_out, _ = joiner.communicate(timeout=240)
        assert joiner.returncode == 0, joined_out[-3000:]
        joined = json.loads(joined_out.split("joiner done ", 1)[1].splitlines()[0])
        assert joined["click:positives"] == clicks and joined["buy:positives"] == buys
        got = {}
        for m in read_topic(b, "examples"):
            for ex in pb.ExampleBatch.FromString(m.value()).examples:
                got[ex.features.request_id] = labels_of(ex)
    assert len(got) == 1200
    for rid, clicked, bought in zip(cols["request"], cols["clicked"], cols["bought"]):
        assert got[rid]["click"] == (float(clicked), 1.0, False), rid
        assert got[rid]["buy"] == ((float(bought), 1.0, False) if clicked else (0.0, 1.0, True)), rid
