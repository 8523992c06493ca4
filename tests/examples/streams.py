"""Synthetic MovieLens-shaped data for the online tests (no download)."""

import numpy as np

from monolith_jax.examples.movielens.data import Ratings
from monolith_jax.sparse.keys import hash_strings


def synthetic_ratings(n=3000, users=200, items=80, seed=0, days=30) -> Ratings:
    rng = np.random.default_rng(seed)
    user = (rng.zipf(1.3, n) % users).astype(np.int32)
    item = (rng.zipf(1.3, n) % items).astype(np.int32)
    taste, quality = rng.standard_normal(users), rng.standard_normal(items)
    rating = np.clip(np.round(3 + taste[user] + quality[item]), 1, 5).astype(np.float32)
    names_u = np.array([f"u{u}" for u in range(users)])
    names_i = np.array([f"movie {i} (1990)" for i in range(items)])
    return Ratings(
        user=user, item=item, rating=rating, timestamp=np.sort(rng.integers(0, days * 86_400, n)).astype(np.int64),
        user_key=hash_strings([f"user:{names_u[u]}" for u in user]),
        item_key=hash_strings([f"movie:{names_i[i]}" for i in item]),
        user_names=names_u, item_names=names_i,
        user_age=rng.integers(1, 60, users).astype(np.int32), user_gender=rng.integers(0, 2, users).astype(np.int32),
        user_occupation=rng.integers(0, 20, users).astype(np.int32),
        item_year=rng.integers(1950, 2000, items).astype(np.int32),
        item_genres=np.array([" ".join(rng.choice(["Drama", "Comedy", "War", "Action"], 2, replace=False))
                              for _ in range(items)]))
