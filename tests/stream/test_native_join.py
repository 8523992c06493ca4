"""The C++ join state (`NativeJoinState`) under every test of the Python
one (tests/stream/test_join_state.py, run again here with the class
swapped), and against it on the same random streams, message for message,
through the batch path the joiner uses."""

import pytest

import tests.stream.test_join_state as reference_tests
from monolith_jax.stream.native_join import NativeJoinState
from tests.stream.test_join_state import *  # noqa: F401,F403  (collected again, on the C++ state)


@pytest.fixture(autouse=True)
def native_state(monkeypatch):
    monkeypatch.setattr(reference_tests, "JoinState", NativeJoinState)


def run_both(msgs, config, drop_at=None, chunk=400):
    """The reference JoinState fed message by message, and the C++ one fed
    batch by batch through `process` (the reference reading what it leaves):
    what each emitted, refused and counted, and its low offsets."""
    from monolith_jax.stream import messages as M
    from monolith_jax.stream.join_state import JoinState
    from tests.stream.test_fast_codec import DENSE, SPARSE, T0

    results = []
    for native in (False, True):
        out, refused = [], []
        kw = dict(reject=lambda ref, why: refused.append((ref.topic(), ref.offset(), why)),
                  clock=lambda: (T0 + 10**9) / 1000)
        state = (NativeJoinState(config, lambda rid, ex: out.append((rid, ex)), features_topic="features",
                                 dense=DENSE, sparse=SPARSE, **kw) if native
                 else JoinState(config, lambda rid, ex: out.append((rid, ex)), **kw))
        state.set_partitions({(t, p) for t in ("features", "actions") for p in (0, 1)})

        def by_reference(m):
            origin = (m.topic(), m.partition(), m.offset())
            try:
                if m.topic() == "features":
                    rec = M.parse_features(m.value(), DENSE, SPARSE)
                    state.add_features(rec.request_id, rec.event_time_ms, M.features_to_binary(m.value(), rec),
                                       origin, m)
                else:
                    a = M.parse_action(m.value())
                    state.add_action(a.request_id, a.event_time_ms, a.type, a.value, origin, m)
            except M.MessageError as err:
                refused.append((m.topic(), m.offset(), err.reason))

        lows, nexts = [], {}
        for s in range(0, len(msgs), chunk):
            part = msgs[s:s + chunk]
            if native:
                state.process(part, 10**6, nexts, by_reference)
            else:
                for m in part:
                    by_reference(m)
            state.advance()
            lows.append(state.low_offsets())
            if drop_at is not None and s <= drop_at < s + chunk:
                lows.append(state.drop_partitions({("features", 1), ("actions", 1)}))
                state.set_partitions({("features", 0), ("actions", 0)})
        lows.append((state.waiting, state.in_memory))
        state.flush()
        results.append((out, refused, state.counts, lows, state.watermark))
        state.close()
    return results


@pytest.mark.parametrize("config,drop_at", [
    (JoinConfig(window_s=60, lateness_s=3, negative_rate=0.5, min_value=0.2), None),
    (JoinConfig(window_s=30, lateness_s=3, max_in_memory=50, emit_positives="at_window_end"), None),
    (JoinConfig(window_s=20, lateness_s=1, max_in_memory=200, max_future_s=15, seed=4), 1500),
], ids=["sampled", "spilling-at-window-end", "held-far-ahead-and-rebalanced"])
def test_the_batch_path_matches_the_reference_on_random_streams(config, drop_at):
    from tests.stream.test_fast_codec import random_stream

    msgs = random_stream(5, outliers=30)
    ours, theirs = run_both(msgs, config, drop_at)
    assert ours[2] == theirs[2]          # every counter
    assert ours[1] == theirs[1]          # every refusal, with its reason, in order
    assert ours[3] == theirs[3]          # low offsets (what may be committed) after every batch
    assert ours[4] == theirs[4]
    assert ours[0] == theirs[0]          # every example, byte for byte, in order
    counts = ours[2]
    assert counts["positives"] > 100 and counts["negatives"] > 100
    if config.max_in_memory < 1000:
        assert counts["spilled"] > 0 and counts["unspilled"] > 0
    if config.max_future_s < 60:
        assert any("ahead of the stream" in why for _, _, why in ours[1])


def test_odd_origins_are_keyed_as_the_reference_keys_them():
    from monolith_jax.stream.join_state import JoinState
    from monolith_jax.stream.messages import encode_features

    lows = []
    for cls in (JoinState, NativeJoinState):
        st = cls(JoinConfig(window_s=10), lambda rid, ex: None)
        for k, origin in enumerate([(None, 0, 5), ("t\udc80", 1, 2), ("features", 3, 9), None, ("features", 3, 4)]):
            st.add_features(f"r{k}", 1000 + k, encode_features(f"r{k}", 1000 + k, {"u": [k]}), origin)
        lows.append(st.low_offsets())
        st.close()
    assert lows[0] == lows[1] == {(None, 0): 5, ("t\udc80", 1): 2, ("features", 3): 4}
