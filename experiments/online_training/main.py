"""Online training from Kafka on MovieLens-1M. Flags only; the work is in run.py.

    python -m experiments.online_training.main               # both parts (~5 min)
    python -m experiments.online_training.main --part throughput
    python -m experiments.online_training.main --part stream --limit 200000
"""

import argparse
import json
import logging
import os

from experiments.online_training import run

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["throughput", "stream", "both"], default="both")
    p.add_argument("--limit", type=int, default=None, help="stream: first N ratings only (default: all)")
    p.add_argument("--examples", type=int, default=60_000, help="throughput: examples per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bootstrap", default=None, help="a Kafka cluster to use instead of the embedded one")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from monolith_jax.examples.movielens.data import load_movielens_1m
    ratings = load_movielens_1m()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    if args.part in ("throughput", "both"):
        print(f"Trainer input, DeepFM (dim 8, MLP 128-64), batch 1024, {args.examples:,} joined MovieLens "
              f"examples x 3 passes per round, from the examples topic vs from a Parquet file:")
        t = run.throughput(ratings, args.examples, rounds=args.rounds)
        print(f"median: kafka {t['median']['kafka']:,.0f} ex/s, file {t['median']['file']:,.0f} ex/s, "
              f"median kafka/file ratio {t['ratio']:.2f} (target >= 0.8)")
        results["throughput"] = t
    if args.part in ("stream", "both"):
        print("\nStream: MovieLens-1M replay -> joiner process -> online DeepFM trainer (embedded Kafka):")
        s = run.stream(ratings, args.limit, bootstrap=args.bootstrap)
        j = s["joined"]
        print(f"replayed {s['replayed']['features']:,} feature and {s['replayed']['actions']:,} action messages; "
              f"joined {j['positives']:,} positives and {j['negatives']:,} negatives "
              f"({j['negatives_sampled_out']:,} sampled out at rate 0.5), {j['late_actions']} late, "
              f"{j['dead_letters']} dead letters")
        print(f"trained {s['examples']:,} examples at {s['examples_per_s']:,.0f} ex/s end to end; "
              f"wall {s['wall_s']:.0f} s")
        print("AUC by tenth of the stream:")
        print("  online  " + " ".join(f"{a:.3f}" for a in s["online_segments"]))
        print("  frozen  " + " ".join("  -  " if a != a else f"{a:.3f}" for a in s["frozen_segments"]))
        print(f"after the freeze point: online {s['online_after_freeze']:.4f} vs frozen "
              f"{s['frozen_after_freeze']:.4f}; last tenth: online {s['online_last_tenth']:.4f} vs frozen "
              f"{s['frozen_last_tenth']:.4f}")
        run.plot(s, os.path.join(args.out, "prequential_auc.png"))
        results["stream"] = s
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main()
