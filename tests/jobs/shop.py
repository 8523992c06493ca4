"""A job that is not MovieLens, for the tests: a shop's click log.

Requests show a user an item; features: `user` (integer ids), `item`
(integer ids from the same integer range as users, so key spaces matter),
`category` (strings), `recent_items` (the user's last items: a sequence
sharing the item id space) and `price` (dense, may be missing: filled with
0). The model is the user's own NNX module, not one of the package's.
`make_log` writes a log whose clicks follow hidden tastes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import monolith_jax as mj
from monolith_jax.features import DenseFeature, SparseFeature

DIM = 8
SPARSE = [
    SparseFeature("user", "ids"),
    SparseFeature("item", "ids"),
    SparseFeature("category", "ids"),
    SparseFeature("recent_items", "ids", combiner="mean", max_len=4, id_space="item"),
]
DENSE = [DenseFeature("price", fill=0.0)]


class ShopTower(nnx.Module):
    """logit = MLP([user, item, category, recent, user * item, price]) + <recent, item>."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(5 * dim + 1, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, fields: dict, dense):
        u, i, c, r = fields["user"], fields["item"], fields["category"], fields["recent_items"]
        x = jnp.concatenate([u, i, c, r, u * i, dense / 100.0], axis=-1)  # price in dollars
        return self.out(nnx.relu(self.hidden(x)))[:, 0] + jnp.sum(r * i, axis=-1)


job = mj.Job(
    name="shop",
    sparse=SPARSE,
    dense=DENSE,
    tables=[mj.TableConfig("ids", DIM, mj.Normal(0.0, 0.05), mj.Adagrad(0.1))],
    model=lambda rngs: ShopTower(DIM, rngs=rngs),
    optimizer=optax.adam(3e-3),
    label="clicked",
    batch_size=256,
    labels=mj.LabelRule(positive=("click",), window_s=30.0),
    log=mj.LogSpec(time_column="ts", request_id_column="request", actions={"click": "clicked"}),
)


def make_log(path: str, n: int = 6000, users: int = 300, items: int = 300, seed: int = 0, part: int = 0,
             start_s: int = 1_700_000_000) -> dict:
    """Writes a click log (Parquet or CSV by the extension); returns its
    columns. `seed` sets the hidden tastes, `part` the draws (train and test
    logs of one world: same seed, other parts)."""
    import pyarrow as pa

    world = np.random.default_rng(seed)
    taste = world.standard_normal((users, 3))
    style = world.standard_normal((items, 3))
    cats = np.array(["books", "games", "garden", "music", "tools"])
    item_cat = world.integers(0, len(cats), items)
    rng = np.random.default_rng([seed, part])
    user = rng.integers(0, users, n)
    item = rng.integers(0, items, n)
    pop = world.standard_normal(items)
    logit = 1.5 * np.sum(taste[user] * style[item], axis=1) + 1.5 * pop[item] - 0.5
    clicked = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    recent = [rng.integers(0, items, rng.integers(0, 5)).tolist() for _ in range(n)]
    price = np.round(rng.uniform(1, 100, n), 2)
    price_cells = [None if rng.random() < 0.05 else float(p) for p in price]
    cols = {"request": [f"q{part}-{k}" for k in range(n)], "ts": start_s + part * 10 * n + np.arange(n) * 2, "user": user,
            "item": item, "category": cats[item_cat[item]].tolist(), "recent_items": recent,
            "price": price_cells, "clicked": clicked}
    write_log(pa.table({k: pa.array(v) for k, v in cols.items()}), path)
    return cols


def write_log(table, path: str) -> None:
    """A log table as Parquet, or CSV by the extension (its recent items as
    "1|2|3", the CSV reader's sequence form)."""
    import pyarrow as pa

    if str(path).endswith(".csv"):
        import pyarrow.csv as pcsv

        recent = table.column("recent_items").to_pylist()
        table = table.set_column(table.schema.get_field_index("recent_items"), "recent_items",
                                 pa.array(["|".join(map(str, r)) for r in recent]))
        pcsv.write_csv(table, path)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, path)
