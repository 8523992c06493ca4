"""Several objectives (heads) and target attention (DIN) on MovieLens-1M.
Flags only; the work is in run.py.

    python -m experiments.multi_task.main                      # ~1 h on 2 cores; replaces results/
    python -m experiments.multi_task.main --seeds 2 --epochs 1 --limit 100000   # a minute, in a run folder

Any run with flags writes to a fresh run folder (runs/multi_task-TIMESTAMP/,
printed), not over the committed results/, unless given --out
(experiments/run_folder.py). Results are written after every seed.
"""

import argparse
import dataclasses
import json

import numpy as np

from experiments import run_folder
from experiments.multi_task import run

ARMS = {
    "deepfm": run.Arm("DeepFM (one head)", "deepfm"),
    "deepfm_history": run.Arm("DeepFM + mean-pooled history", "deepfm", history="mean"),
    "din": run.Arm("DIN over the history", "din", history="sequence"),
    "mmoe_one": run.Arm("MMoE, one head (like)", "mmoe"),
    "mmoe_two": run.Arm("MMoE, two heads (like + rating)", "mmoe", heads=run.HEADS),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--limit", type=int, default=0, help="first N training examples only (0: all)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ beside this file for the default command, "
                        "else a fresh run folder)")
    args = p.parse_args(argv)
    out = run_folder.output_dir("multi_task", p, args)

    from monolith_jax.examples.movielens.data import load_movielens_1m

    ratings = load_movielens_1m()
    table, test = run.history_table(ratings)
    train_t, test_t = table.filter(~test), table.filter(test)
    if args.limit:
        train_t = train_t.slice(0, args.limit)
    print(f"MovieLens-1M: {train_t.num_rows:,} training ratings, {test_t.num_rows:,} test (each user's last 20%); "
          f"history: the last {run.HISTORY} movies rated before; {args.seeds} seeds, {args.epochs} epochs, "
          f"batch {args.batch}", flush=True)
    baseline_rmse = run.movie_mean_rmse(train_t, test_t)
    results = {"baseline_rmse_movie_mean": baseline_rmse, "arms": {k: [] for k in args.arms}}
    for seed in range(args.seeds):
        for key in args.arms:
            arm = ARMS[key]
            evals = run.run_arm(arm, train_t, test_t, args.epochs, args.batch, seed)
            results["arms"][key].append(evals)
            last = evals[-1]
            extra = f", rating RMSE {last['heads']['rating']['rmse']:.4f}" if "heads" in last else ""
            per_epoch = " ".join(f"{e['auc']:.4f}" for e in evals)
            print(f"seed {seed} {arm.name}: like-AUC per epoch {per_epoch}{extra}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args.epochs)
    print(f"wrote {out / 'results.json'}")
    return results


def report(results: dict, epochs: int) -> None:
    arms = results["arms"]
    aucs = {k: np.array([[e["auc"] for e in seed] for seed in v]) for k, v in arms.items() if v}
    print(f"\ntest like-AUC (rating >= 4) after epoch {epochs}, mean ± std over {len(next(iter(aucs.values())))} "
          f"seeds:")
    for key, a in aucs.items():
        print(f"  {ARMS[key].name:<34} {a[:, -1].mean():.4f} ± {a[:, -1].std(ddof=1) if len(a) > 1 else 0:.4f}")
    for a, b in (("din", "deepfm"), ("din", "deepfm_history"), ("deepfm_history", "deepfm"),
                 ("mmoe_two", "mmoe_one"), ("mmoe_two", "deepfm")):
        if a in aucs and b in aucs:
            n = min(len(aucs[a]), len(aucs[b]))
            gap, sd, pv = run.paired(aucs[a][:n, -1], aucs[b][:n, -1])
            print(f"  {ARMS[a].name} - {ARMS[b].name}: {gap:+.4f} AUC (paired over {n} seeds, sd {sd:.4f}, "
                  f"p = {pv:.2g})")
    if arms.get("mmoe_two"):
        rmse = np.array([seed[-1]["heads"]["rating"]["rmse"] for seed in arms["mmoe_two"]])
        print(f"  rating head RMSE {rmse.mean():.4f} ± {rmse.std(ddof=1) if rmse.size > 1 else 0:.4f}, beside "
              f"{results['baseline_rmse_movie_mean']:.4f} for each movie's mean training rating")


if __name__ == "__main__":
    main()
