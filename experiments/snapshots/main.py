"""Snapshots: their time and size by table rows, what snapshots every 10 s
(full, or incremental) cost online training, and the AUC a parameter-server
failure costs for a few snapshot intervals. Flags only; the work is in run.py.

    python -m experiments.snapshots.main                 # ~25 min; replaces results/
    python -m experiments.snapshots.main --part size --rows 100000 1000000
    python -m experiments.snapshots.main --part throughput --limit 300000
    python -m experiments.snapshots.main --part reliability --limit 300000

Any run with flags writes to a fresh run folder (runs/snapshots-TIMESTAMP/,
printed), not over the committed results/, unless given --out
(experiments/run_folder.py). A part run alone into a folder that has a
results.json replaces only its own part there: a full-size part given
--out experiments/snapshots/results refreshes that part of the committed
results.
"""

import argparse
import json
import logging
import os

from experiments import run_folder
from experiments.snapshots import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["size", "throughput", "reliability", "all"], default="all")
    p.add_argument("--rows", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    p.add_argument("--rounds", type=int, default=3, help="size and throughput: rounds, medians reported")
    p.add_argument("--restart-wait-s", type=float, default=5.0,
                   help="size: seconds between a restore and that trainer's first snapshot")
    p.add_argument("--every-s", type=float, default=10.0, help="throughput: seconds between snapshots")
    p.add_argument("--passes", type=int, default=4, help="throughput: passes over the replay a run")
    p.add_argument("--full-every", type=int, default=30,
                   help="throughput: incremental snapshots take a full one every Nth, deltas between")
    p.add_argument("--intervals", type=float, nargs="+", default=[5, 60, 360, 1440],
                   help="snapshot intervals, minutes of stream time")
    p.add_argument("--limit", type=int, default=None,
                   help="throughput, reliability: first N ratings (default: all)")
    p.add_argument("--batch", type=int, default=1024, help="throughput, reliability: examples per step")
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ beside this file for the default command, "
                        "else a fresh run folder)")
    args = p.parse_args(argv)
    path = os.path.join(run_folder.output_dir("snapshots", p, args, full_size_flags=("part",)), "results.json")
    logging.basicConfig(level=logging.WARNING)
    results = {}
    if os.path.exists(path):  # a part run alone replaces only its own figures
        with open(path) as f:
            results = json.load(f)
    if args.part in ("size", "all"):
        print("Snapshot (Orbax, CRC-32 per array) and restore of one table, dim 16, Adagrad, beside np.save/np.load:")
        results["size"] = run.size_time(args.rows, rounds=args.rounds, restart_wait_s=args.restart_wait_s)
    if args.part in ("throughput", "all"):
        from monolith_jax.examples.movielens.data import load_movielens_1m

        if args.part == "all":
            print()
        print("Online training of the MovieLens-1M replay with snapshots every few seconds, against none:")
        results["throughput"] = run.throughput(load_movielens_1m(), every_s=args.every_s, full_every=args.full_every,
                                               rounds=args.rounds, passes=args.passes, limit=args.limit,
                                               batch=args.batch)
    if args.part in ("reliability", "all"):
        if args.part == "all":
            print()
        from monolith_jax.examples.movielens.data import load_movielens_1m

        print("Parameter-server failures on the MovieLens-1M stream, restarted from the newest snapshot:")
        results["reliability"] = run.reliability(load_movielens_1m(), [float(i) for i in args.intervals],
                                                 limit=args.limit, batch=args.batch)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
