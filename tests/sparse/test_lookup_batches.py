"""Batched find-or-insert on Zipf batches (many duplicates, thousands of new
ids per batch, large enough to run on every thread), row by row against a
dict of the rows first returned, with one thread and with several: a new
row's values are a pure function of (seed, key), so both thread counts and
a table fed one key at a time must return the same bits.
"""

import json
import os
import subprocess
import sys

import numpy as np

from monolith_jax.sparse import Adagrad, EmbeddingTable, Normal, TableConfig

DIM = 16
BATCH = 20_000


def _batches(seed=5, n=6):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r = rng.zipf(1.05, size=BATCH)
        r = r[r <= 200_000]
        # sparse 64-bit keys, some with the top bit set
        out.append((r.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0xD1B54A32D192ED03))
    return out


def _table():
    return EmbeddingTable(TableConfig("zipf", DIM, initializer=Normal(0.0, 0.5),
                                      optimizer=Adagrad(0.05, initial_accumulator_value=0.1)))


def run_batches() -> dict:
    """Lookups of every batch against a dict reference; returns a digest of the rows."""
    table = _table()
    ref: dict = {}
    lookups = inserts = 0
    digest = np.zeros(DIM, np.float64)
    for keys in _batches():
        out = np.empty((keys.size, DIM), np.float32)
        table.lookup_host(keys, out=out)
        lookups += keys.size
        for k, row in zip(keys.tolist(), out):
            want = ref.get(k)
            if want is None:
                ref[k] = row.copy()
                inserts += 1
            else:
                assert np.array_equal(row, want), k
        digest += out.astype(np.float64).sum(axis=0)
        st = table.stats()
        assert st["lookups"] == lookups and st["inserts"] == inserts and len(table) == len(ref)
    # A table fed one key at a time, in reverse order, makes the same rows.
    single = _table()
    for k in sorted(ref, reverse=True)[:2000]:
        assert np.array_equal(single.lookup_host(np.array([k], np.uint64))[0], ref[k])
    vals = np.stack(list(ref.values()))
    return dict(digest=digest.tolist(), rows=len(ref), mean=float(vals.mean()), std=float(vals.std()))


def test_zipf_batches_against_dict_one_thread_and_several():
    results = []
    for threads in ("1", "3"):
        env = {**os.environ, "MONOLITH_NUM_THREADS": threads}
        code = ("import json, tests.sparse.test_lookup_batches as t; "
                "print('RESULT', json.dumps(t.run_batches()))")
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert p.returncode == 0, p.stderr[-3000:]
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    assert results[0] == results[1]
    r = results[0]
    assert r["rows"] > 10_000
    # Normal(0, 0.5) initial values
    assert abs(r["mean"]) < 0.01 and abs(r["std"] - 0.5) < 0.01


def test_normal_initial_values_are_gaussian():
    table = EmbeddingTable(TableConfig("g", 64, initializer=Normal(0.0, 1.0)))
    v = table.lookup_host(np.arange(20_000, dtype=np.uint64)).ravel().astype(np.float64)
    assert np.isfinite(v).all()
    assert abs(v.mean()) < 0.01 and abs(v.std() - 1.0) < 0.01
    # the probabilities of |z| < 1, 2, 3 (0.6827, 0.9545, 0.9973)
    for s, p in ((1, 0.6827), (2, 0.9545), (3, 0.9973)):
        assert abs(np.mean(np.abs(v) < s) - p) < 0.004, s
    assert np.abs(v).max() < 6.0  # u1 >= 2^-24 bounds |z| by sqrt(2 ln 2^24) = 5.77
    # no structure between neighbouring elements of a row
    rows = v.reshape(-1, 64)
    assert abs(np.corrcoef(rows[:, :-1].ravel(), rows[:, 1:].ravel())[0, 1]) < 0.01
