"""Version-2 examples (named labels, one per head) through the trainer's C++
decoder, against the protobuf classes as the reference; version 1 still reads."""

import numpy as np
import pytest

import monolith_jax as mj
from monolith_jax.features import DenseFeature, SparseFeature
from monolith_jax.stream import messages as M
from monolith_jax.stream import messages_pb2 as pb

SPARSE = [SparseFeature("user", "ids"), SparseFeature("item", "ids")]
DENSE = [DenseFeature("price", fill=0.0)]
HEADS = (mj.Head("click"), mj.Head("buy", missing="mask"), mj.Head("watch", loss="squared"))


def record(rid: str, t: int = 5) -> bytes:
    return M.encode_features(rid, t, {"user": [1], "item": [2, 3]}, {"price": 9.5})


def reference(value: bytes, heads) -> tuple:
    """(labels, rates, mask) per head, or a reason string, by the module's rule."""
    ex = pb.Example.FromString(value)
    if not heads:
        return "named" if ex.labels else ([ex.label], [ex.sample_rate or 1.0], None)
    named = {lab.name: lab for lab in ex.labels}
    labels, rates, mask = [], [], []
    for h in heads:
        lab = named.get(h.name)
        if lab is None and not named and len(heads) == 1:
            labels.append(ex.label), rates.append(ex.sample_rate or 1.0), mask.append(1.0)
        elif lab is None or lab.undefined:
            if lab is None and h.missing != "mask":
                return "missing"
            labels.append(0.0), rates.append(1.0), mask.append(0.0)
        else:
            if h.binary and not 0.0 <= lab.value <= 1.0:
                return "range"
            labels.append(lab.value), rates.append(lab.sample_rate or 1.0), mask.append(1.0)
    return labels, rates, mask


def test_random_examples_decode_as_the_reference_says():
    rng = np.random.default_rng(0)
    values = []
    for k in range(300):
        labels = []
        for name in ("click", "buy", "watch", "share"):   # "share": a label no head learns
            if rng.random() < 0.2:
                continue
            value = float(rng.integers(0, 2)) if name != "watch" else float(np.round(rng.uniform(0, 90), 2))
            if rng.random() < 0.05:
                value = 3.0   # out of range for a binary head
            labels.append((name, value, float(rng.choice([0.0, 1.0, 0.25])), bool(rng.random() < 0.2)))
        rng.shuffle(labels)
        values.append(M.encode_example(record(f"r{k}"), 0.0, 0.0, 7, labels=labels))
    dec = M.ExampleDecoder(SPARSE, DENSE, heads=HEADS)
    batch, info, bad = dec.decode(values, 400)
    bad = dict(bad)
    row = 0
    for k, v in enumerate(values):
        want = reference(v, HEADS)
        if isinstance(want, str):
            assert k in bad, (k, want)
            if want == "missing":
                assert "'click'" in bad[k] or "'watch'" in bad[k]
            continue
        assert k not in bad, (k, bad.get(k))
        labels, rates, mask = want
        np.testing.assert_allclose(np.asarray(batch.labels)[row], labels, rtol=1e-6)
        np.testing.assert_allclose(info["sample_rate"][row], rates, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(batch.label_mask)[row], mask)
        row += 1
    assert row == info["rows"] and row > 100 and len(bad) > 20
    assert np.asarray(batch.labels).shape == (400, 3)
    assert not np.asarray(batch.label_mask)[row:].any()


def test_version_one_reads_unchanged_and_refuses_named_labels():
    v1 = M.encode_example(record("a"), 1.0, 1.0, 7)
    v2 = M.encode_example(record("b"), 0.0, 0.0, 7, labels=[("click", 1.0, 1.0, False)])
    batch, info, bad = M.ExampleDecoder(SPARSE, DENSE).decode([v1, v2], 4)
    assert info["rows"] == 1 and float(batch.labels[0]) == 1.0 and batch.label_mask is None
    assert bad == [(1, M.DECODE_REASONS[12])]


def test_a_job_of_one_head_reads_version_one_examples_as_its_head():
    v1 = M.encode_example(record("a"), 1.0, 0.5, 7)
    v2 = M.encode_example(record("b"), 0.0, 0.0, 7, labels=[("click", 0.0, 0.25, False)])
    batch, info, bad = M.ExampleDecoder(SPARSE, DENSE, heads=(mj.Head("click"),)).decode([v1, v2], 4)
    assert bad == [] and info["rows"] == 2
    np.testing.assert_array_equal(np.asarray(batch.labels)[:2, 0], [1.0, 0.0])
    np.testing.assert_array_equal(info["sample_rate"][:, 0], [0.5, 0.25])


def test_a_missing_head_is_refused_by_name_and_batches_are_all_or_nothing():
    ok = M.encode_example(record("a"), 0, 0, 7, labels=[("click", 1.0, 1.0, False), ("watch", 3.5, 1.0, False)])
    lacks = M.encode_example(record("b"), 0, 0, 7, labels=[("click", 1.0, 1.0, False)])
    group = M.encode_example_batch([ok, lacks])
    batch, info, bad = M.ExampleDecoder(SPARSE, DENSE, heads=HEADS).decode([ok, group], 8)
    assert info["rows"] == 1
    assert bad == [(1, "example lacks the label of head(s) 'watch'")]


def test_non_finite_and_out_of_range_labels_are_refused():
    dec = M.ExampleDecoder(SPARSE, DENSE, heads=HEADS)
    for labels, code in ((("click", float("nan"), 1.0, False), 5), (("click", 1.0, 1.5, False), 6),
                         (("click", -0.5, 1.0, False), 6), (("watch", float("inf"), 1.0, False), 5)):
        full = [("click", 1.0, 1.0, False), ("watch", 2.0, 1.0, False)]
        full = [labels if lab[0] == labels[0] else lab for lab in full]
        _, info, bad = dec.decode([M.encode_example(record("x"), 0, 0, 7, labels=full)], 2)
        assert info["rows"] == 0 and bad == [(0, M.DECODE_REASONS[code])], labels
    # a value head takes any finite value, negative ones too
    _, info, bad = dec.decode([M.encode_example(record("x"), 0, 0, 7,
                                                labels=[("click", 0.0, 1.0, False), ("watch", -4.0, 1.0, False)])], 2)
    assert info["rows"] == 1 and bad == []


def test_json_examples_with_labels_read_like_binary_ones():
    import json

    rec = {"request_id": "j1", "event_time_ms": 5, "sparse": [{"name": "user", "ids": ["1"]},
                                                             {"name": "item", "ids": ["2"]}]}
    value = json.dumps({"version": 2, "features": rec, "labels": [{"name": "click", "value": 1},
                                                                 {"name": "watch", "value": 12.5},
                                                                 {"name": "buy", "undefined": True}]}).encode()
    batch, info, bad = M.ExampleDecoder(SPARSE, DENSE, heads=HEADS).decode([value], 2)
    assert bad == [] and info["rows"] == 1
    np.testing.assert_array_equal(np.asarray(batch.labels)[0], [1.0, 0.0, 12.5])
    np.testing.assert_array_equal(np.asarray(batch.label_mask)[0], [1.0, 0.0, 1.0])


def test_a_newer_version_is_refused():
    raw = pb.Example(version=3, features=pb.FeatureRecord.FromString(record("n"))).SerializeToString()
    _, info, bad = M.ExampleDecoder(SPARSE, DENSE, heads=HEADS).decode([raw], 2)
    assert bad == [(0, M.DECODE_REASONS[2])]


def test_heads_named_twice_are_refused():
    from monolith_jax.sparse._native import engine

    with pytest.raises(ValueError, match="named twice"):
        engine().ExampleDecoder(["user"], [1], [], M.PAD_KEY, [], ["a", "a"], [1, 1], [0, 0])
