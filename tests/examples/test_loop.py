"""The main job (replay -> joiner process -> online trainer) on the embedded cluster."""

import numpy as np

from monolith_jax.examples.movielens import replay as R
from monolith_jax.examples.movielens.loop import run_loop
from tests.examples.streams import synthetic_ratings


def test_loop_trains_every_joined_example_and_reports_prequential_auc():
    ratings = synthetic_ratings(4000, seed=3)
    lines = []
    s = run_loop(ratings=ratings, batch_size=256, out=lambda *a, **k: lines.append(" ".join(map(str, a))),
                 report_every_s=1.0)
    j = s["joined"]
    assert j["positives"] == int(np.sum(ratings.rating >= R.MIN_VALUE))
    assert j["late_actions"] == j["orphan_actions"] == j["dead_letters"] == 0
    assert s["examples"] == j["positives"] + j["negatives"]
    assert s["replayed"]["actions"] == 4000
    assert len(s["segment_aucs"]) == 10 and np.isfinite(s["stream_auc"])
    assert s["stream_auc"] > 0.55, "the model learns from the stream as it goes"
    assert any(line.startswith("embedded Kafka cluster") for line in lines)
