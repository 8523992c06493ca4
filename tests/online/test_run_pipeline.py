"""run_pipeline, the in-process launcher (replay thread -> joiner process ->
online trainer), on the shop job: the trainer is compiled and the joiner's
partitions assigned before the replay starts, every joined example is
trained once, and a joiner that dies at its start is named with its output
rather than waited on."""

import sys

import numpy as np
import pytest

from monolith_jax.online import pipeline
from monolith_jax.stream.replay import LogReplay
from tests.jobs import shop


def test_the_pipeline_trains_every_example_the_joiner_made_of_a_shop_log(tmp_path):
    path = str(tmp_path / "log.parquet")
    cols = shop.make_log(path, n=3000)
    lines = []
    s = pipeline.run_pipeline(shop.job, LogReplay(shop.job, path), batch_size=128, report_every_s=0,
                              out=lambda *a, **k: lines.append(" ".join(map(str, a))))
    j = s["joined"]
    assert s["replayed"]["features"] == 3000 and s["replayed"]["actions"] == int(np.sum(cols["clicked"]))
    assert j["positives"] == int(np.sum(cols["clicked"])) and j["dead_letters"] == 0
    assert s["examples"] == j["positives"] + j["negatives"] and s["offsets_lost"] == 0
    assert s["online"].warmup_s is not None          # compiled before its first example
    assert np.isfinite(s["stream_auc"])


def test_a_joiner_that_exits_before_its_partitions_are_assigned_is_named_with_its_output(tmp_path, monkeypatch):
    path = str(tmp_path / "log.parquet")
    shop.make_log(path, n=200)
    monkeypatch.setattr(pipeline, "joiner_command", lambda *a, **k: [
        sys.executable, "-c", "print('joiner: no such topic (a test)'); raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match=r"(?s)exited before its partitions were assigned.*no such topic"):
        pipeline.run_pipeline(shop.job, LogReplay(shop.job, path), batch_size=128, report_every_s=0,
                              out=lambda *a, **k: None)
