"""The paper's Algorithm 1 (batch-only vs online with periodic sync) end to
end on a small synthetic stream in which, as in MovieLens, users arrive
over time and rate in bursts."""

import numpy as np

from experiments.paper_online import main as paper_main
from experiments.paper_online import run
from monolith_jax.examples.movielens.data import Ratings
from monolith_jax.sparse import hash_strings


def arriving_users(n=6000, users=300, items=60, seed=0) -> Ratings:
    """Users join one after another and rate in a burst; ratings follow each
    user's taste and each movie's quality, so a model that has seen a user
    scores them better than one that has not."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, n)
    start = rng.uniform(0, 60 * 86_400, users)                  # user u joins at start[u], rates for a few days
    timestamp = (start[user] + rng.exponential(3 * 86_400, n)).astype(np.int64)
    order = np.argsort(timestamp, kind="stable")
    user, timestamp = user[order].astype(np.int32), timestamp[order]
    item = (rng.zipf(1.3, n) % items).astype(np.int32)
    taste, quality = 1.5 * rng.standard_normal(users), rng.standard_normal(items)
    rating = np.clip(np.round(3 + taste[user] + quality[item] + 0.5 * rng.standard_normal(n)), 1, 5)
    names_i = np.array([f"movie {i} (1990)" for i in range(items)])
    return Ratings(
        user=user, item=item, rating=rating.astype(np.float32),
        timestamp=timestamp,
        user_key=hash_strings([f"user:u{u}" for u in user]), item_key=hash_strings([f"movie:{names_i[i]}" for i in item]),
        user_names=np.array([f"u{u}" for u in range(users)]), item_names=names_i,
        user_age=rng.integers(1, 60, users).astype(np.int32), user_gender=rng.integers(0, 2, users).astype(np.int32),
        user_occupation=rng.integers(0, 20, users).astype(np.int32),
        item_year=rng.integers(1950, 2000, items).astype(np.int32),
        item_genres=np.array([" ".join(rng.choice(["Drama", "Comedy", "War", "Action"], 2, replace=False))
                              for _ in range(items)]))


def _export(table) -> dict:
    keys, values = table.export()
    return dict(zip(keys.tolist(), values))


def test_serving_copy_is_frozen_between_syncs_and_catches_up_at_each():
    data = run.split(arriving_users(), 0.5)
    assert data.new_user.mean() > 0.5                      # most of the stream is by users batch training never saw
    n_stream = data.stream.num_rows
    edges = {n: run.shard_edges(n_stream, n) for n in (2, 6)}
    shards = {n: run.shard_batches(data.stream, e, 256) for n, e in edges.items()}
    assert [sum(int(np.sum(b.weights)) for b in s) for s in shards[6]] == list(np.diff(edges[6]))

    synced = []   # the trainer's state at every sync of N=6

    def on_sync(n, k, trainer, serving):
        # right after a sync the serving copy holds exactly the trainer's rows and params
        assert _export(serving.trainer.tables["ids"]).keys() == _export(trainer.tables["ids"]).keys()
        mine, theirs = _export(serving.trainer.tables["ids"]), _export(trainer.tables["ids"])
        assert all(np.array_equal(mine[key], theirs[key]) for key in theirs)
        if n == 6:
            synced.append(trainer.state_dict())

    res = run.run_seed(data, shards, epochs=2, batch=256, seed=0, out=lambda *a: None, on_sync=on_sync,
                       keep_scores=True)
    scores, arms = res["scores"], res["arms"]
    assert len(synced) == 6 and set(arms) == {"batch-only", "online N=2", "online N=6"}
    for arm in arms:
        assert scores[arm].shape == (n_stream,)
        assert 0.5 < arms[arm]["auc"] < 1 and 0.5 < arms[arm]["known_users_auc"] < 1, (arm, arms[arm])

    # The first shard is served by the batch-trained model in every arm.
    first = slice(0, edges[6][1])
    np.testing.assert_allclose(scores["online N=6"][first], scores["batch-only"][first], atol=1e-6)
    np.testing.assert_allclose(scores["online N=2"][first], scores["batch-only"][first], atol=1e-6)

    # Shard k is scored by the model as it was at sync k-1: a copy rebuilt from
    # that state gives the same scores, and the trainer's later state does not.
    rebuilt = run.make_trainer(0)
    for k in range(1, 6):
        part = slice(edges[6][k], edges[6][k + 1])
        rebuilt.load_state_dict(synced[k - 1])
        np.testing.assert_allclose(scores["online N=6"][part], run.score(rebuilt, shards[6][k]), atol=1e-6)
        rebuilt.load_state_dict(synced[k])
        assert np.abs(run.score(rebuilt, shards[6][k]) - scores["online N=6"][part]).max() > 1e-3
        # and it is newer than the batch-only model
        assert np.abs(scores["online N=6"][part] - scores["batch-only"][part]).max() > 1e-3

    # On a stream of arriving users, syncing more often serves them better.
    assert arms["online N=6"]["auc"] > arms["online N=2"]["auc"] + 0.01
    assert arms["online N=6"]["auc"] > arms["batch-only"]["auc"] + 0.02
    assert arms["online N=6"]["new_users_auc"] > arms["batch-only"]["new_users_auc"] + 0.02


def test_serving_copy_ignores_training_until_the_next_sync():
    data = run.split(arriving_users(3000, seed=2), 0.5)
    shards = run.shard_batches(data.stream, run.shard_edges(data.stream.num_rows, 4), 256)
    trainer, serving = run.make_trainer(0), run.Serving(0)
    trainer.fit(shards[0])
    assert serving.full_sync(trainer) == len(trainer.tables["ids"])
    at_sync = run.score(trainer, shards[3])
    trainer.fit(shards[1])
    trainer.fit(shards[2])
    now = run.score(trainer, shards[3])
    assert np.abs(now - at_sync).max() > 1e-3                      # the trainer moved on ...
    np.testing.assert_array_equal(serving.score(shards[3]), at_sync)  # ... the serving copy did not
    pushed = serving.sync(trainer)
    assert 0 < pushed < len(trainer.tables["ids"])                 # only rows touched since the last sync
    np.testing.assert_array_equal(serving.score(shards[3]), now)
    assert serving.sync(trainer) == 0                              # nothing trained since: nothing to push


def test_main_prints_the_table_for_every_n_and_seed_and_writes_the_plot(runs, monkeypatch, capsys):
    """`--quick` (with fewer shards and a smaller batch) into a run folder; the committed results stay as they are."""
    import monolith_jax.examples.movielens.data
    monkeypatch.setattr(monolith_jax.examples.movielens.data, "load_movielens_1m", lambda: arriving_users(4000, seed=1))
    results = paper_main.main(["--quick", "--seeds", "2", "--shards", "2", "4", "--batch", "256"])
    assert [r["seed"] for r in results] == [0, 1]
    printed = capsys.readouterr().out
    table = printed.split("as the paper's Table 2:")[1].split("\n\n")[0]
    for arm in ("batch-only", "online N=2", "online N=4"):
        assert sum(line.startswith(arm) for line in table.splitlines()) == 1, arm
    per_seed = printed.split("Stream AUC per seed:")[1].split("\n\n")[0].splitlines()
    assert "seed 0" in per_seed[1] and "seed 1" in per_seed[1] and len(per_seed) == 1 + 1 + 3
    assert "run time" in printed
    folder = runs.folder("paper_online", printed)
    written = (folder / "output.txt").read_text()
    assert "as the paper's Table 2:" in written and "online N=4" in written
    assert (folder / "auc_over_time.png").stat().st_size > 10_000
    assert (folder / "results.json").stat().st_size > 0
    assert all(len(r["arms"][a]["tenths"]) == run.SEGMENTS for r in results for a in r["arms"])
