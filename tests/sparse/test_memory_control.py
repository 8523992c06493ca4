"""Admission filters, expiry, capacity eviction, touched keys and export."""

import threading

import ml_dtypes
import numpy as np
import pytest

from monolith_jax.sparse import (
    SGD, Constant, EmbeddingTable, FrequencyFilter, Normal, ProbabilisticFilter, TableConfig,
)


def make(**kw):
    kw.setdefault("initializer", Constant(1.0))
    kw.setdefault("optimizer", SGD(1.0))
    return EmbeddingTable(TableConfig("m", 2, **kw))


def ones(n):
    return np.ones((n, 2), np.float32)


# ------------------------------------------------------------------ admission


@pytest.mark.parametrize("k", [2, 3, 5])
def test_threshold_k_admits_at_the_kth_sighting(k):
    t = make(admission=FrequencyFilter(k, counters=1 << 16))
    ids = np.arange(100, 140, dtype=np.uint64)
    for seen in range(1, k):
        rows = t.lookup_host(ids)
        np.testing.assert_array_equal(rows, 0.0)          # the default for unadmitted ids
        assert t.apply_gradients_host(ids, ones(40)) == (0, 0)  # gradients dropped
        assert len(t) == 0
    s = t.stats()
    assert s["filtered"] == 40 * (k - 1) and s["dropped"] == 40 * (k - 1)
    rows = t.lookup_host(ids)                              # the k-th sighting
    np.testing.assert_array_equal(rows, 1.0)
    assert len(t) == 40
    assert t.apply_gradients_host(ids, ones(40)) == (40, 0)
    np.testing.assert_array_equal(t.find(ids)[0], 0.0)


def test_duplicates_in_one_batch_are_sightings():
    t = make(admission=FrequencyFilter(3, counters=1 << 12))
    rows = t.lookup_host(np.array([7, 7, 7, 8], np.uint64))
    np.testing.assert_array_equal(rows[:, 0], [0.0, 0.0, 1.0, 0.0])  # admitted at its third
    assert t.find(np.array([7, 8], np.uint64))[1].tolist() == [True, False]


def test_unadmitted_ids_can_read_their_initializer():
    t = make(initializer=Normal(0, 1), admission=FrequencyFilter(2, counters=4096), unadmitted="initializer")
    ids = np.array([11, 12], np.uint64)
    first = t.lookup_host(ids)
    assert len(t) == 0 and not np.allclose(first, 0)
    np.testing.assert_array_equal(t.lookup_host(ids), first)  # admitted now: the same values


def test_filter_memory_is_fixed_and_false_admissions_are_rare():
    counters = 1 << 22
    t = make(admission=FrequencyFilter(2, counters=counters))
    before = t.stats()["bytes_filter"]
    ids = np.random.default_rng(0).integers(0, 2**64 - 1, 200_000, dtype=np.uint64, endpoint=True)
    for i in range(0, ids.size, 20_000):
        t.lookup_host(ids[i:i + 20_000])                  # each id once
    s = t.stats()
    assert s["bytes_filter"] == before == counters
    assert s["rows"] < 0.002 * ids.size                    # false admissions (~0.1% expected)
    assert s["filtered"] == ids.size - s["rows"]


def test_probabilistic_admission_is_seeded_and_near_its_rate():
    ids = np.random.default_rng(1).integers(0, 2**63, 20_000, dtype=np.uint64)
    admitted = []
    for _ in range(2):
        t = make(admission=ProbabilisticFilter(0.3, counters=1 << 18), seed=5)
        t.lookup_host(ids)
        admitted.append(np.sort(t.dump()["keys"]))
    np.testing.assert_array_equal(admitted[0], admitted[1])
    assert abs(admitted[0].size / ids.size - 0.3) < 0.02
    other = make(admission=ProbabilisticFilter(0.3, counters=1 << 18), seed=6)
    other.lookup_host(ids)
    assert not np.array_equal(np.sort(other.dump()["keys"]), admitted[0])


def test_filter_state_survives_dump_and_load():
    cfg = TableConfig("f", 2, Constant(1.0), SGD(1.0), admission=FrequencyFilter(3, counters=4096))
    t = EmbeddingTable(cfg)
    ids = np.array([1, 2, 3], np.uint64)
    t.lookup_host(ids)
    t.lookup_host(ids)                                     # seen twice, no rows yet
    u = EmbeddingTable(cfg)
    u.load(t.dump())
    np.testing.assert_array_equal(u.lookup_host(ids), 1.0)  # third sighting: admitted
    fresh = EmbeddingTable(cfg)
    np.testing.assert_array_equal(fresh.lookup_host(ids), 0.0)


# --------------------------------------------------------------------- expiry


def test_expiry_removes_exactly_the_stale_rows_and_they_come_back_new():
    t = make(expire_after=100)
    rng = np.random.default_rng(2)
    ref = {}
    for step in range(0, 1000, 10):
        ids = rng.integers(0, 500, 50).astype(np.uint64)
        t.apply_gradients_host(ids, ones(50), step=step)
        for k in ids.tolist():
            ref[k] = step
    now = 1000
    stale = sorted(k for k, last in ref.items() if last < now - 100)
    assert t.expire(now) == len(stale)
    keys = np.array(sorted(ref), np.uint64)
    found = t.find(keys)[1]
    assert set(keys[~found].tolist()) == set(stale)
    assert t.stats()["expired"] == len(stale)
    # An expired id seen again is a new row: initializer values, no updates.
    np.testing.assert_array_equal(t.lookup_host(np.array(stale[:3], np.uint64)), 1.0)
    d = t.dump()
    assert (d["update_count"][np.isin(d["keys"], stale[:3])] == 0).all()


def test_expire_defaults_to_the_latest_step_and_new_rows_are_stamped_with_it():
    t = make(expire_after=50)
    t.apply_gradients_host(np.array([1], np.uint64), ones(1), step=10)
    t.apply_gradients_host(np.array([2], np.uint64), ones(1), step=200)
    t.lookup_host(np.array([3], np.uint64))               # created at the clock, 200
    assert t.expire() == 1                                 # only id 1 (10 < 200 - 50)
    assert t.find(np.array([1, 2, 3], np.uint64))[1].tolist() == [False, True, True]


def test_expiry_runs_while_lookups_go_on():
    t = make(expire_after=10)
    ids = np.arange(50_000, dtype=np.uint64)
    stop, errors = threading.Event(), []

    def reader():
        while not stop.is_set():
            rows = t.lookup_host(ids[:20_000])
            if not np.isfinite(rows).all():
                errors.append("bad row")

    th = threading.Thread(target=reader)
    th.start()
    for step in range(0, 200, 5):
        t.apply_gradients_host(ids[step * 100:(step + 5) * 100], ones(500), step=step)
        t.expire(step)
    stop.set()
    th.join()
    assert not errors and t.stats()["expired"] > 0


# --------------------------------------------------------------- capacity


def _reference_evict(rows, cap, policy):
    """rows: key -> (last_update, update_count); the table's exact rule."""
    keep = cap - max(1, cap // 20)
    if len(rows) <= cap:
        return rows
    order = sorted(rows, key=lambda k: (rows[k][0], rows[k][1], k) if policy == "lru" else (rows[k][1], rows[k][0], k))
    for k in order[: len(rows) - keep]:
        del rows[k]
    return rows


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_capacity_eviction_removes_exactly_the_rows_of_the_policy(policy):
    cap = 400
    t = make(max_rows=cap, eviction=policy)
    rng = np.random.default_rng(3)
    ref = {}
    for step in range(1, 60):
        ids = np.unique(rng.integers(0, 2000, 60).astype(np.uint64))
        hot = np.arange(20, dtype=np.uint64)                # updated often
        batch = np.concatenate([ids, hot])
        batch = np.unique(batch)
        t.apply_gradients_host(batch, ones(batch.size), step=step)
        for k in batch.tolist():
            last, count = ref.get(k, (0, 0))
            ref[k] = (step, count + 1)
        ref = _reference_evict(ref, cap, policy)
        assert len(t) <= cap
        d = t.dump()
        assert set(d["keys"].tolist()) == set(ref), f"step {step}"
    s = t.stats()
    assert s["evicted"] > 0 and s["rows"] == len(ref)
    assert set(range(20)) <= set(ref)                       # hot ids survive either policy


def test_capacity_bounds_lookups_too():
    t = make(max_rows=1000)
    capacity = []
    for i in range(40):
        t.lookup_host(np.arange(i * 500, (i + 1) * 500, dtype=np.uint64))
        assert len(t) <= 1000
        capacity.append(t.stats()["row_capacity"])
    assert capacity[-1] == capacity[5]  # evicted rows are reused: memory stops growing


# -------------------------------------------------------------- touched keys


def test_drain_returns_exactly_the_rows_touched_since_the_last_drain():
    t = make()
    t.lookup_host(np.arange(10, dtype=np.uint64))           # created: touched
    keys, values = t.drain_touched()
    assert sorted(keys.tolist()) == list(range(10))
    assert t.drain_touched()[0].size == 0
    t.apply_gradients_host(np.array([3, 5, 3], np.uint64), ones(3), step=1)
    keys, values = t.drain_touched()
    order = np.argsort(keys)
    assert keys[order].tolist() == [3, 5]
    np.testing.assert_array_equal(values[order], [[-1.0, -1.0], [0.0, 0.0]])
    t.apply_gradients_host(np.array([4], np.uint64), ones(1))
    t.erase(np.array([4], np.uint64))                       # gone: not reported
    assert t.drain_touched()[0].size == 0
    assert t.stats()["touched"] == 0


def test_export_and_drain_compress_values():
    t = make(initializer=Normal(0, 1))
    t.lookup_host(np.arange(100, dtype=np.uint64))
    keys, f32 = t.export()
    for dtype, np_dtype in [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)]:
        k, v = t.export(dtype)
        assert v.dtype == np_dtype
        np.testing.assert_array_equal(k, keys)
        np.testing.assert_array_equal(v, f32.astype(np_dtype))
    _, v = t.drain_touched("bfloat16")
    assert v.dtype == ml_dtypes.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        t.export("int8")


@pytest.mark.parametrize("dtype", ["int8", np.int8, "float64", "no-such-type"])
def test_a_refused_drain_dtype_keeps_every_touched_mark(dtype):
    """The dtype is checked before the marks are cleared: the rows of a
    refused drain are still there for the next one (else they never sync)."""
    t = make(initializer=Normal(0, 1))
    t.lookup_host(np.arange(20, dtype=np.uint64))
    t.drain_touched()
    t.apply_gradients_host(np.array([3, 7, 11], np.uint64), ones(3), step=1)
    with pytest.raises(ValueError, match=r"table 'm': export dtype must be one of"):
        t.drain_touched(dtype)
    with pytest.raises(ValueError, match=r"table 'm': export dtype must be one of"):
        t.export(dtype)
    assert t.stats()["touched"] == 3
    keys, values = t.drain_touched("float16")
    order = np.argsort(keys)
    assert keys[order].tolist() == [3, 7, 11]
    np.testing.assert_array_equal(values[order], t.find(keys[order])[0].astype(np.float16))


def test_memory_stats_add_up():
    t = make(admission=FrequencyFilter(2, counters=1 << 14), max_rows=100, expire_after=5)
    ids = np.arange(300, dtype=np.uint64)
    t.lookup_host(ids)
    t.lookup_host(ids)
    s = t.stats()
    assert s["rows"] <= 100 and s["admitted"] == 300 and s["evicted"] >= 200
    assert s["bytes_total"] == s["bytes_values"] + s["bytes_slots"] + s["bytes_filter"] + s["bytes_overhead"]
    assert s["bytes_filter"] == 1 << 14


def test_bad_memory_configs_are_refused():
    with pytest.raises(ValueError, match="occurrence_threshold"):
        FrequencyFilter(1)
    with pytest.raises(ValueError, match="counters"):
        FrequencyFilter(3, counters=10)
    with pytest.raises(ValueError, match="probability"):
        ProbabilisticFilter(1.5)
    with pytest.raises(ValueError, match="eviction"):
        TableConfig("x", 2, eviction="fifo")
    with pytest.raises(ValueError, match="unadmitted"):
        TableConfig("x", 2, unadmitted="ones")


def test_eviction_is_exact_while_another_thread_reads():
    cap = 300
    t = make(max_rows=cap, eviction="lru")
    watch = np.arange(1000, dtype=np.uint64)
    stop, errors = threading.Event(), []

    def reader():
        while not stop.is_set():
            rows, found = t.find(watch)
            if not (rows[found] <= 1.0).all() or (rows[~found] != 0).any():
                errors.append("torn or wrong row")

    th = threading.Thread(target=reader)
    th.start()
    rng = np.random.default_rng(9)
    ref = {}
    for step in range(1, 80):
        batch = np.unique(rng.integers(0, 1000, 50).astype(np.uint64))
        t.apply_gradients_host(batch, ones(batch.size) * 0.001, step=step)
        for k in batch.tolist():
            ref[k] = (step, ref.get(k, (0, 0))[1] + 1)
        ref = _reference_evict(ref, cap, "lru")
    stop.set()
    th.join()
    assert not errors
    assert set(t.dump()["keys"].tolist()) == set(ref)
