"""The online-training experiment end to end on a small synthetic stream,
each part through its command line (a run folder; the committed results
stay as they are)."""

import json

import numpy as np

from experiments.online_training import main as ot_main
from tests.examples.streams import synthetic_ratings


def _data(monkeypatch, ratings):
    import monolith_jax.examples.movielens.data as data

    monkeypatch.setattr(data, "load_movielens_1m", lambda: ratings)


def test_throughput_rounds_compare_kafka_and_files(runs, monkeypatch, capsys):
    _data(monkeypatch, synthetic_ratings(3000))
    t = ot_main.main(["--part", "throughput", "--examples", "2000", "--batch", "256", "--rounds", "1",
                      "--passes", "1"])["throughput"]
    assert t["median"]["kafka"] > 0 and t["median"]["file"] > 0 and t["ratio"] > 0
    folder = runs.folder("online_training", capsys.readouterr().out)
    assert set(json.loads((folder / "results.json").read_text())) == {"throughput"}


def test_stream_scores_online_and_frozen_models_on_the_same_examples(runs, monkeypatch, capsys):
    _data(monkeypatch, synthetic_ratings(4000, seed=4))
    s = ot_main.main(["--part", "stream"])["stream"]
    assert s["frozen_at_example"] > 0
    assert np.isfinite(s["online_after_freeze"]) and np.isfinite(s["frozen_after_freeze"])
    assert len(s["online_segments"]) == 10
    folder = runs.folder("online_training", capsys.readouterr().out)
    assert (folder / "prequential_auc.png").stat().st_size > 0
    assert json.loads((folder / "results.json").read_text())["stream"]["examples"] == s["examples"]


def test_replay_part_times_both_writers_of_the_same_messages(runs, monkeypatch, capsys):
    _data(monkeypatch, synthetic_ratings(2000, seed=2))
    e = ot_main.main(["--part", "replay", "--rounds", "1"])["replay"]  # it stops unless both write the same bytes
    assert e["messages"] > 4000 and set(e["median_us"]) == {"protobuf objects", "field by field"}
    assert all(v > 0 for v in e["median_us"].values())
    folder = runs.folder("online_training", capsys.readouterr().out)
    assert set(json.loads((folder / "results.json").read_text())) == {"replay"}
