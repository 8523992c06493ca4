"""The MovieLens-1M job: what `monolith ... --job monolith_jax.examples.movielens.job:job` runs.

Each rating is a request with the user's and the movie's features; the
label is a `rate` action of value >= 4. Seven sparse features in one
collisionless table (each feature its own key space), a DeepFM over them
(dim 8 + 1 first-order weight per row), fused Adagrad for the rows, Adam
for the dense params. `source` replays MovieLens-1M in time order, with
unrated impressions beside the ratings (`replay.MovieLensStream`).
"""

from __future__ import annotations

import dataclasses

import optax

from monolith_jax.examples.movielens import replay as R
from monolith_jax.job import Job, LabelRule
from monolith_jax.sparse import Adagrad, Normal, TableConfig

DIM = 8


def tables(seed: int = 0, dim: int = DIM) -> list:
    """One table: dim + 1 (the first-order weight), fused Adagrad."""
    return [TableConfig("ids", dim + 1, Normal(0.0, 0.01), Adagrad(0.05), seed=seed)]


def model(rngs, dim: int = DIM, hidden=(128, 64)):
    from monolith_jax.models import DeepFM

    return DeepFM(R.FIELDS, dim, 0, tuple(hidden), rngs=rngs)


def source(limit: int | None = None, seed: int = 0, impressions: float = 1.0):
    """The replay (a `MovieLensStream`: `messages()` in event-time order); fetches the data at first use."""
    from monolith_jax.examples.movielens.data import load_movielens_1m

    return R.MovieLensStream(load_movielens_1m(), impressions, seed=seed, limit=limit)


job = Job(
    name="movielens",
    sparse=R.movielens_features(),
    tables=tables(),
    model=model,
    optimizer=optax.adam(1e-3),
    label="rating",
    label_threshold=R.MIN_VALUE,
    batch_size=1024,
    labels=LabelRule(positive=R.POSITIVE_TYPES, min_value=R.MIN_VALUE, window_s=60.0, negative_rate=0.5),
    source=source,
)


# MovieLens-1M's mean rating: the rating head predicts its offset from it,
# so that a fresh tower starts at the mean, not at 0 (squared errors of 3.6
# would otherwise drive the shared experts for the first thousands of steps).
MEAN_RATING = 3.58


def mmoe_model(rngs, tasks=("like", "rating"), dim: int = DIM, hidden=(128, 64)):
    from flax import nnx

    from monolith_jax.models import MMoE

    class RatingFromMean(nnx.Module):
        def __init__(self):
            self.mmoe = MMoE(R.FIELDS, dim, n_experts=4, expert_hidden=tuple(hidden), tower_hidden=(32,),
                             tasks=tuple(tasks), rngs=rngs)

        def __call__(self, fields, dense):
            out = self.mmoe(fields, dense)
            return {k: v + MEAN_RATING if k == "rating" else v for k, v in out.items()}

    return RatingFromMean()


def _heads():
    from monolith_jax.heads import Head

    return (Head("like", label="rating", threshold=R.MIN_VALUE),
            Head("rating", loss="squared", label="rating", weight=0.2, missing="mask"))


LIKE = LabelRule(positive=R.POSITIVE_TYPES, min_value=R.MIN_VALUE, window_s=60.0, negative_rate=0.5)

# Two objectives from one stream: "like" (a rating >= 4, binary; unrated
# impressions are negatives, half of them kept) and "rating" (the rating
# itself, squared error; defined only where the user rated), by an MMoE.
# The joiner writes both labels on each example (messages version 2).
two_heads = Job(
    name="movielens_two_heads",
    sparse=R.movielens_features(),
    tables=[TableConfig("ids", DIM, Normal(0.0, 0.01), Adagrad(0.05))],
    model=mmoe_model,
    optimizer=optax.adam(1e-3),
    heads=_heads(),
    batch_size=1024,
    labels={"like": LIKE, "rating": LabelRule(value_of=R.POSITIVE_TYPES[0], window_s=60.0)},
    source=source,
)

# The single-head DeepFM of `job`, reading the "like" label of the two-head
# stream (a job of one named head reads that label of version-2 examples).
like_only = dataclasses.replace(job, name="movielens_like_only", heads=_heads()[:1], labels=LIKE)

# The same MMoE with the like head alone: what the rating head adds or costs.
like_only_mmoe = dataclasses.replace(two_heads, name="movielens_like_only_mmoe",
                                     model=lambda rngs: mmoe_model(rngs, tasks=("like",)),
                                     heads=_heads()[:1], labels=LIKE)
