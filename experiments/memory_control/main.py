"""Memory control experiment (frequency filter, expiry). Flags only; the
work is in run.py.

    python -m experiments.memory_control.main                 # both data sets (~2 min)
    python -m experiments.memory_control.main --data zipf --batches 20
"""

import argparse

from experiments.memory_control import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["movielens", "zipf", "both"], default="both")
    p.add_argument("--batches", type=int, default=300, help="zipf: batches of 65,536 ids")
    p.add_argument("--limit", type=int, default=0, help="movielens: first N ratings only (0: all)")
    args = p.parse_args(argv)
    out = {}
    if args.data in ("movielens", "both"):
        from monolith_jax.examples.movielens.data import load_movielens_1m
        ratings = load_movielens_1m()
        if args.limit:
            import dataclasses
            ratings = dataclasses.replace(ratings, **{f: getattr(ratings, f)[: args.limit] for f in
                                          ("user", "item", "rating", "timestamp", "user_key", "item_key")})
        print(f"MovieLens-1M: {len(ratings):,} ratings in time order; user and movie tables, dim 16, "
              f"Adagrad; prequential AUC over the last 80%")
        print(run.header(with_auc=True))
        out["movielens"] = run.run_movielens(ratings)
    if args.data in ("zipf", "both"):
        stream = run.zipf_stream(args.batches, 65_536)
        print(f"\nZipf(1.05) over 10^7 keys: {args.batches} batches of 65,536 ids "
              f"({args.batches * 65_536:,} sightings); dim 16, Adagrad; 4 MiB filter")
        print(run.header(with_auc=False))
        out["zipf"] = run.run_zipf(stream)
    return out


if __name__ == "__main__":
    main()
