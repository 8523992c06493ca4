"""W1 exactly as TARGETS.md defines it, beside its numpy ceiling in the same process.

The stream: 50 warm-up + 3 x 50 timed batches of 65,536 ranks, Zipf(1.05)
over a universe of 10^7 (draws past it drawn again, not clipped), fixed
seed; rank -> sparse 63-bit key by splitmix64 (as the peer harness does).
The table starts empty (capacity_hint 0): ~0.65 M rows after warm-up, ~1.82 M
at the end, so every timed batch inserts thousands of new ids. Adagrad lr
0.05, initial accumulator 0.1, rows initialized Normal(0, 0.01).

The ceiling: single-threaded np.take of the same rows by precomputed index
from a [10^7, dim] array (lookup); sort + np.add.reduceat + Adagrad on the
unique rows (apply). Table and ceiling run interleaved, batch by batch, so
the noise of a shared machine falls on both alike; each rep's rate is 50
batches over their summed time, and the ratio is ours / ceiling per rep,
median over reps.

The engine's thread count is fixed per process (MONOLITH_NUM_THREADS), so
each thread count runs in a child process of its own.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

N = 10_000_000
B = 65_536
A = 1.05
WARM, TIMED, REPS = 50, 50, 3
LR, ACC0, EPS = 0.05, 0.1, 1e-7
SEED = 20240601
MASK63 = np.uint64((1 << 63) - 1)


def splitmix64(x):
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def ranks(nb: int = WARM + REPS * TIMED) -> np.ndarray:
    """[nb, B] int32 ranks: Zipf(A) over 0..N-1, draws past N drawn again."""
    rng = np.random.default_rng(SEED)
    r = rng.zipf(A, size=(nb, B))
    bad = r > N
    while bad.any():
        r[bad] = rng.zipf(A, size=int(bad.sum()))
        bad = r > N
    return (r - 1).astype(np.int32)


def keys_of(rank: np.ndarray) -> np.ndarray:
    return (splitmix64(rank.astype(np.uint64)) & MASK63).astype(np.int64)


def grads(dim: int, n: int = 4, seed: int = 7) -> list:
    rng = np.random.default_rng(seed + dim)
    return [rng.standard_normal((B, dim), dtype=np.float32) for _ in range(n)]


class Ceiling:
    def __init__(self, dim):
        self.table = np.full((N, dim), 0.01, np.float32)  # touched, not lazily mapped
        self.acc = np.full((N, dim), ACC0, np.float32)
        self.out = np.empty((B, dim), np.float32)

    def lookup(self, idx):
        np.take(self.table, idx, axis=0, out=self.out)

    def apply(self, idx, g):
        order = np.argsort(idx, kind="stable")
        s = idx[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        u = s[starts]
        gs = np.add.reduceat(g[order], starts, axis=0)
        a = self.acc[u]
        a += gs * gs
        w = self.table[u]
        w -= np.float32(LR) * gs / np.sqrt(a)
        self.acc[u] = a
        self.table[u] = w


def measure(dim: int, rk: np.ndarray) -> dict:
    """One dim in this process: ours and the ceiling, interleaved."""
    import monolith_jax as mj
    from monolith_jax.sparse import _native

    keys = [keys_of(r) for r in rk]
    gs = grads(dim)
    table = mj.EmbeddingTable(mj.TableConfig(
        f"w1_d{dim}", dim, initializer=mj.Normal(0.0, 0.01),
        optimizer=mj.Adagrad(LR, initial_accumulator_value=ACC0, eps=EPS), capacity_hint=0))
    ceil = Ceiling(dim)
    buf = np.empty((B, dim), np.float32)
    for b in range(WARM):
        table.lookup_host(keys[b], out=buf)
        table.apply_gradients_host(keys[b], gs[b % len(gs)])
        ceil.lookup(rk[b])
        ceil.apply(rk[b], gs[b % len(gs)])
    warm_rows = len(table)
    reps = []
    for rep in range(REPS):
        t = dict(ours_lookup=0.0, ours_apply=0.0, np_lookup=0.0, np_apply=0.0)
        for j in range(TIMED):
            b = WARM + rep * TIMED + j
            g = gs[b % len(gs)]
            t0 = time.perf_counter()
            table.lookup_host(keys[b], out=buf)
            t1 = time.perf_counter()
            table.apply_gradients_host(keys[b], g)
            t2 = time.perf_counter()
            ceil.lookup(rk[b])
            t3 = time.perf_counter()
            ceil.apply(rk[b], g)
            t4 = time.perf_counter()
            t["ours_lookup"] += t1 - t0
            t["ours_apply"] += t2 - t1
            t["np_lookup"] += t3 - t2
            t["np_apply"] += t4 - t3
        reps.append({k: TIMED * B / v for k, v in t.items()})
    st = table.stats()
    out = dict(dim=dim, threads=int(_native.engine().parallelism()), warm_rows=warm_rows,
               end_rows=len(table), overhead=st["overhead_bytes_per_row"], reps=reps)
    for op in ("lookup", "apply"):
        out[op] = statistics.median(r[f"ours_{op}"] for r in reps)
        out[f"np_{op}"] = statistics.median(r[f"np_{op}"] for r in reps)
        out[f"{op}_ratio"] = statistics.median(r[f"ours_{op}"] / r[f"np_{op}"] for r in reps)
    table.close()
    return out


def child(dims) -> None:
    rk = ranks()
    for dim in dims:
        print("W1RESULT " + json.dumps(measure(dim, rk)), flush=True)


def run(dims=(16, 64), threads=(1, 0), out=print) -> list:
    """Each thread count (0: all cores) in its own process; prints the table."""
    results = []
    for th in threads:
        env = dict(os.environ)
        if th:
            env["MONOLITH_NUM_THREADS"] = str(th)
        else:
            env.pop("MONOLITH_NUM_THREADS", None)
        cmd = [sys.executable, "-m", "experiments.table_bench.main", "--w1-child",
               "--dims", *map(str, dims)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        for line in p.stdout.splitlines():
            if line.startswith("W1RESULT "):
                results.append(json.loads(line[len("W1RESULT "):]))
    m = 1e6
    out(f"W1: {B:,} ids/batch, Zipf({A}) over {N:,} keys, table from empty, Adagrad lr={LR}; "
        f"{WARM} warm + {REPS}x{TIMED} timed batches, interleaved with the numpy ceiling (M ids/s)")
    out(f"  {'dim':>3} {'thr':>3} {'rows':>11} {'lookup':>7} {'numpy':>7} {'ratio':>6}"
        f" {'apply':>7} {'numpy':>7} {'ratio':>6} {'ovh B/row':>9}")
    for r in results:
        out(f"  {r['dim']:>3} {r['threads']:>3} {r['warm_rows'] / m:>5.2f}-{r['end_rows'] / m:.2f}M"
            f" {r['lookup'] / m:>7.2f} {r['np_lookup'] / m:>7.2f} {r['lookup_ratio']:>6.2f}"
            f" {r['apply'] / m:>7.2f} {r['np_apply'] / m:>7.2f} {r['apply_ratio']:>6.2f}"
            f" {r['overhead']:>9.1f}")
    return results
