"""The memory-control experiment end to end on tiny streams."""

import numpy as np

from experiments.memory_control import run
from monolith_jax.examples.movielens.data import Ratings
from monolith_jax.sparse import hash_strings


def _tiny_ratings(n=6000, users=300, items=120, seed=0):
    rng = np.random.default_rng(seed)
    user = rng.zipf(1.3, n) % users
    item = rng.zipf(1.3, n) % items
    taste = rng.standard_normal(users)
    quality = rng.standard_normal(items)
    rating = np.clip(np.round(3 + taste[user] + quality[item]), 1, 5).astype(np.float32)
    return Ratings(
        user=user.astype(np.int32), item=item.astype(np.int32), rating=rating,
        timestamp=np.sort(rng.integers(0, 400 * 86_400, n)),
        user_key=hash_strings(f"u{u}" for u in user), item_key=hash_strings(f"i{i}" for i in item),
        user_names=np.array([]), item_names=np.array([]), user_age=np.array([]), user_gender=np.array([]),
        user_occupation=np.array([]), item_year=np.array([]), item_genres=np.array([]))


def test_movielens_settings_trade_rows_for_auc():
    lines = []
    res = run.run_movielens(_tiny_ratings(), batch=256, out=lines.append)
    by = {r["setting"]: r for r in res}
    assert len(lines) == len(run.MOVIELENS_SETTINGS)
    assert by["baseline"]["auc"] > 0.6                      # the model learns the signal
    assert by["threshold 10"]["rows"] < by["baseline"]["rows"]
    assert by["threshold 10"]["filtered"] > 0
    assert by["expire 7 days"]["rows"] < by["expire 180 days"]["rows"] <= by["baseline"]["rows"]
    assert by["expire 7 days"]["expired"] > 0


def test_zipf_thresholds_cut_rows():
    stream = run.zipf_stream(batches=4, batch=4096, universe=200_000)
    res = run.run_zipf(stream, out=lambda line: None)
    rows = {r["setting"]: r["rows"] for r in res}
    assert rows["threshold 10"] < rows["threshold 5"] < rows["threshold 2"] < rows["baseline"]
