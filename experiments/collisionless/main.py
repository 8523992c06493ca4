"""Collisionless embeddings vs the hashing trick: DeepFM on MovieLens-1M
(the paper's Figure 7). Flags only; the work is in run.py.

    python -m experiments.collisionless.main                  # ~5 min on 2 cores; replaces results/
    python -m experiments.collisionless.main --seeds 1 --epochs 1 --limit 50000   # a minute, in a run folder

Any run with flags writes to a fresh run folder (runs/collisionless-TIMESTAMP/,
printed), not over the committed results/, unless given --out
(experiments/run_folder.py).
"""

import argparse
import dataclasses
import json

import numpy as np

from experiments import run_folder
from experiments.collisionless import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--limit", type=int, default=0, help="first N ratings only (0: all)")
    p.add_argument("--speed-steps", type=int, default=150)
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ beside this file for the default command, "
                        "else a fresh run folder)")
    args = p.parse_args(argv)
    out = run_folder.output_dir("collisionless", p, args)

    from monolith_jax.examples.movielens.data import load_movielens_1m
    ratings = load_movielens_1m()
    if args.limit:
        ratings = dataclasses.replace(ratings, **{f: getattr(ratings, f)[: args.limit] for f in
                                      ("user", "item", "rating", "timestamp", "user_key", "item_key")})
    n_users, n_movies = np.unique(ratings.user_key).size, np.unique(ratings.item_key).size
    arms = [
        run.Arm("collisionless"),
        run.Arm("hashing, paper's rates", run.buckets_for(n_users, 0.077), run.buckets_for(n_movies, 0.029)),
        run.Arm("hashing, 10x fewer buckets", run.buckets_for(n_users, 0.077) // 10,
                run.buckets_for(n_movies, 0.029) // 10),
    ]
    test = run.split_by_user(ratings)
    print(f"MovieLens-1M: {len(ratings):,} ratings, {n_users:,} users, {n_movies:,} movies; "
          f"test = each user's last 20% ({test.sum():,}); DeepFM dim {run.DIM}, {args.seeds} seeds, "
          f"{args.epochs} epochs")
    results = {}
    for arm in arms:
        table = run.records(ratings, arm)
        train_t, test_t = table.filter(~test), table.filter(test)
        test_batches = run.batches(test_t, 8192)
        rates = ""
        if arm.user_buckets:
            rates = (f" ({arm.user_buckets:,} / {arm.movie_buckets:,} buckets; colliding: "
                     f"{run.collision_rate(ratings.user_key, arm.user_buckets):.1%} of users, "
                     f"{run.collision_rate(ratings.item_key, arm.movie_buckets):.1%} of movies)")
        aucs = np.array([run.run_arm(arm, train_t, test_batches, args.epochs, args.batch, seed)
                         for seed in range(args.seeds)])
        results[arm.name] = aucs
        per_epoch = "  ".join(f"{m:.4f}±{s:.4f}" for m, s in zip(aucs.mean(0), aucs.std(0)))
        print(f"{arm.name}{rates}\n  test AUC per epoch: {per_epoch}")

    base = results["collisionless"]
    for name, aucs in results.items():
        if name != "collisionless":
            print(f"collisionless - {name}: {(base[:, -1] - aucs[:, -1]).mean():+.4f} AUC after the last epoch")

    sp = run.speed(run.records(ratings, arms[0]).filter(~test), args.batch, args.speed_steps)
    print(f"speed, DeepFM training step, batch {args.batch}: collisionless {sp['collisionless']:,.0f} ex/s, "
          f"static hashed table (plain JAX, row-wise Adagrad) {sp['static_embed']:,.0f} ex/s: "
          f"collisionless costs {sp['static_embed'] / sp['collisionless']:.2f}x the static step's time")

    (out / "auc.json").write_text(json.dumps({k: v.tolist() for k, v in results.items()}, indent=1))
    _plot(results, out / "figure7.png")
    print(f"wrote {out / 'figure7.png'} and {out / 'auc.json'}")
    return results, sp


def _plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, aucs in results.items():
        epochs = np.arange(1, aucs.shape[1] + 1)
        ax.errorbar(epochs, aucs.mean(0), yerr=aucs.std(0), marker="o", capsize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test AUC")
    ax.set_title("DeepFM on MovieLens-1M: collisionless vs hashing")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
