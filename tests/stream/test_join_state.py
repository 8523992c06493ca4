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
