"""The snapshot experiment, small: sizes and times are measured, and a
failure with a long snapshot interval loses updates a short one keeps."""

import numpy as np

from experiments.snapshots import run
from tests.examples.streams import synthetic_ratings


def test_size_time_measures_snapshot_and_its_floor():
    (r,) = run.size_time((5000,), out=lambda *a: None)
    assert r["rows"] == 5000 and r["bytes"] > 5000 * 16 * 4 * 0.5 and r["np_bytes"] > 0
    assert r["save_s"] >= r["save_blocking_s"] > 0 and r["restore_s"] > 0


def test_reliability_counts_what_each_interval_loses():
    ratings = synthetic_ratings(12_000, users=800, items=200, seed=6, days=60)
    r = run.reliability(ratings, intervals_min=(1, 100_000), batch=512, out=lambda *a: None)
    short, long_ = r["runs"]
    assert len(r["failures_at_batch"]) == 3
    assert short["examples_lost"] < long_["examples_lost"]
    assert np.isfinite(r["baseline"]["auc_after_first_failure"]) and np.isfinite(long_["auc_lost"])
