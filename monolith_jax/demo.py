"""The main job, on embedded defaults: train a small recommender with
collisionless embedding tables on synthetic clicks and show what it learned.

    python -m monolith_jax.demo [--examples N] [--batch B]

Users (string ids, hashed to 64-bit keys) and items (raw 64-bit ids) click
with a probability set by hidden taste vectors. A Flax NNX tower over the
user and item embeddings learns it; the embedding rows are created on first
sight and updated in place by the tables' fused Adagrad, inside one jitted
step per batch (lookup -> dense forward/backward -> fused apply + optax).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from monolith_jax.metrics import auc, log_loss
from monolith_jax.sparse import Adagrad, EmbeddingTable, Keys, Normal, TableConfig, hash_strings


class Tower(nnx.Module):
    """logit = MLP([u, i, u * i])."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(3 * dim, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, u, i):
        x = jnp.concatenate([u, i, u * i], axis=-1)
        x = nnx.relu(self.l1(x))
        x = nnx.relu(self.l2(x))
        return self.out(x)[..., 0]


def synthetic_clicks(n: int, users: int, items: int, seed: int):
    """Clicks from hidden tastes: p = sigmoid(3 <taste_u, style_i> + pop_i - 1)."""
    rng = np.random.default_rng(seed)
    taste = rng.standard_normal((users, 4)) / 2
    style = rng.standard_normal((items, 4)) / 2
    pop = rng.standard_normal(items) * 0.5
    u = np.minimum(rng.zipf(1.1, n) - 1, users - 1)  # a few heavy users, a long tail
    i = rng.integers(0, items, n)
    p = 1 / (1 + np.exp(-(3 * np.sum(taste[u] * style[i], axis=1) + pop[i] - 1)))
    label = (rng.random(n) < p).astype(np.float32)
    user_keys = hash_strings(f"user:{k}" for k in range(users))[u]
    item_keys = (rng.permutation(items).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1))[i]
    return user_keys, item_keys, label, p


def make_step(users: EmbeddingTable, items: EmbeddingTable, graphdef, tx):
    @jax.jit
    def step(params, opt_state, uk: Keys, ik: Keys, label, step_no):
        u, i = users.lookup(uk), items.lookup(ik)

        def loss_fn(params, u, i):
            logits = nnx.merge(graphdef, params)(u, i)
            return optax.sigmoid_binary_cross_entropy(logits, label).mean()

        loss, (g_params, g_u, g_i) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(params, u, i)
        updates, opt_state = tx.update(g_params, opt_state, params)
        params = optax.apply_updates(params, updates)
        tu = users.apply_gradients(uk, g_u, step=step_no)
        ti = items.apply_gradients(ik, g_i, step=step_no)
        return params, opt_state, loss, tu, ti

    @jax.jit
    def predict(params, uk: Keys, ik: Keys):
        return jax.nn.sigmoid(nnx.merge(graphdef, params)(users.lookup(uk), items.lookup(ik)))

    return step, predict


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=400_000)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--items", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    uk_all, ik_all, labels, p_true = synthetic_clicks(args.examples, args.users, args.items, args.seed)
    n_test = min(50_000, args.examples // 5)
    train, test = slice(0, args.examples - n_test), slice(args.examples - n_test, None)
    print(f"monolith_jax demo on {jax.devices()[0].platform}: {args.examples - n_test:,} train / "
          f"{n_test:,} test synthetic clicks, {args.users:,} users, {args.items:,} items, "
          f"click rate {labels.mean():.3f}")

    opt = Adagrad(learning_rate=0.2)
    users = EmbeddingTable(TableConfig("user", args.dim, Normal(0, 0.05), opt, seed=args.seed))
    items = EmbeddingTable(TableConfig("item", args.dim, Normal(0, 0.05), opt, seed=args.seed + 1))
    model = Tower(args.dim, 64, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    step, predict = make_step(users, items, graphdef, tx)

    def evaluate(params):
        probs = []
        for s in range(test.start, args.examples, 8192):
            e = min(s + 8192, args.examples)
            probs.append(np.asarray(predict(params, Keys.from_ids(uk_all[s:e]), Keys.from_ids(ik_all[s:e]))))
        probs = np.concatenate(probs)
        return auc(labels[test], probs), log_loss(labels[test], probs)

    # Evaluating looks up (and so creates) rows for the test ids; clear the
    # tables afterwards so that training starts from empty ones.
    auc0, ll0 = evaluate(params)
    users.clear()
    items.clear()
    print(f"before training: test AUC {auc0:.4f}, log loss {ll0:.4f}")

    n_train = train.stop
    steps = n_train // args.batch
    t0 = time.perf_counter()
    losses = []
    for epoch in range(args.epochs):
        for k in range(steps):
            s = slice(k * args.batch, (k + 1) * args.batch)
            params, opt_state, loss, tu, ti = step(
                params, opt_state, Keys.from_ids(uk_all[s]), Keys.from_ids(ik_all[s]), labels[s],
                epoch * steps + k)
            losses.append(loss)
        jax.block_until_ready(params)
        rate = (epoch + 1) * steps * args.batch / (time.perf_counter() - t0)
        a, ll = evaluate(params)
        print(f"  epoch {epoch + 1}: train loss {float(np.mean(losses[-steps:])):.4f}, test AUC {a:.4f}, "
              f"{rate:,.0f} examples/s, rows: {len(users):,} users, {len(items):,} items")
    train_s = time.perf_counter() - t0
    trained = args.epochs * steps * args.batch

    auc1, ll1 = evaluate(params)
    best = auc(labels[test], p_true[test])
    su, si = users.stats(), items.stats()
    print(f"after training:  test AUC {auc1:.4f}, log loss {ll1:.4f} "
          f"(the true click probabilities score AUC {best:.4f})")
    print(f"trained {trained:,} examples in {train_s:.1f} s (evaluations included)")
    distinct_users = np.unique(uk_all[train][: steps * args.batch]).size
    print(f"tables: {su['rows']:,} user rows for {distinct_users:,} distinct training users + "
          f"test users seen at evaluation (no two ids share a row), {si['rows']:,} item rows; "
          f"{su['bytes_per_row']:.0f} bytes/row for dim {args.dim} + Adagrad slots")
    return {"auc_before": auc0, "auc_after": auc1, "auc_true": best, "loss_first": float(losses[0]),
            "loss_last": float(np.mean(losses[-20:])), "user_rows": su["rows"]}


if __name__ == "__main__":
    main()
