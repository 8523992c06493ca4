"""Table throughput (workload W1): lookup and Adagrad apply of Zipf batches.

Our table (host call and jitted FFI call) beside, in the same run:
  numpy  the ceiling: np.take of the same rows from a preallocated array by
         precomputed indices (no hashing); apply = sort + np.add.reduceat +
         Adagrad on the unique rows, single-threaded
  dict   a Python dict of numpy rows
Ratios travel between machines better than absolute ids/s.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from monolith_jax.sparse import Adagrad, EmbeddingTable, Keys, Zeros
from monolith_jax.sparse import TableConfig

LR = 0.05
INIT_ACC = 0.1
EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    universe: int = 10_000_000     # distinct possible keys
    zipf: float = 1.05             # exponent over key ranks
    batch: int = 65_536            # ids per batch
    min_resident: int = 1_800_000  # rows in the table before timing (as TARGETS.md)
    batches: int = 25              # timed batches per measurement
    dict_batches: int = 2          # the dict baseline is slow
    dims: tuple = (16, 64)
    seed: int = 0


def zipf_ranks(rng, n, a, universe) -> np.ndarray:
    """n ranks in [0, universe) ~ Zipf(a); draws past the universe are redrawn."""
    out = np.empty(0, np.int64)
    while out.size < n:
        z = rng.zipf(a, size=2 * (n - out.size))
        out = np.concatenate([out, z[z <= universe][: n - out.size] - 1])
    return out


def universe_keys(universe: int) -> np.ndarray:
    """Sparse 64-bit keys for ranks 0..universe-1: splitmix64's finalizer, a
    bijection, so the keys are distinct and spread over all 64 bits."""
    x = np.arange(universe, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _median_rate(times, n) -> float:
    return n / statistics.median(times)


def _numpy_apply(values, acc, idx, grads):
    order = np.argsort(idx, kind="stable")
    s = idx[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    gsum = np.add.reduceat(grads[order], starts, axis=0)
    u = s[starts]
    a = acc[u] + gsum * gsum
    acc[u] = a
    values[u] -= LR * gsum / np.sqrt(a + EPS)


def _dict_lookup(d, keys, dim):
    out = []
    for k in keys.tolist():
        row = d.get(k)
        if row is None:
            row = d[k] = [np.zeros(dim, np.float32), np.full(dim, INIT_ACC, np.float32)]
        out.append(row[0])
    return np.stack(out)


def _dict_apply(d, keys, grads, dim):
    sums: dict = {}
    for k, g in zip(keys.tolist(), grads):
        if k in sums:
            sums[k] += g
        else:
            sums[k] = g.copy()
    for k, g in sums.items():
        row = d.get(k)
        if row is None:
            row = d[k] = [np.zeros(dim, np.float32), np.full(dim, INIT_ACC, np.float32)]
        row[1] += g * g
        row[0] -= LR * g / np.sqrt(row[1] + EPS)


def run(cfg: BenchConfig, out=print) -> list[dict]:
    rng = np.random.default_rng(cfg.seed)
    keys_of = universe_keys(cfg.universe)
    # Warm-up ranks until min_resident distinct, then the timed batches.
    warm = []
    distinct = 0
    while distinct < cfg.min_resident:
        warm.append(zipf_ranks(rng, 1 << 20, cfg.zipf, cfg.universe))
        if len(warm) % 4 == 0 or distinct == 0:
            distinct = np.unique(np.concatenate(warm)).size
            if distinct >= cfg.universe * 0.9:
                break
    warm_ranks = np.unique(np.concatenate(warm))
    # Each system gets its own fresh batches from the same stream, so every
    # table measurement pays for the new ids its batches bring, as in training.
    timed = [zipf_ranks(rng, cfg.batch, cfg.zipf, cfg.universe) for _ in range(cfg.batches)]
    timed_jit = [zipf_ranks(rng, cfg.batch, cfg.zipf, cfg.universe) for _ in range(cfg.batches)]
    all_ranks = np.unique(np.concatenate([warm_ranks] + timed))
    # Precomputed numpy indices: the ceiling has no hashing at all.
    timed_idx = [np.searchsorted(all_ranks, r) for r in timed]
    timed_keys = [keys_of[r] for r in timed]
    jit_keys = [keys_of[r] for r in timed_jit]
    grad_rng = np.random.default_rng(cfg.seed + 3)

    results = []
    out(f"W1: {cfg.batch:,} ids/batch, Zipf({cfg.zipf}) over {cfg.universe:,} keys, "
        f"Adagrad lr={LR}; {jax.devices()[0].platform} backend")
    for dim in cfg.dims:
        table = EmbeddingTable(TableConfig(
            "bench", dim, initializer=Zeros(),
            optimizer=Adagrad(LR, initial_accumulator_value=INIT_ACC, eps=EPS),
            capacity_hint=0))
        for i in range(0, warm_ranks.size, 1 << 20):
            table.lookup_host(keys_of[warm_ranks[i:i + (1 << 20)]])
        resident = len(table)
        grads = [grad_rng.standard_normal((cfg.batch, dim), dtype=np.float32) * 0.01 for _ in range(cfg.batches)]

        # Our table from the host (numpy in, numpy out) and inside jit (XLA
        # FFI, keys as uint32 words), and the numpy ceiling, interleaved batch
        # by batch so that the machine's noise falls on all three alike.
        lookup_jit = jax.jit(lambda w: table.lookup(Keys(w)))
        apply_jit = jax.jit(lambda w, g: table.apply_gradients(Keys(w), g))
        words = [jax.device_put(Keys.from_ids(k).words) for k in jit_keys]
        jgrads = [jax.device_put(g) for g in grads]
        warm_words = jax.device_put(Keys.from_ids(keys_of[timed[0]]).words)
        lookup_jit(warm_words).block_until_ready()  # compile on ids already resident
        apply_jit(warm_words, jgrads[0]).block_until_ready()
        values = np.zeros((all_ranks.size, dim), np.float32)
        acc = np.full((all_ranks.size, dim), INIT_ACC, np.float32)
        t_lookup, t_apply, j_lookup, j_apply, n_lookup, n_apply = [], [], [], [], [], []
        # Host calls write into reused buffers, as a training loop would: the
        # figures are the table's and numpy's, not the allocator's page faults.
        out_table = np.empty((cfg.batch, dim), np.float32)
        out_numpy = np.empty((cfg.batch, dim), np.float32)
        for k, g, w, jg, idx in zip(timed_keys, grads, words, jgrads, timed_idx):
            t0 = time.perf_counter()
            table.lookup_host(k, out=out_table)
            t1 = time.perf_counter()
            table.apply_gradients_host(k, g)
            t2 = time.perf_counter()
            lookup_jit(w).block_until_ready()
            t3 = time.perf_counter()
            apply_jit(w, jg).block_until_ready()
            t4 = time.perf_counter()
            np.take(values, idx, axis=0, out=out_numpy)
            t5 = time.perf_counter()
            _numpy_apply(values, acc, idx, g)
            t6 = time.perf_counter()
            t_lookup.append(t1 - t0)
            t_apply.append(t2 - t1)
            j_lookup.append(t3 - t2)
            j_apply.append(t4 - t3)
            n_lookup.append(t5 - t4)
            n_apply.append(t6 - t5)
        stats = table.stats()
        del values, acc

        # Python dict of numpy rows (holds only the rows the timed batches touch).
        d: dict = {}
        d_lookup, d_apply = [], []
        for k, g in list(zip(timed_keys, grads))[: cfg.dict_batches]:
            t0 = time.perf_counter()
            _dict_lookup(d, k, dim)
            t1 = time.perf_counter()
            _dict_apply(d, k, g, dim)
            t2 = time.perf_counter()
            d_lookup.append(t1 - t0)
            d_apply.append(t2 - t1)

        b = cfg.batch
        r = dict(
            dim=dim, resident=resident,
            lookup_host=_median_rate(t_lookup, b), lookup_jit=_median_rate(j_lookup, b),
            lookup_numpy=_median_rate(n_lookup, b), lookup_dict=_median_rate(d_lookup, b),
            apply_host=_median_rate(t_apply, b), apply_jit=_median_rate(j_apply, b),
            apply_numpy=_median_rate(n_apply, b), apply_dict=_median_rate(d_apply, b),
            bytes_per_row=stats["bytes_per_row"],
            overhead_per_row=stats["overhead_bytes_per_row"],
            payload_per_row=(stats["bytes_values"] + stats["bytes_slots"]) / stats["rows"],
        )
        results.append(r)
        table.close()
        _print_dim(r, out)
    return results


def _print_dim(r: dict, out) -> None:
    m = 1e6
    out(f"\ndim {r['dim']}: {r['resident']:,} resident rows before timing")
    out(f"  {'op':<7}{'table host':>12}{'table jit':>12}{'numpy':>10}{'dict':>9}"
        f"{'host/numpy':>12}{'jit/numpy':>11}{'host/dict':>11}   (M ids/s)")
    for op in ("lookup", "apply"):
        h, j, n, d = (r[f"{op}_{k}"] for k in ("host", "jit", "numpy", "dict"))
        out(f"  {op:<7}{h / m:>12.2f}{j / m:>12.2f}{n / m:>10.2f}{d / m:>9.2f}"
            f"{h / n:>12.2f}{j / n:>11.2f}{h / d:>11.1f}")
    out(f"  memory: {r['bytes_per_row']:.1f} bytes/row = {r['payload_per_row']:.0f} values+slots "
        f"+ {r['overhead_per_row']:.1f} overhead (target <= 24)")
