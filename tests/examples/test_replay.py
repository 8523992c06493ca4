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


def test_replay_messages_are_protobufs_serialization_byte_for_byte():
    from monolith_jax.stream import messages_pb2 as pb

    r = synthetic_ratings(700)
    r.timestamp[:5] = 0           # event time 0: protobuf leaves the field out
    r.rating[5:9] = [0, 1, 3, 5]  # a 0.0 value too
    stream = R.MovieLensStream(r, impressions=1.0, max_delay_s=30, seed=2)
    msgs = list(stream.messages(chunk=256))  # several chunks of varints
    assert len(msgs) == len(stream)
    for kind, rid, value, t in msgs:
        if kind == "features":
            i = int(rid[1:])
            u, it = (r.user[i], r.item[i]) if rid[0] == "r" else (r.user[stream._imp_src[i]], stream._imp_item[i])
            want = (pb.FeatureRecord(version=1, request_id=rid, event_time_ms=t).SerializeToString()
                    + stream.user_chunk[int(u)] + stream.item_chunk[int(it)])
        else:
            want = pb.Action(version=1, request_id=rid, event_time_ms=t, type="rate",
                             value=float(r.rating[int(rid[1:])])).SerializeToString()
        assert value == want, (kind, rid)
    assert sum(t == 0 for *_, t in msgs) >= 5 and any(k == "actions" and b"\x2d" not in v for k, _, v, _ in msgs)


def test_varints_are_protobufs():
    import numpy as np

    from monolith_jax.stream.messages import _varint

    values = np.array([0, 1, 127, 128, 300, 2**35 + 7, 978_300_760_000, 2**63 - 1, -1, -(2**63)], np.int64)
    assert R.varints(values) == [_varint(int(v)) for v in values]
