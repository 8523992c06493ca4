"""Table throughput benchmark (W1). Flags only; the work is in bench.py.

    python -m experiments.table_bench.main            # the full run (~2 min)
    python -m experiments.table_bench.main --tiny     # seconds, for tests
"""

import argparse

from experiments.table_bench.bench import BenchConfig, run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small universe and batches")
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--batches", type=int, default=None)
    args = p.parse_args(argv)
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
