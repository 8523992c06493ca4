"""The join against a reference, on a shuffled, delayed stream."""

import numpy as np
import pytest

from monolith_jax.stream.join_state import JoinConfig, JoinState
from monolith_jax.stream.messages import encode_features, parse_example


def make_stream(n, window_ms, lateness_ms, seed, orphans=50):
    """Requests r0..r{n-1}; most get one action, delayed up to 2 windows;
    some actions have no features. Delivery is shuffled within `lateness`."""
    rng = np.random.default_rng(seed)
    tf = np.sort(rng.integers(0, 50 * window_ms, n))
    has_action = rng.random(n) < 0.7
    delay = rng.integers(0, 2 * window_ms, n)
    kinds = rng.choice(["click", "view"], n, p=[0.6, 0.4])
    events = []
    for i in range(n):
        events.append((int(tf[i]), "f", f"r{i}", None, None))
        if has_action[i]:
            events.append((int(tf[i] + delay[i]), "a", f"r{i}", str(kinds[i]), 1.0))
    for j in range(orphans):
        events.append((int(rng.integers(0, 50 * window_ms)), "a", f"orphan{j}", "click", 1.0))
    # Out of order, but by less than `lateness`.
    jitter = rng.integers(0, lateness_ms, len(events))
    order = np.argsort([e[0] + j for e, j in zip(events, jitter)], kind="stable")
    reference = {
        "positives": {f"r{i}" for i in range(n) if has_action[i] and kinds[i] == "click" and delay[i] <= window_ms},
        "late": int(sum(has_action[i] and kinds[i] == "click" and delay[i] > window_ms for i in range(n))),
        "other": int(sum(has_action[i] and kinds[i] == "view" for i in range(n))),
        "orphans": orphans,
    }
    return [events[k] for k in order], reference


@pytest.mark.parametrize("emit_positives", ["on_action", "at_window_end"])
@pytest.mark.parametrize("max_in_memory", [1_000_000, 40])
def test_join_matches_reference_on_shuffled_delayed_stream(max_in_memory, emit_positives):
    window_ms, lateness_ms, n = 60_000, 5_000, 3000
    events, ref = make_stream(n, window_ms, lateness_ms, seed=max_in_memory)
    out = []
    state = JoinState(JoinConfig(window_s=60, lateness_s=5, positive_types=("click",),
                                 max_in_memory=max_in_memory, emit_positives=emit_positives), lambda rid, ex: out.append((rid, ex)))
    try:
        for k, (t, kind, rid, atype, value) in enumerate(events):
            if kind == "f":
                state.add_features(rid, t, encode_features(rid, t, {"user": [k]}))
            else:
                state.add_action(rid, t, atype, value)
            if k % 50 == 0:
                state.advance()
        state.flush()
        rids = [rid for rid, _ in out]
        assert len(rids) == len(set(rids)) == n, "every request emitted exactly once"
        examples = {rid: parse_example(ex) for rid, ex in out}
        positives = {rid for rid, ex in examples.items() if ex.label == 1.0}
        assert positives == ref["positives"]
        assert state.counts["late_actions"] == ref["late"]
        assert state.counts["other_actions"] == ref["other"]
        assert state.counts["orphan_actions"] == ref["orphans"]
        assert state.counts["positives"] + state.counts["negatives"] == n
        for rid, ex in examples.items():
            assert ex.features.request_id == rid
            assert ex.sample_rate == 1.0
            if ex.label == 1.0:
                assert 0 <= ex.label_time_ms - ex.features.event_time_ms <= window_ms
            else:
                assert ex.label_time_ms == ex.features.event_time_ms + window_ms
        if emit_positives == "at_window_end":  # examples leave in request-time order
            times = [examples[rid].features.event_time_ms for rid in rids]
            assert all(b - a >= -2 * lateness_ms for a, b in zip(times, times[1:]))
        if max_in_memory < n:
            assert state.counts["spilled"] > 0 and state.counts["unspilled"] > 0
        assert state.waiting == 0
    finally:
        state.close()


def test_negative_sampling_rate_is_written_and_stable():
    def run():
        out = []
        st = JoinState(JoinConfig(window_s=1, lateness_s=0, negative_rate=0.25, seed=3),
                       lambda rid, ex: out.append((rid, parse_example(ex))))
        for i in range(4000):
            st.add_features(f"q{i}", i * 10, encode_features(f"q{i}", i * 10, {"user": [i]}))
        st.add_action("q7", 75, "click", 1.0)
        st.flush()
        st.close()
        return out, st.counts

    out, counts = run()
    negatives = [ex for _, ex in out if ex.label == 0.0]
    assert all(ex.sample_rate == pytest.approx(0.25) for ex in negatives)
    assert 0.22 < len(negatives) / 3999 < 0.28
    assert counts["negatives"] + counts["negatives_sampled_out"] == 3999
    assert [ex.label for rid, ex in out if rid == "q7"] == [1.0]
    again, _ = run()
    assert [rid for rid, _ in again] == [rid for rid, _ in out], "the same requests are kept on a re-read"


def test_per_partition_watermark_waits_for_the_slowest_partition():
    out = []
    st = JoinState(JoinConfig(window_s=10, lateness_s=0), lambda rid, ex: out.append(rid))
    st.add_features("a", 0, encode_features("a", 0, {"u": [1]}), ("features", 0, 0))
    st.add_features("b", 1_000_000, encode_features("b", 1_000_000, {"u": [1]}), ("features", 1, 0))
    st.advance()
    assert out == [], "partition 0 has not passed a's window yet"
    st.add_action("a", 5_000, "click", 1.0, ("actions", 0, 0))
    assert out == ["a"]
    assert st.low_offsets() == {("features", 1): 0}
    st.close()


def _record(rid, t):
    return encode_features(rid, t, {"u": [1]})


def run_clicks(events, config, clock=lambda: 2e9):
    """events: (kind, rid, time[, partition]) in arrival order (partition 0
    of their topic unless given); advance after each. Returns (emitted
    {rid: label}, refused {rid: reason}, counts)."""
    out, refused = {}, {}
    st = JoinState(config, lambda rid, ex: out.__setitem__(rid, parse_example(ex).label),
                   reject=lambda ref, why: refused.__setitem__(ref, why), clock=clock)
    try:
        for k, (kind, rid, t, *part) in enumerate(events):
            p = part[0] if part else 0
            if kind == "f":
                st.add_features(rid, t, _record(rid, t), ("features", p, k), ref=rid)
            else:
                st.add_action(rid, t, "click", 1.0, ("actions", p, k), ref=rid)
            st.advance()
        assert st.low_offsets() or st.waiting == 0
        st.flush()
        return out, refused, dict(st.counts)
    finally:
        st.close()


def clicked_stream(n, t0=0, step=1000, prefix="r"):
    events = []
    for i in range(n):
        t = t0 + i * step
        events.append(("f", f"{prefix}{i}", t))
        if i % 2 == 0:
            events.append(("a", f"{prefix}{i}", t + step // 2))
    return events


def test_one_far_future_event_time_does_not_capture_the_watermark():
    """A record at 2^62 (or 2^63-1, or negative) is refused at once; one in
    the past of the clock but a year ahead of the stream is held, and
    refused when the next message of its partition is not that far ahead.
    Every later click still makes a positive, none is an orphan."""
    events = clicked_stream(40)
    events[10:10] = [("f", "far", 2**62), ("a", "far-click", 2**63 - 1), ("f", "neg", -1),
                     ("f", "year-ahead", 20_000 + 365 * 86_400_000)]
    out, refused, counts = run_clicks(events, JoinConfig(window_s=10, lateness_s=0))
    assert set(refused) == {"far", "far-click", "neg", "year-ahead"}
    assert all(why.startswith("event time out of bounds") for why in refused.values())
    assert "ahead of the joiner's clock" in refused["far"] and "negative" in refused["neg"]
    assert "ahead of the stream" in refused["year-ahead"]
    assert out == {f"r{i}": float(i % 2 == 0) for i in range(40)}
    assert counts["orphan_actions"] == counts["late_actions"] == 0 and counts["bad_times"] == 4


def test_a_gap_in_the_log_is_a_jump_not_an_outlier():
    """Three days without a message, then the log goes on: the first record
    after the gap waits for the next, which confirms it; nothing is refused."""
    gap = 3 * 86_400_000
    events = clicked_stream(10) + clicked_stream(10, t0=gap, prefix="s")
    out, refused, counts = run_clicks(events, JoinConfig(window_s=10, lateness_s=0))
    assert refused == {} and counts["bad_times"] == 0
    assert out == {**{f"r{i}": float(i % 2 == 0) for i in range(10)}, **{f"s{i}": float(i % 2 == 0) for i in range(10)}}


def test_an_int64_max_event_time_while_spilling_stops_nothing():
    """The deadline of 2^63-1 does not fit SQLite's integers: refused by the
    bound; with no bound, it is spilled (clamped) and decided at the end."""
    import dataclasses

    events = clicked_stream(30)
    events[5:5] = [("f", "max", 2**63 - 1, 1), ("a", "max", 2**63 - 1, 1)]  # partition 0 holds the watermark
    config = JoinConfig(window_s=10, lateness_s=0, max_in_memory=1)
    out, refused, counts = run_clicks(events, config)
    assert set(refused) == {"max"} and counts["bad_times"] == 2 and counts["spilled"] > 0
    assert out == {f"r{i}": float(i % 2 == 0) for i in range(30)}
    unbounded = dataclasses.replace(config, max_future_s=float("inf"))
    out, refused, counts = run_clicks(events, unbounded)
    assert refused == {} and counts["spilled"] > 0
    assert out["max"] == 1.0 and len(out) == 31


def test_the_spill_store_takes_any_deadline():
    from monolith_jax.stream.spill import SpillStore

    store = SpillStore()
    try:
        store.put_many([("a", 2**63 + 10, 2**63 - 1, b"x", "features", 0, 7), ("b", 5, 0, b"y", "features", 0, 8)])
        assert [r[0] for r in store.pop_due(2**64)] == ["b", "a"]
        assert len(store) == 0
    finally:
        store.close()


ACTION_OUTCOMES = ("positives", "repeat_actions", "late_actions", "other_actions", "orphan_actions")


@pytest.mark.parametrize("emit_positives", ["on_action", "at_window_end"])
@pytest.mark.parametrize("order", ["features first", "actions first"])
def test_every_action_is_counted_once_whatever_the_order(order, emit_positives):
    """A repeated positive is a repeat whether it came before or after its
    features (before, it used to be counted in `actions` and nowhere else)."""
    events = []
    for i in range(6):
        t = i * 1000
        f, clicks = ("f", f"r{i}", t), [("a", f"r{i}", t + 100), ("a", f"r{i}", t + 200)][: 1 + i % 2]
        events += [f, *clicks] if order == "features first" else [*clicks, f]
    out, _, counts = run_clicks(events, JoinConfig(window_s=10, lateness_s=5, emit_positives=emit_positives))
    assert out == {f"r{i}": 1.0 for i in range(6)}
    assert counts["actions"] == 9 and counts["positives"] == 6 and counts["repeat_actions"] == 3, counts
    assert sum(counts.get(k, 0) for k in ACTION_OUTCOMES) == counts["actions"], counts
