"""Hammers the table with random mixed operations against a plain dict.

Lookups (find-or-insert), fused SGD/Adagrad applies with duplicate ids,
read-only finds, erases, clears and dump/load round trips, thousands of them
over a small key space with adversarial keys (0, 2^64-1, keys sharing low or
high words), comparing every row returned and, at checkpoints, every row held.
"""

import numpy as np
import pytest

from monolith_jax.sparse import SGD, Adagrad, Constant, EmbeddingTable, TableConfig

DIM = 3
INIT = 0.25


def _key_space(rng, n):
    special = np.array([0, 1, 2**64 - 1, 2**63, 2**32, 2**32 - 1, 0xFFFFFFFF00000000], dtype=np.uint64)
    low_shared = (rng.integers(0, 2**20, n // 4, dtype=np.uint64) << np.uint64(32)) | np.uint64(7)
    rand = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    return np.unique(np.concatenate([special, low_shared, rand]))


class Reference:
    """The table's contract, on a dict of numpy rows, in float32."""

    def __init__(self, optimizer):
        self.rows = {}
        self.opt = optimizer
        self.clock = 0  # the latest apply step: new rows' last_update

    def _row(self, k):
        if k not in self.rows:
            acc = np.float32(self.opt.initial_accumulator_value) if isinstance(self.opt, Adagrad) else np.float32(0)
            self.rows[k] = [np.full(DIM, INIT, np.float32), np.full(DIM, acc, np.float32), self.clock, 0]
        return self.rows[k]

    def lookup(self, keys):
        return np.stack([self._row(int(k))[0].copy() for k in keys]) if len(keys) else np.zeros((0, DIM), np.float32)

    def apply(self, keys, grads, lr, step):
        if len(keys):
            self.clock = max(self.clock, step)
        sums = {}
        for k, g in zip(keys.tolist(), grads):
            sums[k] = sums[k] + g if k in sums else g.copy()
        updated = skipped = 0
        for k, g in sums.items():
            row = self._row(k)
            if not np.isfinite(g).all():
                skipped += 1
                continue
            if isinstance(self.opt, Adagrad):
                row[1] = row[1] + g * g
                row[0] = row[0] - np.float32(lr) * g / np.sqrt(row[1] + np.float32(self.opt.eps))
            else:
                row[0] = row[0] - np.float32(lr) * g
            row[2], row[3] = step, row[3] + 1
            updated += 1
        return updated, skipped

    def erase(self, keys):
        return sum(self.rows.pop(int(k), None) is not None for k in np.unique(keys))


def _check_all(table, ref):
    d = table.dump()
    assert d["keys"].size == len(ref.rows) == len(table)
    order = np.argsort(d["keys"])
    keys = d["keys"][order]
    want_keys = np.array(sorted(ref.rows), dtype=np.uint64)
    np.testing.assert_array_equal(keys, want_keys)
    vals = np.stack([ref.rows[int(k)][0] for k in keys]) if keys.size else np.zeros((0, DIM))
    np.testing.assert_allclose(d["values"][order], vals, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(d["last_update"][order], [ref.rows[int(k)][2] for k in keys])
    np.testing.assert_array_equal(d["update_count"][order], [ref.rows[int(k)][3] for k in keys])
    return d


@pytest.mark.parametrize("optimizer", [SGD(0.1), Adagrad(0.1)], ids=["sgd", "adagrad"])
def test_random_operations_match_dict_reference(optimizer):
    rng = np.random.default_rng(1234)
    space = _key_space(rng, 3000)
    table = EmbeddingTable(TableConfig("r", DIM, initializer=Constant(INIT), optimizer=optimizer))
    ref = Reference(optimizer)
    ops = 0
    for it in range(6000):
        op = rng.choice(["lookup", "apply", "find", "erase", "dump_load", "clear"],
                        p=[0.38, 0.38, 0.12, 0.1, 0.015, 0.005])
        n = int(rng.integers(0, 64))
        keys = space[rng.integers(0, space.size, n)]
        if op == "lookup":
            np.testing.assert_allclose(table.lookup_host(keys), ref.lookup(keys), rtol=1e-5, atol=1e-6)
        elif op == "apply":
            grads = rng.standard_normal((n, DIM)).astype(np.float32)
            if n and rng.random() < 0.05:
                grads[rng.integers(0, n)] = np.nan
            step = int(rng.integers(0, 2**31))
            lr = float(rng.uniform(0.01, 0.2))
            assert table.apply_gradients_host(keys, grads, learning_rate=lr, step=step) == \
                ref.apply(keys, grads, lr, step)
        elif op == "find":
            rows, found = table.find(keys)
            want_found = np.array([int(k) in ref.rows for k in keys], dtype=bool)
            np.testing.assert_array_equal(found, want_found)
            want = np.stack([ref.rows[int(k)][0] if int(k) in ref.rows else np.zeros(DIM, np.float32)
                             for k in keys]) if n else np.zeros((0, DIM))
            np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-6)
        elif op == "erase":
            assert table.erase(np.unique(keys)) == ref.erase(keys)
        elif op == "dump_load":
            d = _check_all(table, ref)
            fresh = EmbeddingTable(table.config)
            fresh.load(d)
            table = fresh
        elif op == "clear":
            table.clear()
            ref.rows.clear()
        ops += 1
        if it % 500 == 0:
            _check_all(table, ref)
    _check_all(table, ref)
    assert ops == 6000


def test_growth_from_tiny_index_keeps_every_row():
    """Tens of thousands of inserts through many index rebuilds and erasures."""
    rng = np.random.default_rng(5)
    table = EmbeddingTable(TableConfig("g", 2, initializer=Constant(1.0), optimizer=SGD(1.0)))
    ref = {}
    for _ in range(40):
        keys = rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64, endpoint=True)
        table.lookup_host(keys)
        grads = np.repeat(rng.standard_normal((keys.size, 1)).astype(np.float32), 2, axis=1)
        table.apply_gradients_host(keys, grads)
        for k, g in zip(keys.tolist(), grads[:, 0]):
            ref[k] = ref.get(k, np.float32(1.0)) - g
        gone = keys[:300]
        table.erase(gone)
        for k in gone.tolist():
            ref.pop(k, None)
    assert table.stats()["index_rebuilds"] > 5
    keys = np.array(list(ref), dtype=np.uint64)
    rows, found = table.find(keys)
    assert found.all() and len(table) == len(ref)
    np.testing.assert_allclose(rows[:, 0], np.array(list(ref.values()), np.float32), rtol=1e-5, atol=1e-5)
