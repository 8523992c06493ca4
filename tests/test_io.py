"""iter_batches' shuffle buffer: every record once, in an order set by the
seed, mixed across batches, never read further ahead than the buffer."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from monolith_jax.features import DenseFeature, SparseFeature
from monolith_jax.io import iter_batches, shuffle_records

SPARSE = [SparseFeature("user", "ids", column="user_id")]
DENSE = [DenseFeature("rid")]


def _file(tmp_path, n=3000, name="data.parquet", start=0):
    path = tmp_path / name
    rid = np.arange(start, start + n)
    pq.write_table(pa.table({"user_id": rid * 7 + 1, "rid": rid.astype(np.float32),
                             "label": (rid % 3 == 0).astype(np.float32)}), path, row_group_size=250)
    return str(path)


def _order(batches):
    """The record ids in the order the batches hold them (padding left out)."""
    return np.concatenate([np.asarray(b.dense[:, 0])[np.asarray(b.weights) > 0] for b in batches]).astype(np.int64)


def test_no_shuffle_keeps_file_order(tmp_path):
    path = _file(tmp_path)
    assert _order(iter_batches(path, SPARSE, DENSE, batch_size=256)).tolist() == list(range(3000))


def test_shuffle_gives_every_record_once_in_an_order_the_seed_sets(tmp_path):
    paths = [_file(tmp_path, 3000), _file(tmp_path, 1000, "more.parquet", start=3000)]
    batches = list(iter_batches(paths, SPARSE, DENSE, batch_size=256, shuffle=1000, seed=1))
    order = _order(batches)
    assert sorted(order.tolist()) == list(range(4000))                       # each record exactly once
    assert [int(b.weights.sum()) for b in batches] == [256] * 15 + [160]      # full batches, padded last
    assert (order != np.arange(4000)).mean() > 0.99                          # another order
    # the rows of a record travel together: its id and label are its own
    users = np.concatenate([b.ids["user"].to_numpy()[:, 0][np.asarray(b.weights) > 0] for b in batches])
    np.testing.assert_array_equal(users, SPARSE[0].keys(order * 7 + 1))
    labels = np.concatenate([np.asarray(b.labels)[np.asarray(b.weights) > 0] for b in batches])
    np.testing.assert_array_equal(labels, (order % 3 == 0).astype(np.float32))
    # records, not batches, are mixed: the first batch draws from many file batches
    assert len(np.unique(order[:256] // 256)) >= 4
    again = _order(iter_batches(paths, SPARSE, DENSE, batch_size=256, shuffle=1000, seed=1))
    np.testing.assert_array_equal(order, again)                              # same seed, same order
    other = _order(iter_batches(paths, SPARSE, DENSE, batch_size=256, shuffle=1000, seed=2))
    assert (other != order).mean() > 0.99
    # a buffer holding the whole file: records from the end reach the first batch
    full = _order(iter_batches(paths, SPARSE, DENSE, batch_size=256, shuffle=10_000))
    assert full[:256].max() > 3000 and sorted(full.tolist()) == list(range(4000))


def test_shuffle_memory_is_bounded_by_the_buffer(tmp_path):
    path = _file(tmp_path)
    buffer = 300
    # The record in output position j is one of the first j + buffer read.
    order = _order(iter_batches(path, SPARSE, DENSE, batch_size=100, shuffle=buffer, seed=0))
    assert (order - np.arange(order.size)).max() < buffer
    assert (order - np.arange(order.size)).max() > buffer // 2       # and the buffer is used
    # At most `buffer` records wait inside between blocks (the block being read aside).
    read, emitted, held = [0], [0], []

    def blocks():
        for start in range(0, 5000, 64):
            n = min(64, 5000 - start)
            read[0] += n
            held.append(read[0] - emitted[0])
            yield pa.table({"rid": np.arange(start, start + n)})

    out = []
    for t in shuffle_records(blocks(), buffer, seed=0):
        emitted[0] += t.num_rows
        out.append(t.column("rid").to_numpy())
    assert max(held) <= buffer + 64
    assert sorted(np.concatenate(out).tolist()) == list(range(5000))


def test_shuffle_takes_a_buffer_size(tmp_path):
    path = _file(tmp_path, 100)
    for bad in (True, 0, -5, 2.5, "big"):
        with pytest.raises(ValueError, match=r"shuffle takes the shuffle buffer's size in records"):
            list(iter_batches(path, SPARSE, DENSE, batch_size=32, shuffle=bad))
    assert _order(iter_batches(path, SPARSE, DENSE, batch_size=32, shuffle=1)).tolist() == list(range(100))
