"""EmbeddingTable.assign: the serving side's write."""

import ml_dtypes
import numpy as np
import pytest

import monolith_jax as mj


def test_assign_creates_and_overwrites_rows_last_duplicate_wins():
    t = mj.EmbeddingTable(mj.TableConfig("s", 4, mj.Normal(0, 1), mj.Adagrad(0.1),
                                         admission=mj.FrequencyFilter(occurrence_threshold=5)))
    keys = np.array([3, 2**63 + 9, 3], np.uint64)
    vals = np.array([[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]], np.float32)
    assert t.assign(keys, vals, now=7) == 2, "no admission filter on assign"
    got, found = t.find(np.array([3, 2**63 + 9, 5], np.uint64))
    assert found.tolist() == [True, True, False]
    assert got[0].tolist() == [3, 3, 3, 3] and got[1].tolist() == [2, 2, 2, 2]
    assert t.assign(np.array([3], np.uint64), np.full((1, 4), 0.5, ml_dtypes.bfloat16)) == 0
    assert t.find(np.array([3], np.uint64))[0][0].tolist() == [0.5] * 4
    assert sorted(t.dump()["last_update"].tolist()) == [0, 7], "each assign stamps its rows with now"


@pytest.mark.parametrize("values, match", [
    (np.ones((2, 4), np.float64), "float32, float16 or bfloat16"),
    (np.ones((3, 4), np.float32), r"shape \(2, 4\)"),
    (np.full((2, 4), np.nan, np.float32), "finite"),
])
def test_assign_refuses_bad_values_and_keeps_the_table(values, match):
    t = mj.EmbeddingTable(mj.TableConfig("s", 4))
    t.assign(np.array([1], np.uint64), np.ones((1, 4), np.float32))
    with pytest.raises((TypeError, ValueError), match=match):
        t.assign(np.array([1, 2], np.uint64), values)
    assert len(t) == 1 and t.find(np.array([1], np.uint64))[0][0].tolist() == [1, 1, 1, 1]
