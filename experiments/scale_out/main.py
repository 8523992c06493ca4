"""Scale-out: sharded lookup+apply throughput with 1, 2 and 4 training PS
shards beside the local table, and what a 10^10-row table would need.

    python -m experiments.scale_out.main            # ~2 min
"""

import argparse
import json
import logging
import os

from experiments.scale_out import run

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-ids", type=int, default=32_768)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"lookup + apply of {args.steps} batches of {args.batch_ids:,} Zipf ids, dim {args.dim}, Adagrad, "
          "on loopback (shards are processes on this machine):")
    r = run.throughput(dim=args.dim, batch_ids=args.batch_ids, steps=args.steps)
    e = run.estimate(r)
    print(f"\n10^10 rows of dim {e['dim']}: {e['row_bytes']} bytes a row (key, values, Adagrad slots, metadata, "
          f"index) = {e['table_tib']:.1f} TiB -> {e['machines_for_memory']} machines of 128 GiB at 70% for rows; "
          f"at the measured {e['unique_ids_per_s_per_shard_measured']:,.0f} unique ids/s per shard, "
          f"{e['target_unique_ids_per_s']:,.0f} unique ids/s needs {e['shards_for_target']} shards")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"throughput": r, "estimate": e}, f, indent=1)
    return r, e


if __name__ == "__main__":
    main()
