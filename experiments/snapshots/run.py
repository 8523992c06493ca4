"""The snapshot experiment's parts.

size_time(): snapshot and restore time and size of one table (dim 16,
Adagrad: values and one slot per dim) for 10^5..10^7 rows, through
`monolith_jax.snapshot.Snapshots` (Orbax, CRC-32 per array), beside the
floor of this disk: the same arrays written and read back with plain
`np.save` / `np.load`, no checks. Medians of rounds.

throughput(): what snapshots every 10 s cost the online training of the
MovieLens replay, full ones against incremental ones (deltas of the rows
changed), against no snapshots; rounds interleaved, medians.

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
    settle = _T.settle
    _metrics = None
    _in_flight = None  # no step of its own runs

    def __init__(self, table, step_count: int = 0):
        self.params, self.opt_state = {"w": np.zeros(4, np.float32)}, ()
        self.tables, self.step_count, self.examples = {"t": table}, step_count, 0

def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _median(xs):
    return float(np.median(xs))


def _trained(table, start: int, stop: int):
    """`table` with rows start+1 .. stop created and trained once (random
    values: no easy compression)."""
    keys = np.arange(start + 1, stop + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    rng = np.random.default_rng(start)
    for s in range(0, keys.size, 1 << 20):
        k = keys[s:s + (1 << 20)]
        table.apply_gradients_host(k, rng.normal(0, 1, (k.size, table.dim)).astype(np.float32), step=1)
    return table


def _growing(config, rows: int, folder: str, keep: bool) -> float:
    """A table growing by a tenth between snapshots: the training thread's
    time in its third snapshot (the first whose memory could be prepared
    for the growth seen between the two before)."""
    import monolith_jax as mj
    from monolith_jax.snapshot import Snapshots

    table = _trained(mj.EmbeddingTable(config()), 0, rows)
    snaps = Snapshots(folder, every_s=None, keep=1, keep_dump_memory=keep)
    for step in (1, 2, 3):
        if step > 1:
            _trained(table, len(table), len(table) + rows // 10)
        t0 = time.perf_counter()
        snaps.save(step, TableOwner(table, step_count=step), {})
        blocked = time.perf_counter() - t0
        snaps.wait()
    snaps.close()
    return blocked


def size_time(rows_list=(10**5, 10**6, 10**7), dim: int = 16, rounds: int = 3, out=print,
              workdir: str | None = None, restart_wait_s: float = 5.0) -> list:
    """Per row count, `rounds` snapshots of the same table into one folder
    (the first copies into fresh memory, later ones into the last dump's),
    `rounds` restores into fresh tables, and as many np.save / np.load +
    load rounds: medians, and the first snapshot's own figures. A growing
    table's third snapshot (_growing), both ways below. Then a
    restarted trainer's first snapshot, `restart_wait_s` after its restore:
    with the dump's memory faulted in meanwhile (keep_dump_memory, the
    default) and without (fresh pages, as every first snapshot had)."""
    import monolith_jax as mj
    from monolith_jax.snapshot import Snapshots

    def config():
        return mj.TableConfig("t", dim, mj.Normal(0, 0.01), mj.Adagrad(0.05))

    results = []
    for rows in rows_list:
        folder = tempfile.mkdtemp(prefix="monolith-snap-", dir=workdir)
        try:
            table = _trained(mj.EmbeddingTable(config()), 0, rows)
            owner = TableOwner(table, step_count=1)
            snaps = Snapshots(os.path.join(folder, "snap"), every_s=None, keep=1)
            blocking, total = [], []
            for r in range(rounds):
                owner.step_count = r + 1
                t0 = time.perf_counter()
                snaps.save(r + 1, owner, {})
                blocking.append(time.perf_counter() - t0)
                snaps.wait()
                total.append(time.perf_counter() - t0)
            snaps.close()
            size = _du(os.path.join(folder, "snap"))
            restore = []
            for r in range(rounds):
                fresh = mj.EmbeddingTable(config())
                t0 = time.perf_counter()
                # No snapshot follows: no dump memory faulted in after it.
                reader = Snapshots(os.path.join(folder, "snap"), keep_dump_memory=False)
                reader.restore(TableOwner(fresh))
                restore.append(time.perf_counter() - t0)
                reader.close()
                assert len(fresh) == rows
                del fresh
            restart = {}
            for keep in (True, False):
                fresh, step = mj.EmbeddingTable(config()), rounds + 1 + int(keep)
                snaps = Snapshots(os.path.join(folder, "snap"), every_s=None, keep=1, keep_dump_memory=keep)
                snaps.restore(TableOwner(fresh))
                time.sleep(restart_wait_s)  # training on, meanwhile
                t0 = time.perf_counter()
                snaps.save(step, TableOwner(fresh, step_count=step), {})
                restart[keep] = time.perf_counter() - t0
                snaps.close()
                del fresh
            # The floor: the same arrays with np.save / np.load, no checks, no table handler.
            # And the durable floor: the dump's bytes into fresh files, each fsynced
            # (as the snapshot's files are), the last round's removed first.
            np_save, np_load, synced = [], [], []
            for r in range(rounds):
                t0 = time.perf_counter()
                dump = table.dump()
                for name, a in dump.items():
                    np.save(os.path.join(folder, f"{name}.npy"), np.asarray(a))
                np_save.append(time.perf_counter() - t0)
                shutil.rmtree(os.path.join(folder, "synced"), ignore_errors=True)
                os.makedirs(os.path.join(folder, "synced"))
                t0 = time.perf_counter()
                for name, a in dump.items():
                    with open(os.path.join(folder, "synced", name), "wb") as f:
                        f.write(np.ascontiguousarray(a).data)
                        os.fsync(f.fileno())
                synced.append(time.perf_counter() - t0)
                np_size = sum(os.path.getsize(os.path.join(folder, f"{n}.npy")) for n in dump)
                del dump
                t0 = time.perf_counter()
                loaded = {n: np.load(os.path.join(folder, f"{n}.npy"), allow_pickle=False) for n in
                          ("keys", "values", "slots", "last_update", "update_count", "touched", "filter", "clock")}
                loaded["clock"] = int(loaded["clock"])
                other = mj.EmbeddingTable(config())
                other.load(loaded)
                np_load.append(time.perf_counter() - t0)
                del loaded, other
            del table
            grow = {keep: _growing(config, rows, os.path.join(folder, f"grow-{keep}"), keep) for keep in (True, False)}
            r = {"rows": rows, "dim": dim, "rounds": rounds, "save_blocking_s": _median(blocking),
                 "save_s": _median(total), "restore_s": _median(restore), "first_save_blocking_s": blocking[0],
                 "first_save_s": total[0], "bytes": size, "np_save_s": _median(np_save),
                 "np_load_s": _median(np_load), "np_bytes": np_size, "fsynced_write_s": _median(synced),
                 "restarted_first_save_blocking_s": restart[True],
                 "restarted_first_save_blocking_s_fresh_pages": restart[False],
                 "growing_third_save_blocking_s": grow[True], "growing_third_save_blocking_s_fresh_pages": grow[False]}
            results.append(r)
            out(f"  {rows:>10,} rows: snapshot {r['save_s']:6.2f} s (training thread blocked "
                f"{r['save_blocking_s']:5.2f} s; first {total[0]:5.2f} s, {blocking[0]:4.2f} s), restore "
                f"{r['restore_s']:6.2f} s, {size / 2**20:8.1f} MiB  |  np.save {r['np_save_s']:6.2f} s, "
                f"np.load+load {r['np_load_s']:6.2f} s, {np_size / 2**20:8.1f} MiB; fresh files + fsync "
                f"{r['fsynced_write_s']:6.2f} s  (medians of {rounds})")
            out(f"  {'':>10}       restored, first snapshot {restart_wait_s:g} s later: training thread blocked "
                f"{restart[True]:5.2f} s (dump memory faulted in meanwhile; into fresh pages: "
                f"{restart[False]:5.2f} s)")
            out(f"  {'':>10}       growing by a tenth between snapshots, the third: training thread blocked "
                f"{grow[True]:5.2f} s (memory prepared after the second's write; into fresh pages: "
                f"{grow[False]:5.2f} s)")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def _replay_batches(ratings, limit, batch: int, seed: int = 0):
    """The MovieLens stream joined as the joiner joins it, decoded into
    (batch, rows, event time ms)."""
    from experiments.online_training.run import joined_examples
    from monolith_jax.examples.movielens import replay as R
    from monolith_jax.stream.messages import ExampleDecoder

    examples = joined_examples(ratings, limit or len(ratings), seed=seed)
    decoder = ExampleDecoder(R.movielens_features())
    batches = []
    for s in range(0, len(examples), batch):
        b, info, bad = decoder.decode(examples[s:s + batch], batch)
        batches.append((b, info["rows"], int(info["event_time_ms"][:info["rows"]].max())))
    return batches


def throughput(ratings, every_s: float = 10.0, full_every: int = 30, rounds: int = 3, passes: int = 4, limit=None,
               batch: int = 1024, seed: int = 0, out=print, workdir: str | None = None) -> dict:
    """Training throughput on the MovieLens replay with no snapshots, with a
    full snapshot every `every_s` seconds, and with incremental ones (every
    `every_s` seconds, a full one every `full_every`): rounds interleaved,
    medians. A run trains `passes` passes over the replay (long enough for
    several snapshots). Each snapshotting run takes its first (full) snapshot before
    the clock starts, so the timed ones are those of a running chain (with
    full_every=30 at 10 s, 29 of every 30 are deltas; the full one costs
    what the "full" line's do)."""
    from monolith_jax.examples.movielens.loop import movielens_trainer
    from monolith_jax.snapshot import Snapshots

    batches = _replay_batches(ratings, limit, batch, seed)
    n = passes * sum(r for _, r, _ in batches[1:])
    out(f"{n:,} examples a run ({passes} passes over {len(batches) - 1:,} batches of {batch} of the joined "
        f"replay); snapshots every {every_s:g} s")

    def run(kind):
        trainer = movielens_trainer(seed, out=lambda *a, **k: None)
        b0, _, t0_ms = batches[0]
        trainer.train_step(b0, stamp=t0_ms // 1000)  # compiled before the clock starts
        folder = tempfile.mkdtemp(prefix="monolith-snap-tp-", dir=workdir)
        snaps = None
        if kind != "none":
            snaps = Snapshots(folder, every_s=every_s, keep=2, full_every=1 if kind == "full" else full_every)
            snaps.save(trainer.step_count, trainer, {"batch": 0})
            snaps.wait()
        try:
            t0 = time.perf_counter()
            before = (snaps.saved, snaps.saved_deltas, snaps.save_seconds) if snaps is not None else (0, 0, 0.0)
            for _ in range(passes):
                for k, (b, rows, t_ms) in enumerate(batches[1:], 1):
                    trainer.train_step(b, stamp=t_ms // 1000)
                    if snaps is not None and snaps.due(trainer.step_count):
                        snaps.save(trainer.step_count, trainer, {"batch": k})
                        snaps.completed()
            if snaps is not None:
                snaps.wait()
            seconds = time.perf_counter() - t0
            after = (snaps.saved, snaps.saved_deltas, snaps.save_seconds) if snaps is not None else (0, 0, 0.0)
        finally:
            if snaps is not None:
                snaps.close()
            shutil.rmtree(folder, ignore_errors=True)
        return {"examples_per_s": n / seconds, "seconds": seconds, "snapshots": after[0] - before[0],
                "deltas": after[1] - before[1], "blocked_s": after[2] - before[2]}

    runs = {"none": [], "full": [], "incremental": []}
    for r in range(rounds):
        for kind in runs:
            runs[kind].append(run(kind))
    res = {"rounds": rounds, "every_s": every_s, "full_every": full_every, "examples": n}
    base = _median([x["examples_per_s"] for x in runs["none"]])
    for kind, xs in runs.items():
        eps = _median([x["examples_per_s"] for x in xs])
        res[kind] = {"examples_per_s": eps, "cost": 1 - eps / base, "snapshots": _median([x["snapshots"] for x in xs]),
                     "deltas": _median([x["deltas"] for x in xs]),
                     "blocked_s": _median([x["blocked_s"] for x in xs]), "runs": xs}
        what = {"none": "no snapshots:         ", "full": f"full every {every_s:g} s:     ",
                "incremental": f"incremental, {every_s:g} s: "}[kind]
        out(f"  {what} {eps:8,.0f} examples/s, cost {100 * res[kind]['cost']:+5.1f}% of throughput; "
            f"{res[kind]['snapshots']:.0f} snapshots ({res[kind]['deltas']:.0f} deltas) a run, training blocked "
            f"{res[kind]['blocked_s']:.2f} s a run  (medians of {rounds})")
    return res


def reliability(ratings, intervals_min=(5, 60, 360, 1440), failures_at=(0.25, 0.5, 0.75), limit=None,
                batch: int = 1024, seed: int = 0, out=print, workdir: str | None = None) -> dict:
    from monolith_jax.metrics import auc
    from monolith_jax.examples.movielens.loop import movielens_trainer
    from monolith_jax.snapshot import Snapshots

    batches = _replay_batches(ratings, limit, batch, seed)
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
                        # Through the folder's one writer: a second one opened
                        # beside it would race its background deletes.
                        snaps.restore(fresh)
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
