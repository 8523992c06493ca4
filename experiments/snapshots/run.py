"""The snapshot experiment's parts.

size_time(): snapshot and restore time and size of one table (dim 16,
Adagrad: values and one slot per dim) for 10^5..10^7 rows, through
`monolith_jax.snapshot.Snapshots` (Orbax, CRC-32 per array), beside the
floor of this disk: the same arrays written and read back with plain
`np.save` / `np.load`, no checks.

reliability(): the paper's question. The MovieLens-1M stream, joined as
the joiner joins it, trains a DeepFM online (each batch scored before it is
trained on). The parameter server fails at 25%, 50% and 75% of the stream
and comes back from the newest snapshot, taken every N minutes of stream
(event) time: the updates since that snapshot are lost, the stream goes on.
The prequential AUC after the first failure, against the same run with no
failure, is the price of the snapshot interval.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np




class TableOwner:
    """What a snapshot needs of a trainer, around one table: dense params
    (one small array), optimizer state, the tables, the counters, and the
    Trainer's own state methods (a restore checks and swaps through them)."""

    from monolith_jax.training import Trainer as _T

    state_dict = _T.state_dict
    load_state_dict = _T.load_state_dict
    _metrics = None

    def __init__(self, table, step_count: int = 0):
        self.params, self.opt_state = {"w": np.zeros(4, np.float32)}, ()
        self.tables, self.step_count, self.examples = {"t": table}, step_count, 0

def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def size_time(rows_list=(10**5, 10**6, 10**7), dim: int = 16, out=print, workdir: str | None = None) -> list:
    import jax.numpy as jnp

    import monolith_jax as mj
    from monolith_jax.snapshot import Snapshots

    results = []
    for rows in rows_list:
        folder = tempfile.mkdtemp(prefix="monolith-snap-", dir=workdir)
        try:
            table = mj.EmbeddingTable(mj.TableConfig("t", dim, mj.Normal(0, 0.01), mj.Adagrad(0.05)))
            keys = np.arange(1, rows + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            rng = np.random.default_rng(0)
            for s in range(0, rows, 1 << 20):  # every row created and trained once: no easy compression
                k = keys[s:s + (1 << 20)]
                table.apply_gradients_host(k, rng.normal(0, 1, (k.size, dim)).astype(np.float32), step=1)
            owner = TableOwner(table, step_count=1)
            snaps = Snapshots(os.path.join(folder, "snap"), every_s=None, keep=1)
            t0 = time.perf_counter()
            snaps.save(1, owner, {})
            blocking = time.perf_counter() - t0
            snaps.wait()
            total = time.perf_counter() - t0
            snaps.close()
            size = _du(os.path.join(folder, "snap"))
            fresh = mj.EmbeddingTable(mj.TableConfig("t", dim, mj.Normal(0, 0.01), mj.Adagrad(0.05)))
            target = TableOwner(fresh)
            t0 = time.perf_counter()
            Snapshots(os.path.join(folder, "snap")).restore(target)
            restore = time.perf_counter() - t0
            assert len(fresh) == rows
            # The floor: the same arrays with np.save / np.load, no checks, no table handler.
            t0 = time.perf_counter()
            dump = table.dump()
            for name, a in dump.items():
                np.save(os.path.join(folder, f"{name}.npy"), np.asarray(a))
            np_save = time.perf_counter() - t0
            np_size = sum(os.path.getsize(os.path.join(folder, f"{n}.npy")) for n in dump)
            del dump
            t0 = time.perf_counter()
            loaded = {n: np.load(os.path.join(folder, f"{n}.npy"), allow_pickle=False) for n in
                      ("keys", "values", "slots", "last_update", "update_count", "touched", "filter", "clock")}
            loaded["clock"] = int(loaded["clock"])
            other = mj.EmbeddingTable(mj.TableConfig("t", dim, mj.Normal(0, 0.01), mj.Adagrad(0.05)))
            other.load(loaded)
            np_load = time.perf_counter() - t0
            r = {"rows": rows, "dim": dim, "save_blocking_s": blocking, "save_s": total, "restore_s": restore,
                 "bytes": size, "np_save_s": np_save, "np_load_s": np_load, "np_bytes": np_size}
            results.append(r)
            out(f"  {rows:>10,} rows: snapshot {total:6.2f} s (training thread blocked {blocking:5.2f} s), "
                f"restore {restore:6.2f} s, {size / 2**20:8.1f} MiB  |  np.save {np_save:6.2f} s, "
                f"np.load+load {np_load:6.2f} s, {np_size / 2**20:8.1f} MiB")
            del table, fresh, other, loaded
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def reliability(ratings, intervals_min=(5, 60, 360, 1440), failures_at=(0.25, 0.5, 0.75), limit=None,
                batch: int = 1024, seed: int = 0, out=print, workdir: str | None = None) -> dict:
    from experiments.online_training.run import joined_examples
    from monolith_jax.metrics import auc
    from monolith_jax.examples.movielens import replay as R
    from monolith_jax.examples.movielens.loop import movielens_trainer
    from monolith_jax.stream.messages import ExampleDecoder
    from monolith_jax.snapshot import Snapshots

    examples = joined_examples(ratings, limit or len(ratings), seed=seed)
    decoder = ExampleDecoder(R.movielens_features())
    batches = []
    for s in range(0, len(examples), batch):
        b, info, bad = decoder.decode(examples[s:s + batch], batch)
        batches.append((b, info["rows"], int(info["event_time_ms"][:info["rows"]].max())))
    del examples
    n_batches = len(batches)
    fail_at = sorted({int(f * n_batches) for f in failures_at})
    out(f"{sum(r for _, r, _ in batches):,} joined examples in {n_batches:,} batches; the parameter server "
        f"fails at batches {fail_at}")

    def run(interval_min):
        trainer = movielens_trainer(seed, out=lambda *a, **k: None)
        folder = tempfile.mkdtemp(prefix="monolith-reliability-", dir=workdir)
        snaps = Snapshots(folder, every_s=None, keep=2) if interval_min is not None else None
        labels, scores = [], []
        last_snap_ms, lost = None, 0
        since_snapshot = 0
        try:
            for k, (b, rows, t_ms) in enumerate(batches):
                scores.append(trainer.predict(b)[:rows])
                labels.append(np.asarray(b.labels)[:rows])
                trainer.train_step(b, stamp=t_ms // 1000)
                since_snapshot += rows
                if snaps is not None:
                    if last_snap_ms is None or t_ms - last_snap_ms >= interval_min * 60_000:
                        snaps.save(trainer.step_count, trainer, {"batch": k})
                        snaps.wait()
                        last_snap_ms, since_snapshot = t_ms, 0
                    if k + 1 in fail_at:  # the PS dies; a new one starts from the newest snapshot
                        lost += since_snapshot
                        fresh = movielens_trainer(seed, out=lambda *a, **k: None)
                        Snapshots(folder, every_s=None).restore(fresh)
                        trainer, since_snapshot = fresh, 0
        finally:
            if snaps is not None:
                snaps.close()
            shutil.rmtree(folder, ignore_errors=True)
        y, p = np.concatenate(labels), np.concatenate(scores)
        first = sum(r for _, r, _ in batches[:fail_at[0]])
        return {"auc_after_first_failure": auc(y[first:], p[first:]), "auc_stream": auc(y, p),
                "examples_lost": lost}

    base = run(None)
    out(f"  no failure:           AUC after the first failure point {base['auc_after_first_failure']:.4f}, "
        f"whole stream {base['auc_stream']:.4f}")
    rows = []
    for interval in intervals_min:
        r = run(interval)
        r["interval_min"] = interval
        r["auc_lost"] = base["auc_after_first_failure"] - r["auc_after_first_failure"]
        rows.append(r)
        out(f"  snapshot every {interval:>5} min: AUC after the first failure {r['auc_after_first_failure']:.4f} "
            f"({-r['auc_lost']:+.4f}), whole stream {r['auc_stream']:.4f}; {r['examples_lost']:,} "
            f"examples' updates lost in {len(fail_at)} failures")
    return {"baseline": base, "runs": rows, "failures_at_batch": fail_at, "batches": n_batches}
