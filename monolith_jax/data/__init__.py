"""Real data sets, fetched at first use into a cache folder (never shipped)."""

from monolith_jax.data.movielens import Ratings, fetch_movielens_1m, load_movielens_1m

__all__ = ["Ratings", "fetch_movielens_1m", "load_movielens_1m"]
