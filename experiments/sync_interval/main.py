"""Online training against sync interval, through the live loop on MovieLens-1M (the paper's Table 2).
Flags only; the work is in run.py.

    python -m experiments.sync_interval.main                       # 3 repeats, ~10 min on 2 cores; replaces results/
    python -m experiments.sync_interval.main --repeats 1 --seconds 40   # a short look, in a run folder

Any run with flags writes to a fresh run folder (runs/sync_interval-TIMESTAMP/,
printed), not over the committed results/, unless given --out
(experiments/run_folder.py).

Each repeat: warm start on the 100,000 ratings before the window, then
150 s of MovieLens at 600 event seconds per wall second (10 minutes of
MovieLens a second), every request scored by every arm's predictor before
it is produced; arms sync every 0.25, 1, 3, 6 and 30 s (2.5 min, 10 min,
30 min, 1 h and 5 h of MovieLens time: 3, 6 and 30 s are the paper's
30 min, 1 h and 5 h), and a frozen arm keeps the warm-started model.
"""

import argparse
import datetime
import json
import os
import time

import numpy as np

from experiments import run_folder
from experiments.sync_interval import run


def _when(ms) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def jsonable(res: dict) -> dict:
    """The results without the per-request arrays."""
    return {**res, "repeats": [{k: v for k, v in r.items() if k != "requests"} for r in res["repeats"]]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--intervals", type=float, nargs="+", default=[0.25, 1.0, 3.0, 6.0, 30.0],
                   help="sync intervals of the online arms, wall seconds (a frozen arm is always added)")
    p.add_argument("--repeats", type=int, default=3, help="repeats (seeds 0..R-1: model init, impressions, delays)")
    p.add_argument("--start", type=int, default=560_000, help="index of the window's first rating (time order)")
    p.add_argument("--warmup", type=int, default=100_000, help="ratings before the window to warm start on")
    p.add_argument("--seconds", type=float, default=150.0, help="wall seconds of the paced window")
    p.add_argument("--speed", type=float, default=600.0, help="event seconds per wall second in the window")
    p.add_argument("--dense-interval", type=float, default=None,
                   help="wall seconds between dense syncs for every arm (default: each arm's own interval)")
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ beside this file for the default command, "
                        "else a fresh run folder)")
    args = p.parse_args(argv)
    out_dir = str(run_folder.output_dir("sync_interval", p, args, full_size_flags=("dense_interval",)))
    lines = []

    def say(line="", **_):
        print(line, flush=True)
        lines.append(line)

    t_start = time.perf_counter()
    from monolith_jax.examples.movielens.data import load_movielens_1m

    ratings = load_movielens_1m()
    win = run.window(ratings, args.start, args.warmup, args.seconds, args.speed)
    n_paced = len(win.ratings) - win.warmup
    say(f"MovieLens-1M through the live loop (replay -> Kafka -> joiner -> trainer -> a serving PS and a predictor "
        f"per arm), DeepFM dim 8, MLP 128-64, label = rating >= 4, unrated impressions negative, negatives kept at "
        f"{run.NEGATIVE_RATE}")
    say(f"warm start: {win.warmup:,} ratings to {_when(win.start_ms)}, replayed as fast as the joiner takes them, "
        f"trained once; then a full copy to every arm")
    say(f"paced window: {n_paced:,} ratings, {_when(win.start_ms)} to {_when(win.end_ms)} UTC, at {args.speed:g} "
        f"event s per wall s ({run.span(args.speed)} of MovieLens a second) for {args.seconds:g} s; "
        f"{args.repeats} repeats")
    say("arms: " + ", ".join(f"sync every {i:g} s = {run.span(i * args.speed)} of MovieLens"
                             for i in sorted(args.intervals)) + ", and frozen (no sync after the warm start); "
        + (f"dense params every {args.dense_interval:g} s in every arm" if args.dense_interval else
           "dense params at each arm's own interval"))
    say()
    res = run.experiment(ratings, args.intervals, args.repeats, args.start, args.warmup, args.seconds, args.speed,
                         dense_interval_s=args.dense_interval, out=say)
    say()
    say("AUC of the serving model's scores (each request scored by its arm's predictor before its action existed), "
        "against the joiner's labels:")
    for line in run.table_lines(res):
        say(line)
    say()
    say("By user (mean over repeats):")
    for line in run.user_lines(res):
        say(line)
    say()
    say("Where a sync helps: each arm against the frozen arm on the same requests, by whether the arm's serving PS "
        "held every id of the request (mean over repeats):")
    for line in run.ids_lines(res):
        say(line)
    say()
    starts, by_arm = run.tenths(res)
    say("AUC by tenth of the window's labelled requests (mean over repeats); first request of each tenth (UTC):")
    say(f"{'':<13}" + "".join(f"{_when(t)[5:]:>12}" for t in starts))
    for a in res["arms"]:
        say(f"{run.Arm(a['name'], a['interval_s']).label:<13}" + "".join(f"{v:>12.4f}" for v in by_arm[a["name"]]))
    say()
    for line in run.check_lines(res):
        say(line)
    t = [r["timings"] for r in res["repeats"]]
    wall = time.perf_counter() - t_start
    mean = lambda key: np.mean([x[key] for x in t])  # noqa: E731
    say(f"run time {wall:.0f} s on {os.cpu_count()} cores; per repeat: processes up {mean('start_s'):.0f} s, "
        f"warm start {mean('warmup_s'):.0f} s, paced window {mean('paced_s'):.0f} s, all {mean('total_s'):.0f} s")
    with open(os.path.join(out_dir, "output.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "out"}, "summary": run.summary_rows(res),
                   **jsonable(res)}, f, indent=1, default=float)
    run.plot(res, os.path.join(out_dir, "auc_by_interval.png"),
             f"DeepFM on MovieLens-1M through the live loop: serving AUC by sync interval "
             f"({args.repeats} repeats, {args.speed:g} event s per wall s)")
    print(f"wrote {out_dir}/output.txt, results.json, auc_by_interval.png")
    return res


if __name__ == "__main__":
    main()
