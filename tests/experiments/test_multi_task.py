"""The multi-task / DIN experiment end to end on tiny synthetic ratings."""

import numpy as np
import pytest

from experiments.multi_task import main as M
from experiments.multi_task import run
from tests.experiments.test_collisionless import _with_side_info
from tests.experiments.test_memory_control import _tiny_ratings


def test_history_is_each_users_previous_movies_oldest_first():
    r = _with_side_info(_tiny_ratings(n=3000))
    table, test = run.history_table(r, limit=5)
    seen = {}   # user -> movies so far, in time order (the reference)
    order = np.lexsort((np.arange(len(r)), r.timestamp, r.user))
    hist = table.column("history").to_pylist()
    for row, i in enumerate(order):
        past = seen.setdefault(int(r.user[i]), [])
        assert hist[row] == past[-5:]
        past.append(int(r.item_key[i].view(np.int64)))
    assert table.column("movie").to_numpy().tolist() == r.item_key[order].view(np.int64).tolist()
    assert np.array_equal(table.column("rating").to_numpy(), r.rating[order])
    assert np.array_equal(test, run.C.split_by_user(r)[order])


def test_every_arm_trains_and_the_report_pairs_the_seeds(capsys):
    r = _with_side_info(_tiny_ratings(n=4000))
    table, test = run.history_table(r)
    train, held = table.filter(~test), table.filter(test)
    results = {"baseline_rmse_movie_mean": run.movie_mean_rmse(train, held), "arms": {}}
    for key, arm in M.ARMS.items():  # two seeds where the report pairs them, one elsewhere
        seeds = (0, 1) if key in ("deepfm", "din") else (0,)
        results["arms"][key] = [run.run_arm(arm, train, held, epochs=1, size=256, seed=s) for s in seeds]
        for evals in results["arms"][key]:
            assert 0.5 < evals[0]["auc"] <= 1, (key, evals)
    two = results["arms"]["mmoe_two"][0][0]["heads"]
    zero = float(np.sqrt(np.mean(held.column("rating").to_numpy() ** 2)))   # predicting 0 for every rating
    assert set(two) == {"like", "rating"} and two["rating"]["rmse"] < 0.9 * zero
    M.report(results, 1)
    out = capsys.readouterr().out
    assert "DIN over the history - DeepFM (one head)" in out and "paired over 2 seeds" in out
    assert "MMoE, two heads (like + rating) - MMoE, one head (like)" in out
    assert "rating head RMSE" in out


def test_paired_test_and_the_movie_mean_baseline():
    gap, sd, p = run.paired([0.81, 0.82, 0.83, 0.80], [0.80, 0.80, 0.82, 0.79])
    assert gap == pytest.approx(0.0125) and sd == pytest.approx(0.005) and p == pytest.approx(0.0154, abs=2e-4)  # t = 5, 3 dof
    import pyarrow as pa

    train = pa.table({"movie": [1, 1, 2], "rating": [4.0, 2.0, 5.0]})
    held = pa.table({"movie": [1, 2, 3], "rating": [3.0, 4.0, 1.0]})
    # movie 1 -> 3, movie 2 -> 5, unseen movie 3 -> the global mean 11/3
    want = np.sqrt(((3 - 3) ** 2 + (5 - 4) ** 2 + (11 / 3 - 1) ** 2) / 3)
    assert run.movie_mean_rmse(train, held) == pytest.approx(want)
