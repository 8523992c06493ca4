"""The collisionless-vs-hashing experiment end to end on tiny synthetic ratings."""

import numpy as np

from experiments.collisionless import run
from tests.experiments.test_memory_control import _tiny_ratings


def _with_side_info(r):
    import dataclasses
    users, items = int(r.user.max()) + 1, int(r.item.max()) + 1
    rng = np.random.default_rng(0)
    return dataclasses.replace(
        r, user_age=rng.integers(1, 60, users).astype(np.int32), user_gender=rng.integers(0, 2, users).astype(np.int32),
        user_occupation=rng.integers(0, 20, users).astype(np.int32), item_year=rng.integers(1950, 2000, items).astype(np.int32),
        item_genres=np.array([" ".join(rng.choice(["Drama", "Comedy", "War"], 2)) for _ in range(items)]))


def test_tiny_run_of_both_arms_and_the_speed_check():
    r = _with_side_info(_tiny_ratings(n=4000))
    test = run.split_by_user(r)
    assert 0.15 < test.mean() < 0.3
    for arm in (run.Arm("collisionless"), run.Arm("hashed", 50, 30)):
        t = run.records(r, arm)
        aucs = run.run_arm(arm, t.filter(~test), run.batches(t.filter(test), 512), epochs=2, batch=256, seed=0)
        assert len(aucs) == 2 and all(0.5 < a <= 1 for a in aucs)
    sp = run.speed(run.records(r, run.Arm("c")).filter(~test), 256, 5, buckets=1 << 12)
    assert sp["collisionless"] > 0 and sp["static_embed"] > 0


def test_bucket_sizing_matches_the_measured_collision_rate():
    keys = np.random.default_rng(0).integers(0, 2**63, 6040, dtype=np.uint64)
    m = run.buckets_for(keys.size, 0.077)
    assert abs(run.collision_rate(keys, m) - 0.077) < 0.015
