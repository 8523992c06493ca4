"""The MovieLens replayer's messages."""


from monolith_jax.examples.movielens import replay as R
from monolith_jax.stream.messages import parse_action, parse_features
from tests.examples.streams import synthetic_ratings


def test_replay_messages_are_time_ordered_requests_and_actions():
    r = synthetic_ratings(500)
    stream = R.MovieLensStream(r, impressions=1.0, max_delay_s=30, seed=1)
    msgs = list(stream.messages())
    assert len(msgs) == len(stream) == 2 * 500 + stream.n_impressions
    assert stream.n_impressions > 300
    times = [t for *_, t in msgs]
    assert times == sorted(times)
    feats = {rid: parse_features(v) for kind, rid, v, _ in msgs if kind == "features"}
    acts = {rid: parse_action(v) for kind, rid, v, _ in msgs if kind == "actions"}
    assert set(acts) == {f"r{i}" for i in range(500)}, "every rating is a request with one action"
    for rid, a in acts.items():
        i = int(rid[1:])
        f = feats[rid]
        assert a.type == "rate" and a.value == r.rating[i]
        assert 1000 <= a.event_time_ms - f.event_time_ms <= 30_000
        assert {s.name for s in f.sparse} == set(R.FIELDS)
    impressions = [f for rid, f in feats.items() if rid.startswith("i")]
    assert len(impressions) == stream.n_impressions and not any(rid in acts for rid in feats if rid[0] == "i")
    movie = {s.name: list(s.ids) for s in impressions[0].sparse}["movie"]
    assert len(movie) == 1
