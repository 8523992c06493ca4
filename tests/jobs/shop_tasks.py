"""A two-objective job that is not MovieLens, for the tests: a shop's log
of clicks and of purchases that follow a click.

The shop's features (`tests.jobs.shop`), and two heads: "click" (was the
item clicked) and "buy" (was it bought, defined only for clicked requests,
as ESMM's conversion: its file column is null where there was no click and
the head is masked there). The model is the user's own NNX module: a shared
bottom and one small tower per head, returning a dict by head name.
`make_log` writes a log whose clicks and purchases follow hidden tastes
that the two objectives share in part.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import monolith_jax as mj
from tests.jobs.shop import DENSE, DIM, SPARSE, write_log

HEADS = (mj.Head("click", label="clicked"), mj.Head("buy", label="bought", missing="mask"))
# How the joiner labels the stream, per head: a click within 30 s, and a
# purchase within 30 s, defined only where there was a click.
LABELS = {"click": mj.LabelRule(positive=("click",), window_s=30.0),
          "buy": mj.LabelRule(positive=("buy",), given="click", window_s=30.0)}


class SharedBottom(nnx.Module):
    """A shared layer over [user, item, category, recent, user * item, price],
    then one tower per head (a logit each)."""

    def __init__(self, dim: int, heads=("click", "buy"), *, rngs: nnx.Rngs):
        self.heads = tuple(heads)
        self.shared = nnx.Linear(5 * dim + 1, 32, rngs=rngs)
        self.towers = nnx.List([nnx.Linear(32, 1, rngs=rngs) for _ in self.heads])

    def __call__(self, fields: dict, dense):
        u, i, c, r = fields["user"], fields["item"], fields["category"], fields["recent_items"]
        x = nnx.relu(self.shared(jnp.concatenate([u, i, c, r, u * i, dense / 100.0], axis=-1)))
        return {h: t(x)[:, 0] + jnp.sum(r * i, axis=-1) for h, t in zip(self.heads, self.towers)}


def make_job(heads=HEADS, name: str = "shop_tasks", **kwargs) -> mj.Job:
    """The job, or a variant with fewer heads (a single-task baseline; a
    "buy" head alone then has no click to be given, and is labelled by
    purchases alone)."""
    names = [h.name for h in heads]
    rules = {n: LABELS[n] for n in names if n in LABELS}
    if "buy" in rules and "click" not in rules:
        rules["buy"] = mj.LabelRule(positive=("buy",), window_s=30.0)
    kwargs.setdefault("labels", rules if len(rules) == len(names) else None)
    kwargs.setdefault("log", mj.LogSpec(time_column="ts", request_id_column="request",
                                        actions={"click": "clicked", "buy": "bought"}))
    return mj.Job(
        name=name,
        sparse=SPARSE,
        dense=DENSE,
        tables=[mj.TableConfig("ids", DIM, mj.Normal(0.0, 0.05), mj.Adagrad(0.1))],
        model=lambda rngs: SharedBottom(DIM, [h.name for h in heads], rngs=rngs),
        optimizer=optax.adam(3e-3),
        heads=heads,
        batch_size=256,
        **kwargs,
    )


job = make_job()


def make_log(path: str, n: int = 6000, users: int = 300, items: int = 300, seed: int = 0, part: int = 0,
             start_s: int = 1_700_000_000) -> dict:
    """Writes a log of clicks and purchases (Parquet or CSV by the
    extension); returns its columns. `bought` is 0/1 where `clicked` is 1
    and null elsewhere. `seed` sets the hidden tastes, `part` the draws."""
    import pyarrow as pa

    world = np.random.default_rng(seed)
    taste = world.standard_normal((users, 3))
    style = world.standard_normal((items, 3))
    value = world.standard_normal((items, 3))          # what makes a clicked item bought
    cats = np.array(["books", "games", "garden", "music", "tools"])
    item_cat = world.integers(0, len(cats), items)
    pop = world.standard_normal(items)
    rng = np.random.default_rng([seed, part])
    user = rng.integers(0, users, n)
    item = rng.integers(0, items, n)
    click_logit = 1.5 * np.sum(taste[user] * style[item], axis=1) + 1.5 * pop[item] - 0.5
    clicked = rng.random(n) < 1 / (1 + np.exp(-click_logit))
    buy_logit = 1.5 * np.sum(taste[user] * value[item], axis=1) + 0.8 * pop[item] - 0.3
    bought = clicked & (rng.random(n) < 1 / (1 + np.exp(-buy_logit)))
    recent = [rng.integers(0, items, rng.integers(0, 5)).tolist() for _ in range(n)]
    price = np.round(rng.uniform(1, 100, n), 2)
    price_cells = [None if rng.random() < 0.05 else float(p) for p in price]
    cols = {"request": [f"t{part}-{k}" for k in range(n)], "ts": start_s + part * 10 * n + np.arange(n) * 2,
            "user": user, "item": item, "category": cats[item_cat[item]].tolist(), "recent_items": recent,
            "price": price_cells, "clicked": clicked.astype(np.int64),
            "bought": [int(b) if c else None for c, b in zip(clicked, bought)]}
    write_log(pa.table({k: pa.array(v, type=pa.int64() if k == "bought" else None) for k, v in cols.items()}), path)
    return cols
