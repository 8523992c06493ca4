"""Feature parsing: the vectorized record -> batch path against a slow
per-record reference, on CSV and Parquet files; what a record may not
lack (a sparse feature, a dense value without a fill, a label)."""

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from monolith_jax.features import (
    PAD_KEY, DenseFeature, SparseFeature, fill_counts, records_to_batch, reset_fill_counts)
from monolith_jax.io import iter_batches
from monolith_jax.sparse import hash_strings, space_keys

SPARSE = [
    SparseFeature("user", "u", column="user_id"),
    SparseFeature("tags", "t", column="tags", combiner="mean", max_len=3, separator="|"),
    SparseFeature("city", "u", column="city"),
]
DENSE = [DenseFeature("age")]


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    tags = ["|".join(str(t) for t in rng.integers(0, 50, rng.integers(0, 6))) for _ in range(n)]
    return {
        "user_id": rng.integers(-5, 10**12, n),
        "tags": tags,
        "city": [f"city{c}" for c in rng.integers(0, 20, n)],
        "age": rng.uniform(18, 80, n).astype(np.float32),
        "label": rng.integers(0, 2, n).astype(np.int64),
    }


def _slow_reference(rec, i):
    """One record, the obvious way: raw ids, then each feature's key space."""
    user = np.array([rec["user_id"][i]], np.int64).view(np.uint64)[0]
    parts = [p for p in rec["tags"][i].split("|") if p != ""] if rec["tags"][i] else []
    tag_keys = [int(space_keys(k, "tags")) for k in hash_strings(parts[:3])] if parts else []
    tags = tag_keys + [PAD_KEY] * (3 - len(tag_keys))
    city = hash_strings([rec["city"][i]])[0]
    return int(space_keys(user, "user")), tags, min(len(parts), 3), int(space_keys(city, "city"))


def _check(batch, rec, offset, n):
    users = batch.ids["user"].to_numpy()
    tags = batch.ids["tags"].to_numpy()
    cities = batch.ids["city"].to_numpy()
    for j in range(n):
        u, t, tl, c = _slow_reference(rec, offset + j)
        assert users[j, 0] == u and cities[j, 0] == c
        assert tags[j].tolist() == t and batch.lengths["tags"][j] == tl
    np.testing.assert_allclose(batch.dense[:n, 0], rec["age"][offset:offset + n])
    np.testing.assert_array_equal(batch.labels[:n], rec["label"][offset:offset + n])
    assert (batch.weights[:n] == 1).all() and (batch.weights[n:] == 0).all()


def test_records_to_batch_matches_the_slow_reference():
    rec = _records(300)
    table = pa.table(rec)
    batch = records_to_batch(table, SPARSE, DENSE, "label", batch_size=320)
    assert batch.ids["tags"].words.shape == (320, 3, 2) and batch.dense.shape == (320, 1)
    _check(batch, rec, 0, 300)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_file_readers_stream_the_same_records(tmp_path, fmt):
    rec = _records(1000, seed=1)
    # Empty tag lists are empty strings in a file.
    table = pa.table(rec)
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        pcsv.write_csv(table, path)
    else:
        pq.write_table(table, path, row_group_size=137)
    batches = list(iter_batches(str(path), SPARSE, DENSE, "label", batch_size=256))
    assert [int(b.weights.sum()) for b in batches] == [256, 256, 256, 232]
    for k, b in enumerate(batches):
        _check(b, rec, 256 * k, int(b.weights.sum()))


def test_missing_columns_and_bad_types_are_named():
    rec = _records(10)
    with pytest.raises(KeyError, match="city"):
        records_to_batch(pa.table({k: v for k, v in rec.items() if k != "city"}), SPARSE, DENSE)
    with pytest.raises(TypeError, match="ids must be integers or strings"):
        records_to_batch(pa.table({"user_id": np.ones(3), "label": np.ones(3)}), [SparseFeature("user", "u", "user_id")])
    with pytest.raises(ValueError, match="combiner"):
        SparseFeature("x", "t", combiner="max")


def test_a_null_sparse_cell_is_refused_an_empty_list_is_not():
    feats = [SparseFeature("hist", "t", column="items", max_len=3), SparseFeature("user", "t")]
    ok = pa.table({"items": pa.array([[1, 2], [], [3]], pa.list_(pa.int64())), "user": [1, 2, 3],
                   "label": [1, 0, 1]})
    batch = records_to_batch(ok, feats)
    assert batch.lengths["hist"].tolist() == [2, 0, 1]
    assert batch.ids["hist"].to_numpy()[1].tolist() == [PAD_KEY] * 3
    null_list = ok.set_column(0, "items", pa.array([[1, 2], None, None], pa.list_(pa.int64())))
    with pytest.raises(ValueError, match=r"feature 'hist': column 'items' is missing \(null\) in 2 of 3 records "
                                         r"\(rows 1, 2 of the batch\); a record without ids holds an empty list"):
        records_to_batch(null_list, feats)
    null_id = ok.set_column(0, "items", pa.array([[1, 2], [], [None]], pa.list_(pa.int64())))
    with pytest.raises(ValueError, match=r"'items' holds missing \(null\) ids in row 2 of the batch"):
        records_to_batch(null_id, feats)
    null_scalar = ok.set_column(1, "user", pa.array([1, None, 3]))
    with pytest.raises(ValueError, match=r"feature 'user': column 'user' is missing \(null\) in 1 of 3.*row 1 "):
        records_to_batch(null_scalar, feats)
    # With a separator: "" is an empty list, a null string is absent.
    tags = [SparseFeature("tags", "t", separator="|", max_len=2)]
    got = records_to_batch(pa.table({"tags": ["a|b", "", "c"], "label": [1, 1, 1]}), tags)
    assert got.lengths["tags"].tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="'tags' is missing"):
        records_to_batch(pa.table({"tags": ["a|b", None, "c"], "label": [1, 1, 1]}), tags)


def test_csv_empty_cells_are_empty_lists_for_sparse_and_missing_for_dense(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("user_id,tags,city,age,label\n1,a|b,x,30,1\n2,,y,,0\n3,c,z,40,1\n")
    batches = list(iter_batches(str(path), SPARSE, [DenseFeature("age", fill=-1.0)], "label", batch_size=4))
    assert batches[0].lengths["tags"].tolist()[:3] == [2, 0, 1]
    assert batches[0].dense[:3, 0].tolist() == [30.0, -1.0, 40.0]
    with pytest.raises(ValueError, match="dense feature 'age' \\(field 'age'\\): 1 of 3 values missing or not finite"):
        list(iter_batches(str(path), SPARSE, DENSE, "label", batch_size=4))


def test_dense_nan_and_null_refused_or_filled_and_counted():
    rec = _records(6)
    age = rec["age"].astype(np.float64)
    age[[1, 4]] = np.nan
    cells = pa.array(age, mask=np.array([0, 0, 1, 0, 0, 0], bool))  # row 2 null, rows 1 and 4 NaN
    table = pa.table({**rec, "age": cells, "price": pa.array([1.0, np.inf, 2.0, 3.0, 4.0, 5.0])})
    with pytest.raises(ValueError, match=r"dense feature 'age' \(field 'age'\): 3 of 6 values missing or not "
                                         r"finite; dense feature 'p' \(field 'price'\): 1 of 6.*fill=VALUE"):
        records_to_batch(table, SPARSE, [DenseFeature("age"), DenseFeature("p", column="price")])
    reset_fill_counts()
    dense = [DenseFeature("age", fill=0.5), DenseFeature("p", column="price", fill=9)]
    batch = records_to_batch(table, SPARSE, dense, batch_size=8)
    np.testing.assert_allclose(batch.dense[:6, 0], [age[0], 0.5, 0.5, age[3], 0.5, age[5]], rtol=1e-6)
    assert batch.dense[:6, 1].tolist() == [1.0, 9.0, 2.0, 3.0, 4.0, 5.0]
    assert fill_counts() == {"age": 3, "p": 1}
    records_to_batch(table, SPARSE, dense)
    assert fill_counts() == {"age": 6, "p": 2}
    reset_fill_counts()
    assert fill_counts() == {}
    with pytest.raises(ValueError, match="fill must be a finite number"):
        DenseFeature("x", fill=float("nan"))


def test_a_missing_or_non_finite_label_is_refused():
    rec = _records(4)
    with pytest.raises(ValueError, match=r"label column 'label': 1 of 4 labels missing or not finite \(row 2 "):
        records_to_batch(pa.table({**rec, "label": pa.array([1, 0, None, 1])}), SPARSE, DENSE)
