"""Online training from Kafka on MovieLens-1M. Flags only; the work is in run.py.

    python -m experiments.online_training.main               # both parts (~5 min); replaces results/
    python -m experiments.online_training.main --part throughput
    python -m experiments.online_training.main --part stream --limit 200000

Any run with flags (one part, --limit, fewer rounds, ...) writes to a fresh
run folder (runs/online_training-TIMESTAMP/, printed), not over the
committed results/, unless given --out (experiments/run_folder.py).
"""

import argparse
import json
import logging
import os

from experiments import run_folder
from experiments.online_training import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["throughput", "stream", "both", "replay"], default="both",
                   help="replay: only the cost of writing the replay's messages (not in both)")
    p.add_argument("--limit", type=int, default=None, help="stream: first N ratings only (default: all)")
    p.add_argument("--examples", type=int, default=60_000, help="throughput: examples per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--passes", type=int, default=3, help="throughput: passes over the examples per round")
    p.add_argument("--batch", type=int, default=1024, help="throughput: examples per step")
    p.add_argument("--bootstrap", default=None, help="a Kafka cluster to use instead of the embedded one")
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ beside this file for the default command, "
                        "else a fresh run folder)")
    args = p.parse_args(argv)
    out_dir = str(run_folder.output_dir("online_training", p, args, full_size_flags=("bootstrap",)))
    logging.basicConfig(level=logging.WARNING)
    from monolith_jax.examples.movielens.data import load_movielens_1m
    ratings = load_movielens_1m()
    results = {}
    if args.part == "replay":
        print("Replay messages of MovieLens (200,000 ratings and their impressions), written field by field vs "
              "with protobuf objects per message:")
        e = run.replay_encoding(ratings, rounds=args.rounds)
        m = e["median_us"]
        print(f"median of {args.rounds} rounds: protobuf objects {m['protobuf objects']:.2f} µs/message, field by "
              f"field {m['field by field']:.2f} µs/message, {m['protobuf objects'] / m['field by field']:.2f}x")
        results["replay"] = e
    if args.part in ("throughput", "both"):
        print(f"Trainer input, DeepFM (dim 8, MLP 128-64), batch {args.batch:,}, {args.examples:,} joined MovieLens "
              f"examples x {args.passes} passes per round, from the examples topic vs from a Parquet file:")
        t = run.throughput(ratings, args.examples, batch=args.batch, rounds=args.rounds, passes=args.passes)
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
              f"{j['dead_letters']} dead letters; lost to retention: {j['offsets_lost']} by the joiner, "
              f"{s['trainer_offsets_lost']} by the trainer")
        print(f"trained {s['examples']:,} examples at {s['examples_per_s']:,.0f} ex/s end to end; "
              f"wall {s['wall_s']:.0f} s")
        if "throughput" in results:  # the trainer's own rate from Kafka, measured above in this run
            own = results["throughput"]["median"]["kafka"]
            s["of_trainer_rate"] = s["examples_per_s"] / own
            print(f"end to end / the trainer's own rate from Kafka ({own:,.0f} ex/s, above): "
                  f"{s['of_trainer_rate']:.2f} (target >= 0.5)")
        bare = run.loop_rate(ratings, args.limit, bootstrap=args.bootstrap)
        s["bare_loop"] = bare
        print(f"the same loop, its trainer as the throughput part's (no prequential scores, no frozen copy): "
              f"{bare['examples']:,} examples at {bare['examples_per_s']:,.0f} ex/s"
              + (f", {bare['examples_per_s'] / results['throughput']['median']['kafka']:.2f} of the trainer's own "
                 f"rate" if "throughput" in results else ""))
        print("AUC by tenth of the stream:")
        print("  online  " + " ".join(f"{a:.3f}" for a in s["online_segments"]))
        print("  frozen  " + " ".join("  -  " if a != a else f"{a:.3f}" for a in s["frozen_segments"]))
        print(f"after the freeze point: online {s['online_after_freeze']:.4f} vs frozen "
              f"{s['frozen_after_freeze']:.4f}; last tenth: online {s['online_last_tenth']:.4f} vs frozen "
              f"{s['frozen_last_tenth']:.4f}")
        run.plot(s, os.path.join(out_dir, "prequential_auc.png"))
        results["stream"] = s
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    print(f"wrote {out_dir}/results.json" + (", prequential_auc.png" if "stream" in results else ""))
    return results


if __name__ == "__main__":
    main()
