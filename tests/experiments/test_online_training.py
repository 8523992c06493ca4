"""The online-training experiment end to end on a small synthetic stream."""

import numpy as np

from experiments.online_training import run
from tests.examples.streams import synthetic_ratings


def test_throughput_rounds_compare_kafka_and_files():
    t = run.throughput(synthetic_ratings(3000), n_examples=2000, batch=256, rounds=1, passes=1, out=lambda *a: None)
    assert t["median"]["kafka"] > 0 and t["median"]["file"] > 0 and t["ratio"] > 0


def test_stream_scores_online_and_frozen_models_on_the_same_examples(tmp_path):
    s = run.stream(synthetic_ratings(4000, seed=4), out=lambda *a, **k: None)
    assert s["frozen_at_example"] > 0
    assert np.isfinite(s["online_after_freeze"]) and np.isfinite(s["frozen_after_freeze"])
    assert len(s["online_segments"]) == 10
    run.plot(s, str(tmp_path / "auc.png"))
    assert (tmp_path / "auc.png").stat().st_size > 0
