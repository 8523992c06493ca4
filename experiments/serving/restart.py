"""Serving PS restart by deltas: bytes sent after a restart from a snapshot, against a full copy, at 10^6 rows.

    python -m experiments.serving.restart [--rows 1000000] [--changed 10000] [--rounds 3]   # ~3 min

A trainer's table (the MovieLens DeepFM's, dim 9) holds `--rows` rows.
Every round: `--changed` rows are updated over 10 steps, the trainer
snapshots, half as many rows are updated (5 steps) and pushed, the serving
PS process stops, half as many again are updated (5 steps) while it is down, and it restarts with
`--snapshot-dir` on the trainer's folder. The trainer's `SyncPusher`
(given its snapshots) then sends only the rows changed since the snapshot;
the rows of the snapshot's last step go too (their stamp is its clock);
the baseline, in the same round: the same serving PS restarted without a
snapshot, which gets a full copy. Each time the served rows are checked
against the trainer's (every changed row and a sample of the others).
Bytes are exact; seconds are medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np

from experiments.serving import run


def check_equal(port: int, table, keys: np.ndarray) -> None:
    import grpc

    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.rpc import serving_pb2_grpc as pbg

    want, found_here = table.find(keys)
    assert found_here.all()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = pbg.ServingPSStub(ch).Lookup(pb.LookupRequest(table="ids", keys=keys.tobytes()), timeout=60)
    got = np.frombuffer(r.values, np.float32).reshape(keys.size, -1)
    if not np.frombuffer(r.found, np.uint8).all() or not np.array_equal(got, want):
        raise SystemExit("the restarted serving PS does not hold the trainer's rows")


def measure(rows: int = 1_000_000, changed: int = 10_000, rounds: int = 3, out=print) -> dict:
    from monolith_jax.examples.movielens.loop import movielens_trainer
    from monolith_jax.online.demo import free_port
    from monolith_jax.serving.sync import SyncPusher
    from monolith_jax.snapshot import Snapshots

    rng = np.random.default_rng(0)
    trainer = movielens_trainer(0, out=lambda *a, **k: None)
    table = trainer.tables["ids"]
    keys = np.unique(rng.integers(1, 2**63, int(rows * 1.01), dtype=np.uint64))[:rows]
    rng.shuffle(keys)
    for s in range(0, keys.size, 100_000):
        table.lookup_host(keys[s:s + 100_000])
    if len(table) != rows:
        raise SystemExit(f"the table holds {len(table):,} rows, not {rows:,}")
    dim = table.config.dim
    work = tempfile.mkdtemp(prefix="monolith-restart-")
    snaps = Snapshots(f"{work}/snaps", every_s=None, keep=2)
    port = free_port()
    cmd = [sys.executable, "-m", "monolith_jax.serving.serving_ps", "--port", str(port), "--table", f"ids:{dim}"]
    stamp = 0

    def update(n, steps):
        """n rows updated over `steps` training steps (one stamp each)."""
        nonlocal stamp
        picked = rng.choice(keys, n, replace=False)
        for part in np.array_split(picked, steps):
            stamp += 1
            table.apply_gradients_host(part, rng.normal(0, 0.01, (part.size, dim)).astype(np.float32), step=stamp)
        return picked

    def restart(snapshot: bool):
        t0 = time.perf_counter()
        proc, _ = run.start(cmd + (["--snapshot-dir", f"{work}/snaps"] if snapshot else []), "listening on",
                            timeout_s=300)
        return proc, time.perf_counter() - t0

    def push(pusher):
        before = dict(pusher.stats)
        t0 = time.perf_counter()
        if not pusher.push_once():
            raise SystemExit("a push to the serving PS failed")
        return {"seconds": time.perf_counter() - t0, "bytes": pusher.stats["bytes"] - before["bytes"],
                "rows": pusher.stats["rows"] - before["rows"],
                "full": pusher.stats["full_copies"] > before["full_copies"],
                "since_snapshot": pusher.stats["since_snapshot"] > before["since_snapshot"]}

    ps, _ = restart(False)
    pusher = SyncPusher(trainer.tables, f"127.0.0.1:{port}", "restart-bench", interval_s=3600,
                        timeout_s=120)
    per = []
    try:
        first = push(pusher)
        out(f"first contact: full copy of {first['rows']:,} rows, {first['bytes']:,} bytes")
        for r in range(rounds):
            a = update(changed, 10)
            if not snaps.save(r + 1, trainer, {"offsets": {}}) or snaps.wait() is None:
                raise SystemExit("the snapshot was not saved")
            b = update(changed // 2, 5)
            push(pusher)                      # a delta before the restart
            run.stop(ps)
            c = update(changed // 2, 5)       # while the serving PS is down
            ps, load_s = restart(True)
            delta = push(pusher)
            if not delta["since_snapshot"] or delta["full"]:
                raise SystemExit(f"the restarted serving PS got {delta}, not the rows since its snapshot")
            sample = np.unique(np.concatenate([a, b, c, rng.choice(keys, 10_000, replace=False)]))
            check_equal(port, table, sample)
            run.stop(ps)
            ps, bare_s = restart(False)       # the baseline: no snapshot, a full copy
            full = push(pusher)
            if not full["full"]:
                raise SystemExit(f"the serving PS without a snapshot got {full}, not a full copy")
            check_equal(port, table, sample)
            per.append({"since_snapshot": delta, "full_copy": full, "start_with_snapshot_s": load_s,
                        "start_bare_s": bare_s})
            out(f"  round {r + 1}: since snapshot {delta['rows']:,} rows {delta['bytes']:,} bytes "
                f"{delta['seconds']:.2f} s (start {load_s:.1f} s); full copy {full['rows']:,} rows "
                f"{full['bytes']:,} bytes {full['seconds']:.2f} s (start {bare_s:.1f} s)")
    finally:
        pusher.stop(final_push=False)
        run.stop(ps)
        snaps.close()
    med = {k: float(np.median([p[a][b] if b else p[a] for p in per]))
           for k, (a, b) in {"since_bytes": ("since_snapshot", "bytes"), "since_rows": ("since_snapshot", "rows"),
                             "since_s": ("since_snapshot", "seconds"), "full_bytes": ("full_copy", "bytes"),
                             "full_rows": ("full_copy", "rows"), "full_s": ("full_copy", "seconds"),
                             "start_snapshot_s": ("start_with_snapshot_s", None),
                             "start_bare_s": ("start_bare_s", None)}.items()}
    out(f"restart at {rows:,} rows; {changed:,} rows updated in 10 steps before the snapshot, "
        f"{changed // 2:,} + {changed // 2:,} in 5 + 5 after it; medians of {rounds} rounds:")
    out(f"  full copy (no snapshot, today):     {med['full_rows']:>11,.0f} rows {med['full_bytes']:>13,.0f} bytes "
        f"push {med['full_s']:.2f} s, start {med['start_bare_s']:.1f} s")
    out(f"  since the snapshot (--snapshot-dir): {med['since_rows']:>10,.0f} rows {med['since_bytes']:>13,.0f} bytes "
        f"push {med['since_s']:.2f} s, start {med['start_snapshot_s']:.1f} s (loads it)")
    out(f"  bytes sent: {med['since_bytes'] / med['full_bytes']:.2%} of a full copy "
        f"({med['full_bytes'] / med['since_bytes']:.0f}x fewer)")
    return {"rows": rows, "changed": changed, "rounds": per, "median": med}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--changed", type=int, default=10_000, help="rows updated before the snapshot (half as many "
                                                                 "after it, twice)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    r = measure(args.rows, args.changed, args.rounds)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
