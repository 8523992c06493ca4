"""The paper's Algorithm 1 on MovieLens-1M: batch-only against online
training with sync every 1/N of the stream (its Table 2, Figures 9-10).
Flags only; the work is in run.py.

    python -m experiments.paper_online.main            # 5 seeds, N = 10 50 100 500 (~1 min on 2 cores); replaces results/
    python -m experiments.paper_online.main --quick    # 2 seeds on the first 100,000 ratings, in a run folder

Any run with flags writes to a fresh run folder (runs/paper_online-TIMESTAMP/,
printed), not over the committed results/, unless given --out
(experiments/run_folder.py).
"""

import argparse
import dataclasses
import datetime
import json
import os
import time

import numpy as np

from experiments import run_folder
from experiments.paper_online import run


def _date(t) -> str:
    return datetime.datetime.fromtimestamp(int(t), datetime.timezone.utc).strftime("%Y-%m-%d")


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h < 48 else f"{h / 24:.0f} d"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2, help="batch-training epochs over the first part")
    p.add_argument("--batch-share", type=float, default=0.5, help="share of the ratings (earliest) for batch training")
    p.add_argument("--shards", type=int, nargs="+", default=None,
                   help="shard counts N of the online arms (default 10 50 100 500; 10, 50, 100 keep the "
                        "ratios of the paper's 5 h / 1 h / 30 min)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--limit", type=int, default=0, help="first N ratings only (0: all)")
    p.add_argument("--quick", action="store_true",
                   help="at most 2 seeds, the first 100,000 ratings, N = 5 25 50 unless given")
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ beside this file for the default command, "
                        "else a fresh run folder)")
    args = p.parse_args(argv)
    out_dir = str(run_folder.output_dir("paper_online", p, args))
    if args.quick:
        args.seeds, args.limit, args.shards = min(args.seeds, 2), args.limit or 100_000, args.shards or [5, 25, 50]
    args.shards = args.shards or [10, 50, 100, 500]
    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    t_start = time.perf_counter()
    from monolith_jax.examples.movielens.data import load_movielens_1m
    ratings = load_movielens_1m()
    if args.limit:
        ratings = dataclasses.replace(ratings, **{f: getattr(ratings, f)[: args.limit] for f in
                                      ("user", "item", "rating", "timestamp", "user_key", "item_key")})
    data = run.split(ratings, args.batch_share)
    shards = sorted(args.shards)
    times, n_stream = data.stream_times, data.stream.num_rows
    say(f"MovieLens-1M{' (first %s ratings)' % f'{args.limit:,}' if args.limit else ''}: {len(ratings):,} ratings "
        f"from {_date(ratings.timestamp[0])} to {_date(ratings.timestamp[-1])}, label = rating >= 4; "
        f"DeepFM dim {run.DIM}, MLP {'-'.join(map(str, run.HIDDEN))}, batch {args.batch}, {args.seeds} seeds")
    say(f"batch part: the first {args.batch_share:.0%} ({data.train.num_rows:,} ratings, to "
        f"{_date(times[0])}), {args.epochs} shuffled epochs")
    say(f"stream: the other {n_stream:,} ratings, {_date(times[0])} to {_date(times[-1])} "
        f"({(times[-1] - times[0]) / 86400:.0f} days); {data.new_user.mean():.1%} of them by "
        f"{np.unique(ratings.user[-n_stream:][data.new_user]).size:,} users absent from the batch part")
    say("shards cut by number of ratings (stream time per shard: median, shortest, longest; "
        "cut by time instead, the busiest shard would hold the share shown):")
    intervals = {}
    for n in shards:
        edges = run.shard_edges(n_stream, n)
        spans = run.shard_spans(times, edges)
        by_time = run.time_cut_counts(times, n)
        intervals[f"online N={n}"] = f"{n_stream / n:,.0f} ratings ~{_hours(np.median(spans))}"
        say(f"  N = {n:>4}: {n_stream / n:>8,.0f} ratings a shard; median {_hours(np.median(spans)):>7}, "
            f"shortest {_hours(spans.min()):>7}, longest {_hours(spans.max()):>7}  |  by time: "
            f"{_hours((times[-1] - times[0]) / 3600 / n)} each, busiest holds {by_time.max() / n_stream:.0%}, "
            f"{np.mean(by_time < 0.1 * n_stream / n):.0%} of shards hold <10% of an even share")
    say()

    shards_by_n = {n: run.shard_batches(data.stream, run.shard_edges(n_stream, n), args.batch) for n in shards}
    seeds = list(range(args.seeds))
    results = [run.run_seed(data, shards_by_n, args.epochs, args.batch, seed, out=say) for seed in seeds]
    say()
    say("Stream AUC (mean ± std over seeds), as the paper's Table 2:")
    for line in run.table_lines(results, intervals):
        say(line)
    say()
    say("Stream AUC per seed:")
    for line in run.per_seed_lines(results, seeds):
        say(line)
    say()
    tenth_edges = run.shard_edges(n_stream, run.SEGMENTS)
    dates = [_date(times[a]) for a in tenth_edges[:-1]]
    say("AUC by tenth of the stream (mean over seeds); first rating of each tenth:")
    say(f"{'':<14}" + "".join(f"{d[2:]:>9}" for d in dates))
    for a in results[0]["arms"]:
        mean = np.mean([r["arms"][a]["tenths"] for r in results], axis=0)
        say(f"{a:<14}" + "".join(f"{v:>9.4f}" for v in mean))
    say()
    wall = time.perf_counter() - t_start
    t_batch = np.mean([r["batch_train_s"] for r in results])
    online_s = {a: np.mean([r["arms"][a]["seconds"] for r in results]) for a in results[0]["arms"] if a != "batch-only"}
    sync_ms = {a: np.mean([r["arms"][a]["sync_s"] for r in results]) * 1e3 for a in online_s}
    say(f"run time {wall:.0f} s on {os.cpu_count()} cores; per seed: batch training {t_batch:.1f} s, online arms "
        + ", ".join(f"{a[9:]} {s:.1f} s (syncs {sync_ms[a]:.0f} ms)" for a, s in online_s.items()))

    with open(os.path.join(out_dir, "output.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "tenth_start_dates": dates, "results": results}, f, indent=1, default=float)
    run.plot(results, dates, os.path.join(out_dir, "auc_over_time.png"),
             f"DeepFM on MovieLens-1M: batch-only vs online sync every 1/N of the stream "
             f"({args.seeds} seeds)")
    print(f"wrote {out_dir}/output.txt, results.json, auc_over_time.png")
    return results


if __name__ == "__main__":
    main()
