"""Message formats: the C++ example reader against protobuf, bad input, JSON."""

import numpy as np
import pytest

from monolith_jax.features import PAD_KEY, DenseFeature, SparseFeature
from monolith_jax.stream import messages as M
from monolith_jax.stream import messages_pb2 as pb

FEATS = [SparseFeature("user", "ids"), SparseFeature("genres", "ids", combiner="mean", max_len=3)]
DENSE = [DenseFeature("price")]


def random_example(rng, i):
    sparse = {"user": [int(rng.integers(0, 2**64, dtype=np.uint64))],
              "genres": [int(x) for x in rng.integers(0, 2**64, rng.integers(0, 6), dtype=np.uint64)],
              "ignored": [7, 8]}
    feats = M.encode_features(f"r{i}", int(rng.integers(0, 2**40)), sparse, {"price": float(rng.normal())})
    return M.encode_example(feats, float(rng.integers(0, 2)), float(rng.choice([1.0, 0.25])), i * 1000), sparse


def test_example_bytes_equal_protobuf_serialization():
    feats = M.encode_features("r1", 123, {"user": [5, 2**63 + 1]}, {"price": 1.5})
    ours = M.encode_example(feats, 1.0, 0.5, -7)
    ref = pb.Example(version=1, features=pb.FeatureRecord.FromString(feats), label=1.0, sample_rate=0.5,
                     label_time_ms=-7)
    assert ours == ref.SerializeToString()
    batch = M.encode_example_batch([ours, ours])
    assert pb.ExampleBatch.FromString(batch) == pb.ExampleBatch(version=1, examples=[ref, ref])


@pytest.mark.parametrize("grouped", [False, True])
def test_cpp_reader_matches_protobuf_on_random_examples(grouped):
    rng = np.random.default_rng(int(grouped))
    made = [random_example(rng, i) for i in range(300)]
    values = [m[0] for m in made]
    if grouped:
        values = [M.encode_example_batch(values[i:i + 7]) for i in range(0, len(values), 7)]
    batch, info, bad = M.ExampleDecoder(FEATS, DENSE).decode(values, 400)
    assert bad == [] and info["rows"] == 300 and info["taken"] == len(values)
    for i, (value, sparse) in enumerate(made):
        ref = pb.Example.FromString(value)
        assert batch.labels[i] == ref.label and info["sample_rate"][i] == ref.sample_rate
        assert info["event_time_ms"][i] == ref.features.event_time_ms and info["label_time_ms"][i] == i * 1000
        assert batch.dense[i, 0] == np.float32(ref.features.dense[0].values[0])
        assert batch.ids["user"].to_numpy()[i, 0] == FEATS[0].keys(sparse["user"][0])
        g = FEATS[1].keys(np.array(sparse["genres"][:3], np.uint64)).tolist()
        assert batch.lengths["genres"][i] == len(g)
        assert list(batch.ids["genres"].to_numpy()[i]) == g + [PAD_KEY] * (3 - len(g))
    assert np.all(batch.weights[:300] == 1) and np.all(batch.weights[300:] == 0)
    assert np.all(batch.ids["user"].to_numpy()[300:] == PAD_KEY)


def test_reader_accepts_unpacked_ids_fields_in_any_order_and_unknown_fields():
    rec = pb.FeatureRecord(version=1, request_id="x", event_time_ms=9)
    rec.sparse.add(name="user", ids=[41])
    rec.dense.add(name="price", values=[2.0])
    # The same IdList written by hand: ids first, unpacked (wire type 1), then the name.
    idlist = b"\x11" + (42).to_bytes(8, "little") + b"\x0a\x06genres"
    unknown = b"\xa0\x06\x05"  # field 100, varint 5
    feats = rec.SerializeToString() + b"\x22" + bytes([len(idlist)]) + idlist + unknown
    value = unknown + M.encode_example(feats, 0.0, 1.0, 3)
    batch, info, bad = M.ExampleDecoder(FEATS, DENSE).decode([value], 4)
    assert bad == [] and info["rows"] == 1
    assert batch.ids["genres"].to_numpy()[0, 0] == FEATS[1].keys(42) and batch.lengths["genres"][0] == 1
    assert batch.ids["user"].to_numpy()[0, 0] == FEATS[0].keys(41) and batch.dense[0, 0] == 2.0


def test_bad_values_are_named_and_never_crash():
    rng = np.random.default_rng(3)
    good, _ = random_example(rng, 0)
    feats_no_dense = M.encode_features("r", 1, {"user": [1]})
    cases = {
        "truncated": (good[:-3], "not protobuf"),
        "empty": (b"", "empty"),
        "newer version": (b"\x08\x03" + good[2:], "version"),
        "no features": (pb.Example(version=1, label=1.0).SerializeToString(), "no features"),
        "missing dense": (M.encode_example(feats_no_dense, 1.0, 1.0, 0), "dense"),
        "label 2": (M.encode_example(M.encode_features("r", 1, {"user": [1], "genres": []}, {"price": 0.0}), 2.0,
                                     1.0, 0), "label outside"),
        "nan label": (M.encode_example(M.encode_features("r", 1, {"user": [1], "genres": []}, {"price": 0.0}),
                                       float("nan"), 1.0, 0), "not finite"),
        "no genres": (M.encode_example(M.encode_features("r", 1, {"user": [1]}, {"price": 0.0}), 1.0, 1.0, 0),
                      "a sparse feature is missing (an empty id list is not missing): 'genres'"),
        "bad json": (b'{"features": ', "unreadable"),
    }
    values = [v for v, _ in cases.values()] + [good]
    batch, info, bad = M.ExampleDecoder(FEATS, DENSE).decode(values, 16)
    assert info["rows"] == 1 and batch.labels[0] == pb.Example.FromString(good).label
    assert [i for i, _ in bad] == list(range(len(cases)))
    for (name, (_, expect)), (_, reason) in zip(cases.items(), bad):
        assert expect in reason, (name, reason)
    # Random garbage and every truncation of a good value: a status, never a crash.
    junk = [bytes(rng.integers(0, 256, rng.integers(1, 60), dtype=np.uint8)) for _ in range(2000)]
    junk += [good[:k] for k in range(1, len(good))]
    _, info, bad = M.ExampleDecoder(FEATS, DENSE).decode(junk, len(junk))
    assert info["rows"] + len(bad) == len(junk)


def test_json_examples_and_batches_are_read():
    one = b'{"features": {"request_id": "j1", "sparse": [{"name": "user", "ids": ["42"]}, {"name": "genres"}], ' \
          b'"dense": [{"name": "price", "values": [1.5]}]}, "label": 1}'
    group = b'{"examples": [' + one + b', ' + one.replace(b'"label": 1', b'"label": 0') + b']}'
    batch, info, bad = M.ExampleDecoder(FEATS, DENSE).decode([one, group], 8)
    assert bad == [] and info["rows"] == 3
    assert list(batch.labels[:3]) == [1.0, 1.0, 0.0]
    assert list(info["sample_rate"]) == [1.0, 1.0, 1.0]  # unset reads as 1
    assert batch.ids["user"].to_numpy()[0, 0] == FEATS[0].keys(42)


def test_batches_fill_without_splitting_a_group():
    rng = np.random.default_rng(5)
    values = [M.encode_example_batch([random_example(rng, i)[0] for i in range(n)]) for n in (3, 4, 2, 5)]
    dec = M.ExampleDecoder(FEATS, DENSE)
    b = dec.batch(8)
    assert b.add(values) == 2 and b.rows == 7, "the third group (2) would overflow 8 rows"
    b2 = dec.batch(8)
    assert b2.add(values[2:]) == 2 and b2.rows == 7
    _, _, bad = dec.decode([M.encode_example_batch([random_example(rng, 0)[0]] * 9)], 8)
    assert "more examples than a training batch" in bad[0][1]


def test_features_and_actions_parse_with_clear_errors():
    assert M.parse_features(M.encode_features("r1", 5, {"u": [1]})).request_id == "r1"
    assert M.parse_action(b'{"request_id": "r1", "type": "click", "event_time_ms": 3}').type == "click"
    with pytest.raises(M.MessageError, match="no request_id"):
        M.parse_features(M.encode_features("", 5, {"u": [1]}))
    nan_price = M.encode_features("r1", 5, {"u": [1]}, {"price": float("nan")})
    with pytest.raises(M.MessageError, match="dense feature 'price' must hold one finite value"):
        M.parse_features(nan_price)
    with pytest.raises(M.MessageError, match="dense feature 'price' must hold one finite value"):
        M.parse_features(nan_price, [DenseFeature("price")])
    assert M.parse_features(nan_price, [DenseFeature("p", column="price", fill=0.0)]).request_id == "r1"
    with pytest.raises(M.MessageError, match="no type"):
        M.parse_action(M.encode_action("r1", 5, ""))
    with pytest.raises(M.MessageError, match="unreadable"):
        M.parse_action(b"\xff\xff\xff")
    with pytest.raises(M.MessageError, match="version"):
        M.parse_action(pb.Action(version=9, request_id="r", type="click").SerializeToString())


def test_an_absent_sparse_feature_is_refused_an_empty_one_is_not():
    dec = M.ExampleDecoder(FEATS, DENSE)
    empty = M.encode_example(M.encode_features("r", 1, {"user": [3], "genres": []}, {"price": 1.0}), 1.0, 1.0, 0)
    absent = M.encode_example(M.encode_features("r", 1, {"genres": [4]}, {"price": 1.0}), 1.0, 1.0, 0)
    both = M.encode_example(M.encode_features("r", 1, {"other": [4]}, {"price": 1.0}), 1.0, 1.0, 0)
    json_absent = b'{"features": {"request_id": "j", "sparse": [{"name": "user", "ids": ["1"]}], ' \
                  b'"dense": [{"name": "price", "values": [1]}]}, "label": 1}'
    grouped = M.encode_example_batch([empty, absent])   # all or nothing: the group is refused
    batch, info, bad = dec.decode([empty, absent, both, json_absent, grouped], 8)
    assert info["rows"] == 1 and batch.lengths["genres"][0] == 0 and batch.lengths["user"][0] == 1
    assert batch.ids["genres"].to_numpy()[0].tolist() == [PAD_KEY] * 3
    assert [i for i, _ in bad] == [1, 2, 3, 4]
    assert bad[0][1].endswith(": 'user'") and bad[1][1].endswith(": 'user', 'genres'")
    assert bad[2][1].endswith(": 'genres'") and bad[3][1].endswith(": 'user'")
    assert all(r.startswith(M.DECODE_REASONS[M.SPARSE_MISSING]) for _, r in bad)


def test_features_are_found_by_source_and_may_share_one():
    feats = [SparseFeature("u", "ids", column="user_id"), SparseFeature("u_again", "other", column="user_id",
                                                                        max_len=2),
             SparseFeature("genres", "ids", max_len=3)]
    dense = [DenseFeature("p", column="price"), DenseFeature("p2", column="price")]
    value = M.encode_example(M.encode_features("r", 1, {"user_id": [7, 8], "genres": [1]}, {"price": 2.5}),
                             1.0, 1.0, 0)
    batch, info, bad = M.ExampleDecoder(feats, dense).decode([value], 2)
    assert bad == [] and info["rows"] == 1
    assert batch.ids["u"].to_numpy()[0].tolist() == [feats[0].keys(7)]
    assert batch.ids["u_again"].to_numpy()[0].tolist() == feats[1].keys([7, 8]).tolist()
    assert batch.lengths["u"][0] == 1 and batch.lengths["u_again"][0] == 2
    assert batch.dense[0].tolist() == [2.5, 2.5]
    # The feature's name is not its source: a record naming it "u" lacks "user_id".
    wrong = M.encode_example(M.encode_features("r", 1, {"u": [7], "genres": []}, {"price": 2.5}), 1.0, 1.0, 0)
    _, _, bad = M.ExampleDecoder(feats, dense).decode([wrong], 2)
    assert bad and bad[0][1].endswith(": 'user_id'")


def test_dense_fill_imputes_in_the_stream_and_counts_else_refuses():
    from monolith_jax.features import fill_counts, reset_fill_counts

    dense = [DenseFeature("price", fill=-1.0), DenseFeature("age")]
    sparse = {"user": [1], "genres": []}
    no_price = M.encode_example(M.encode_features("r", 1, sparse, {"age": 30.0}), 1.0, 1.0, 0)
    nan_price = M.encode_example(M.encode_features("r", 1, sparse, {"age": 31.0, "price": float("nan")}), 1.0, 1.0, 0)
    good = M.encode_example(M.encode_features("r", 1, sparse, {"age": 32.0, "price": 5.0}), 0.0, 1.0, 0)
    no_age = M.encode_example(M.encode_features("r", 1, sparse, {"price": 5.0}), 1.0, 1.0, 0)
    inf_age = M.encode_example(M.encode_features("r", 1, sparse, {"price": 5.0, "age": float("inf")}), 1.0, 1.0, 0)
    reset_fill_counts()
    batch, info, bad = M.ExampleDecoder(FEATS, dense).decode([no_price, no_age, nan_price, inf_age, good], 8)
    assert info["rows"] == 3 and [i for i, _ in bad] == [1, 3]
    assert "dense feature is missing" in bad[0][1] and "not finite" in bad[1][1]
    assert batch.dense[:3].tolist() == [[-1.0, 30.0], [-1.0, 31.0], [5.0, 32.0]]
    assert np.all(batch.dense[3:] == 0)  # padding rows hold no refused example's values
    assert info["filled"] == {"price": 2} and fill_counts() == {"price": 2}
    reset_fill_counts()


def test_the_joiner_refuses_a_record_the_trainer_would_refuse():
    """Given the job's features, a record must carry every sparse feature's
    source and every dense feature without a fill (else the trainer would
    dead-letter it with the examples grouped beside it)."""
    sparse = [SparseFeature("user", "t"), SparseFeature("item", "t", column="item_id")]
    dense = [DenseFeature("age"), DenseFeature("price", fill=0.0)]
    ok = M.encode_features("r", 1, {"user": [1], "item_id": []}, {"age": 3.0})
    assert M.parse_features(ok, dense, sparse).request_id == "r"
    with pytest.raises(M.MessageError, match="lacks sparse feature\\(s\\) 'item_id'"):
        M.parse_features(M.encode_features("r", 1, {"user": [1]}, {"age": 3.0}), dense, sparse)
    with pytest.raises(M.MessageError, match="lacks dense feature\\(s\\) 'age' \\(no fill declared\\)"):
        M.parse_features(M.encode_features("r", 1, {"user": [1], "item_id": [2]}), dense, sparse)
    # Without the job's features nothing is required beyond a request id.
    assert M.parse_features(M.encode_features("r", 1, {}))
