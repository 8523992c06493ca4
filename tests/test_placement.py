"""Placement of the training step (in-jit on the CPU, host tables elsewhere)
and the overlapped host-tables step: exact by default, one step stale when
asked, and only where batches share ids."""

import dataclasses

import jax
import numpy as np
import pytest

from monolith_jax import placement
from monolith_jax.examples.movielens import job as J
from tests.serving.test_predictor import make_batch


def _trainer(**kwargs):
    job = dataclasses.replace(J.job, tables=tuple(J.tables(0, 4)), model=lambda rngs: J.model(rngs, 4, (8,)))
    return job.make_trainer(0, log_every=0, out=None, **kwargs)


def _batches(trainer, n, pool=300, seed=0, disjoint=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        b = make_batch(trainer, rng, b=64, pool=pool)
        if disjoint:  # every batch its own ids: nothing shared with the one before
            b = dataclasses.replace(b, ids={
                f: type(k).from_ids(k.to_numpy() + np.uint64((i + 1) * 10**9)) for f, k in b.ids.items()})
        out.append(b)
    return out


def _state(trainer):
    leaves = [np.asarray(x) for x in jax.tree.leaves(trainer.params) + jax.tree.leaves(trainer.opt_state)]
    tables = {}
    for name, t in trainer.tables.items():
        d = t.dump()
        o = np.argsort(d["keys"])
        tables[name] = {k: d[k][o] for k in ("keys", "values", "slots", "last_update", "update_count")}
    return leaves, tables


def _assert_same(a, b, exact=True):
    (la, ta), (lb, tb) = _state(a), _state(b)
    close = (lambda x, y: np.testing.assert_array_equal(x, y)) if exact else \
        (lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7))
    for x, y in zip(la, lb):
        close(x, y)
    assert ta.keys() == tb.keys()
    for name in ta:
        np.testing.assert_array_equal(ta[name]["keys"], tb[name]["keys"])
        for k in ("values", "slots"):
            close(ta[name][k], tb[name][k])
        np.testing.assert_array_equal(ta[name]["last_update"], tb[name]["last_update"])
        np.testing.assert_array_equal(ta[name]["update_count"], tb[name]["update_count"])
    assert a.step_count == b.step_count and a.examples == b.examples


def test_the_rule_takes_the_host_step_off_the_cpu():
    assert placement.choose("auto", "cpu") == "in_jit"
    for platform in ("gpu", "cuda", "rocm", "tpu"):
        assert placement.choose("auto", platform) == "host"
        assert placement.choose("host", platform) == "host"
        with pytest.raises(ValueError, match=f"the dense step runs on '{platform}'"):
            placement.choose("in_jit", platform)
    assert placement.choose("auto", "cpu", in_program_tables=False) == "host"
    assert placement.choose("auto", "cpu", data_parallel=True) == "host"
    assert placement.choose("host", "cpu") == "host"
    with pytest.raises(ValueError, match="placement must be one of"):
        placement.choose("gpu", "cpu")
    with pytest.raises(ValueError, match="placement must be one of"):
        _trainer(placement="device")
    with pytest.raises(ValueError, match="staleness must be 0 or 1"):
        _trainer(staleness=2)
    # This machine's dense step runs on the CPU: auto is the in-jit step.
    assert placement.dense_platform() == jax.devices()[0].platform == "cpu"
    assert _trainer().step_placement() == "in_jit"
    assert _trainer(placement="host").step_placement() == "host"


def test_overlapped_host_step_equals_the_plain_steps_exactly():
    batches = _batches(_trainer(), 8)
    probe = _trainer()
    keys = [placement.table_keys(probe.collection, b) for b in batches]
    shared = sum(int(np.isin(k[n], prev[n]).sum()) for prev, k in zip(keys, keys[1:]) for n in k)
    assert shared > 0  # the batches do share ids with the one before
    in_jit = _trainer(placement="in_jit")
    plain = _trainer(placement="host", overlap=False)
    overlapped = _trainer(placement="host", overlap=True)
    for t in (in_jit, plain, overlapped):
        t.fit(batches)
    assert overlapped.host_stats["steps"] == 8 and overlapped.host_stats["stale_ids"] == 0
    assert overlapped.host_stats["wait_s"] >= 0 and overlapped.host_stats["lookup_s"] > 0
    _assert_same(overlapped, plain, exact=True)  # the same programs and table calls, in the same order per id
    _assert_same(overlapped, in_jit, exact=False)  # another XLA program: float rounding only
    # Evaluation and prediction read the same rows and params either way.
    np.testing.assert_array_equal(overlapped.predict(batches[0]), plain.predict(batches[0]))
    # Stopping early (max_steps) still applies every trained step's gradients.
    a, b = _trainer(placement="host", overlap=True), _trainer(placement="host", overlap=False)
    a.fit(batches, max_steps=3)
    for batch in batches[:3]:
        b.train_step(batch)
    _assert_same(a, b, exact=True)


def test_staleness_one_reads_shared_rows_from_before_the_previous_update():
    batches = _batches(_trainer(), 6)
    plain, stale = _trainer(placement="host", overlap=False), _trainer(placement="host", overlap=True, staleness=1)
    plain.fit(batches)
    stale.fit(batches)
    keys = [placement.table_keys(plain.collection, b) for b in batches]
    shared = sum(int(np.isin(k[n], prev[n]).sum()) for prev, k in zip(keys, keys[1:]) for n in k)
    assert stale.host_stats["stale_ids"] == shared > 0
    (lp, tp), (ls, ts) = _state(plain), _state(stale)
    assert any(not np.array_equal(x, y) for x, y in zip(lp, ls))  # stale rows moved the dense params
    assert any(not np.array_equal(tp[n]["values"], ts[n]["values"]) for n in tp)
    # The same rows exist, each updated as many times: only what they read differs.
    for n in tp:
        np.testing.assert_array_equal(tp[n]["keys"], ts[n]["keys"])
        np.testing.assert_array_equal(tp[n]["update_count"], ts[n]["update_count"])

    # Batches sharing no ids: staleness changes nothing.
    disjoint = _batches(_trainer(), 6, disjoint=True)
    plain, stale = _trainer(placement="host", overlap=False), _trainer(placement="host", overlap=True, staleness=1)
    plain.fit(disjoint)
    stale.fit(disjoint)
    assert stale.host_stats["stale_ids"] == 0
    _assert_same(stale, plain, exact=True)


from tests.distributed.test_training_ps import two_shards  # noqa: E402,F401  (a fixture: two shard processes)


def test_tables_on_training_ps_shards_take_the_overlapped_host_step(two_shards):
    from monolith_jax.distributed.training_ps import ShardedTable
    from monolith_jax.examples.movielens.loop import movielens_trainer

    _, procs = two_shards
    local = movielens_trainer(dim=4, hidden=(8,), out=None)
    remote = movielens_trainer(dim=4, hidden=(8,), out=None)
    remote.overlap = True
    sharded = ShardedTable(remote.tables["ids"].config, [f"127.0.0.1:{p}" for _, p in procs])
    remote.collection.tables["ids"] = sharded
    assert local.step_placement() == "in_jit" and remote.step_placement() == "host"  # auto, both
    rng = np.random.default_rng(0)
    batches = [make_batch(local, rng) for _ in range(5)]
    local.fit(batches)
    remote.fit(batches)
    assert remote.host_stats["steps"] == 5
    for x, y in zip(jax.tree.leaves(local.params), jax.tree.leaves(remote.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    keys, values = local.tables["ids"].export()
    got, found = sharded.find(keys)
    assert found.all() and len(sharded) == keys.size
    np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-6)
    sharded.close()
