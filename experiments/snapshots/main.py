"""Snapshots: their time and size by table rows, and the AUC a parameter-server
failure costs for a few snapshot intervals. Flags only; the work is in run.py.

    python -m experiments.snapshots.main                 # ~10 min; replaces results/
    python -m experiments.snapshots.main --part size --rows 100000 1000000
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
    p.add_argument("--part", choices=["size", "reliability", "both"], default="both")
    p.add_argument("--rows", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    p.add_argument("--intervals", type=float, nargs="+", default=[5, 60, 360, 1440],
                   help="snapshot intervals, minutes of stream time")
    p.add_argument("--limit", type=int, default=None, help="reliability: first N ratings (default: all)")
    p.add_argument("--batch", type=int, default=1024, help="reliability: examples per step")
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
    if args.part in ("size", "both"):
        print("Snapshot (Orbax, CRC-32 per array) and restore of one table, dim 16, Adagrad, beside np.save/np.load:")
        results["size"] = run.size_time(args.rows)
    if args.part in ("size", "both") and args.part == "both":
        print()
    if args.part in ("reliability", "both"):
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
