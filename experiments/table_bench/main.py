"""Table throughput benchmark (W1). Flags only; the work is in bench.py.

    python -m experiments.table_bench.main            # the full run (~2 min)
    python -m experiments.table_bench.main --tiny     # seconds, for tests
    python -m experiments.table_bench.main --w1       # TARGETS.md's W1 exactly, 1 thread and all
"""

import argparse

from experiments.table_bench.bench import BenchConfig, run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small universe and batches")
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--batches", type=int, default=None)
    p.add_argument("--w1", action="store_true",
                   help="W1 as TARGETS.md runs it (table from empty, fixed Zipf stream), ratios to numpy")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                   help="--w1: engine thread counts, one process each (0: all cores)")
    p.add_argument("--w1-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.w1 or args.w1_child:
        from experiments.table_bench import w1
        dims = tuple(args.dims or (16, 64))
        if args.w1_child:
            return w1.child(dims)
        return w1.run(dims, tuple(args.threads))
    cfg = BenchConfig()
    if args.tiny:
        cfg = BenchConfig(universe=20_000, batch=2048, min_resident=5_000, batches=3, dims=(8,))
    if args.dims:
        cfg = BenchConfig(**{**cfg.__dict__, "dims": tuple(args.dims)})
    if args.batches:
        cfg = BenchConfig(**{**cfg.__dict__, "batches": args.batches})
    return run(cfg)


if __name__ == "__main__":
    main()
