"""New rows: values a pure function of (seed, key), with the asked distribution."""

import numpy as np
import pytest

from monolith_jax.sparse import (
    Constant, EmbeddingTable, Normal, SGD, TableConfig, TruncatedNormal, Uniform, Zeros,
)

KEYS = np.random.default_rng(0).integers(0, 2**64 - 1, 20_000, dtype=np.uint64, endpoint=True)


def table(init, seed=3, dim=8):
    return EmbeddingTable(TableConfig("i", dim, initializer=init, optimizer=SGD(), seed=seed))


@pytest.mark.parametrize("init", [Uniform(-0.1, 0.3), Normal(0.5, 2.0), TruncatedNormal(0.0, 1.0)])
def test_rows_depend_only_on_seed_and_key(init):
    a = table(init).lookup_host(KEYS)
    b = table(init)
    b.lookup_host(KEYS[::-1][:7000])  # another order, another table, fewer keys first
    np.testing.assert_array_equal(b.lookup_host(KEYS), a)
    assert not np.array_equal(table(init, seed=4).lookup_host(KEYS), a)
    assert np.unique(a[:, 0]).size > 0.99 * KEYS.size  # rows differ from each other


def test_distributions():
    u = table(Uniform(-0.1, 0.3)).lookup_host(KEYS)
    assert u.min() >= -0.1 and u.max() < 0.3
    assert abs(u.mean() - 0.1) < 0.005 and abs(u.std() - 0.4 / np.sqrt(12)) < 0.005
    n = table(Normal(0.5, 2.0)).lookup_host(KEYS)
    assert abs(n.mean() - 0.5) < 0.05 and abs(n.std() - 2.0) < 0.05
    t = table(TruncatedNormal(1.0, 0.5)).lookup_host(KEYS)
    assert t.min() >= 0.0 and t.max() <= 2.0
    assert abs(t.mean() - 1.0) < 0.01 and abs(t.std() - 0.5 * 0.8796) < 0.01  # std of N cut at 2 sigma
    # Each element of a row is its own draw.
    assert abs(np.corrcoef(n[:, 0], n[:, 1])[0, 1]) < 0.03


def test_constant_and_zeros():
    np.testing.assert_array_equal(table(Constant(0.25)).lookup_host(KEYS[:10]), 0.25)
    np.testing.assert_array_equal(table(Zeros()).lookup_host(KEYS[:10]), 0.0)


def test_bad_initializers_are_refused():
    with pytest.raises(ValueError, match="low < high"):
        Uniform(1.0, 1.0)
    with pytest.raises(ValueError, match="stddev"):
        Normal(0.0, -1.0)


def test_table_configs_round_trip_through_json():
    import json

    import pytest

    from monolith_jax.sparse.config import (FTRL, Adam, FrequencyFilter, ProbabilisticFilter, TableConfig,
                                            TruncatedNormal, Uniform, config_from_dict, config_to_dict)

    for c in [TableConfig("ids", 9),
              TableConfig("a", 4, Uniform(-0.1, 0.1), FTRL(0.1), seed=3, admission=FrequencyFilter(3),
                          expire_after=100, max_rows=10, eviction="lfu"),
              TableConfig("b", 8, TruncatedNormal(0, 0.02), Adam(0.001), admission=ProbabilisticFilter(0.5))]:
        assert config_from_dict(json.loads(json.dumps(config_to_dict(c)))) == c
    with pytest.raises(ValueError, match="unknown kind 'Pickle'"):
        config_from_dict({"name": "x", "dim": 2, "optimizer": {"kind": "Pickle"}})
    with pytest.raises(ValueError, match="no field 'colour'"):
        config_from_dict({"name": "x", "dim": 2, "colour": "red"})
