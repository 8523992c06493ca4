"""The serving benchmark end to end, short, on a synthetic stream: every
probe is served, the sync carries only touched rows, the predictor answers
with and without a sync load."""

import numpy as np

from experiments.serving import run
from tests.examples.streams import synthetic_ratings


def test_freshness_sync_cost_and_serving_on_a_short_stream():
    ratings = synthetic_ratings(20_000, users=2000, items=300, seed=3)
    served = {}

    def serve_phase(ps_port, pred_port, trained):
        rows = int(run.sync_cost(trained["sync_history"])["rows_per_sync_median"])
        served.update(run.serving(ratings, ps_port, pred_port, max(rows, 1), seconds=1.0, out=lambda *a: None))
        return served

    r = run.freshness(ratings, rate=800, seconds=14, probe_every_s=0.5, warmup_s=4, out=lambda *a, **k: None,
                      keep_serving=serve_phase)
    f = r["freshness_s"]
    assert r["produced"]["probes"] >= 15 and r["missed_probes"] == 0 and f["n"] == r["produced"]["probes"]
    assert 0 < f["p50"] <= f["p99"] < 30
    assert r["stages_s"]["example"]["n"] == f["n"]
    c = r["sync_cost"]
    assert c["pushes"] > 3 and c["over_touched_total"] <= 1.2 and c["share_of_full_copy_median"] <= 1.0
    assert r["trained"]["sync"]["failures"] == 0 and r["trained"]["sync"]["dense_pushes"] >= 1
    for key in ("no_syncs/batch1", "no_syncs/batch256", "syncs/batch1", "syncs/batch256"):
        assert served[key]["requests"] > 0 and np.isfinite(served[key]["p99"])
    assert served["sync_load"] in (0, -15)  # it ran until told to stop
