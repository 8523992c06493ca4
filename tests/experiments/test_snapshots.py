"""The snapshot experiment, small, through its command line (a run folder;
the committed results stay as they are): sizes and times are measured,
and a failure with a long snapshot interval loses updates a short one
keeps."""

import json

import numpy as np

from experiments.snapshots import main as snap_main
from tests.examples.streams import synthetic_ratings


def test_size_time_measures_snapshot_and_its_floor(runs, capsys):
    (r,) = snap_main.main(["--part", "size", "--rows", "5000", "--restart-wait-s", "0.1"])["size"]
    assert r["rows"] == 5000 and r["bytes"] > 5000 * 16 * 4 * 0.5 and r["np_bytes"] > 0
    assert r["save_s"] >= r["save_blocking_s"] > 0 and r["restore_s"] > 0
    assert r["restarted_first_save_blocking_s"] > 0 and r["restarted_first_save_blocking_s_fresh_pages"] > 0
    assert r["growing_third_save_blocking_s"] > 0 and r["growing_third_save_blocking_s_fresh_pages"] > 0
    folder = runs.folder("snapshots", capsys.readouterr().out)
    assert set(json.loads((folder / "results.json").read_text())) == {"size"}


def test_reliability_counts_what_each_interval_loses(runs, monkeypatch, capsys):
    import monolith_jax.examples.movielens.data as data

    monkeypatch.setattr(data, "load_movielens_1m",
                        lambda: synthetic_ratings(12_000, users=800, items=200, seed=6, days=60))
    r = snap_main.main(["--part", "reliability", "--intervals", "1", "100000", "--batch", "512"])["reliability"]
    short, long_ = r["runs"]
    assert len(r["failures_at_batch"]) == 3
    assert short["examples_lost"] < long_["examples_lost"]
    assert np.isfinite(r["baseline"]["auc_after_first_failure"]) and np.isfinite(long_["auc_lost"])
    folder = runs.folder("snapshots", capsys.readouterr().out)
    assert set(json.loads((folder / "results.json").read_text())) == {"reliability"}


def test_throughput_runs_full_and_incremental_snapshots_beside_none(runs, monkeypatch, capsys):
    import monolith_jax.examples.movielens.data as data

    monkeypatch.setattr(data, "load_movielens_1m",
                        lambda: synthetic_ratings(6_000, users=400, items=150, seed=6, days=30))
    r = snap_main.main(["--part", "throughput", "--rounds", "1", "--passes", "3", "--every-s", "0.05",
                        "--full-every", "3", "--batch", "512"])["throughput"]
    assert r["none"]["snapshots"] == 0 and r["none"]["cost"] == 0
    assert r["full"]["snapshots"] > 0 and r["full"]["deltas"] == 0
    assert r["incremental"]["deltas"] > 0
    assert all(r[k]["examples_per_s"] > 0 for k in ("none", "full", "incremental"))
    folder = runs.folder("snapshots", capsys.readouterr().out)
    assert set(json.loads((folder / "results.json").read_text())) == {"throughput"}
