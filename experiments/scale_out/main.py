"""Scale-out: sharded lookup+apply throughput with 1, 2 and 4 training PS
shards beside the local table, and what a 10^10-row table would need.

    python -m experiments.scale_out.main            # ~2 min; replaces results/
    python -m experiments.scale_out.main --steps 5 --rounds 2 --batch-ids 4096 --shards 1 2   # seconds, in a run folder

Any run with flags writes to a fresh run folder (runs/scale_out-TIMESTAMP/,
printed), not over the committed results/, unless given --out
(experiments/run_folder.py).
"""

import argparse
import json
import logging
import os

from experiments import run_folder
from experiments.scale_out import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-ids", type=int, default=32_768)
    p.add_argument("--steps", type=int, default=40, help="batches per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds (the figures are their medians)")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4],
                   help="shard counts to measure (1 among them: the estimate uses one shard's rate)")
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ beside this file for the default command, "
                        "else a fresh run folder)")
    args = p.parse_args(argv)
    if 1 not in args.shards:
        p.error("--shards must include 1 (the estimate uses one shard's rate)")
    out_dir = run_folder.output_dir("scale_out", p, args)
    logging.basicConfig(level=logging.WARNING)
    print(f"lookup + apply of {args.steps} batches of {args.batch_ids:,} Zipf ids a round, dim {args.dim}, Adagrad, "
          f"on loopback (shards are processes on this machine), {args.rounds} rounds:")
    r = run.throughput(tuple(args.shards), dim=args.dim, batch_ids=args.batch_ids, steps=args.steps,
                       rounds=args.rounds)
    e = run.estimate(r)
    print(f"\n10^10 rows of dim {e['dim']}: {e['row_bytes']} bytes a row (key, values, Adagrad slots, metadata, "
          f"index) = {e['table_tib']:.1f} TiB -> {e['machines_for_memory']} machines of 128 GiB at 70% for rows; "
          f"at the measured {e['unique_ids_per_s_per_shard_measured']:,.0f} unique ids/s per shard, "
          f"{e['target_unique_ids_per_s']:,.0f} unique ids/s needs {e['shards_for_target']} shards")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"throughput": r, "estimate": e}, f, indent=1)
    print(f"wrote {os.path.join(out_dir, 'results.json')}")
    return r, e


if __name__ == "__main__":
    main()
