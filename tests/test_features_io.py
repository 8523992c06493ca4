"""Feature parsing: the vectorized record -> batch path against a slow
per-record reference, on CSV and Parquet files."""

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from monolith_jax.features import PAD_KEY, DenseFeature, SparseFeature, records_to_batch
from monolith_jax.io import iter_batches
from monolith_jax.sparse import hash_strings

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
    """One record, the obvious way."""
    user = np.array([rec["user_id"][i]], np.int64).view(np.uint64)[0]
    parts = [p for p in rec["tags"][i].split("|") if p != ""] if rec["tags"][i] else []
    tag_keys = hash_strings(parts[:3]).tolist() if parts else []
    tags = tag_keys + [PAD_KEY] * (3 - len(tag_keys))
    city = hash_strings([rec["city"][i]])[0]
    return int(user), tags, min(len(parts), 3), int(city)


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
