"""bf16 products against f32 on MovieLens-1M: the collisionless
experiment's DeepFM (dim 8 + 1, MLP 128-64, label rating >= 4, each
user's last 20% of ratings in time as the test set), the test AUC after
each epoch, for several seeds of each. bf16 trains the same when its AUC
lies within the spread of f32's seeds.

    python -m experiments.dense_step.movielens_auc                 # 3 seeds x 3 epochs, ~13 min at load 9
    python -m experiments.dense_step.movielens_auc --seeds 1 --epochs 1 --limit 50000
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import optax
from flax import nnx

from experiments.collisionless import run as cl
from monolith_jax.models import DeepFM
from monolith_jax.sparse import Adagrad, Normal, TableConfig
from monolith_jax.training import Trainer


def aucs(matmul: str, train_table, test_batches, epochs: int, batch: int, seed: int) -> list:
    tables = [TableConfig("ids", cl.DIM + 1, Normal(0.0, 0.01), Adagrad(0.05), seed=seed)]
    model = DeepFM(cl.FIELDS, cl.DIM, 0, cl.HIDDEN, matmul=matmul, rngs=nnx.Rngs(seed))
    trainer = Trainer(model, tables, cl.features(), optimizer=optax.adam(1e-3), log_every=0, out=None)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        trainer.fit(cl.batches(train_table, batch, rng.permutation(train_table.num_rows)))
        out.append(trainer.evaluate(test_batches)["auc"])
    return out


def main(argv=None, out=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT ratings")
    args = p.parse_args(argv)
    from monolith_jax.examples.movielens.data import load_movielens_1m

    ratings = load_movielens_1m()
    table = cl.records(ratings, cl.Arm("collisionless"))
    test = cl.split_by_user(ratings)
    if args.limit:
        table, test = table.slice(0, args.limit), test[:args.limit]
    train_table, test_batches = table.filter(~test), cl.batches(table.filter(test), 4096)
    res = {m: [aucs(m, train_table, test_batches, args.epochs, args.batch, s) for s in range(args.seeds)]
           for m in ("f32", "bf16")}
    out(f"MovieLens-1M DeepFM (dim {cl.DIM}, MLP {'-'.join(map(str, cl.HIDDEN))}), test AUC per epoch, "
        f"{args.seeds} seeds (mean, min-max over seeds):")
    for m, runs in res.items():
        per_epoch = list(zip(*runs))
        out(f"  {m:<5} " + "  ".join(f"{statistics.mean(e):.4f} ({min(e):.4f}-{max(e):.4f})" for e in per_epoch))
    last = {m: [r[-1] for r in runs] for m, runs in res.items()}
    out(f"  last epoch, bf16 - f32 (mean over seeds): {statistics.mean(last['bf16']) - statistics.mean(last['f32']):+.4f}; "
        f"f32's spread over seeds: {max(last['f32']) - min(last['f32']):.4f}")
    return res


if __name__ == "__main__":
    main()
