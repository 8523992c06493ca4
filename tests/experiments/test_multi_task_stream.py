"""The two-task stream experiment end to end, short: a shop log through
replay -> join -> a two-head and two single-task online trainers on one
examples topic, and the predictor's per-head scores against the trainer's."""

import json

from experiments.multi_task_stream import main as M


def test_a_short_round_trains_every_model_on_every_example_and_serves_per_head(runs, capsys):
    assert M.main(["--seeds", "1", "--requests", "1500"]) == 0
    printed = capsys.readouterr().out
    folder = runs.folder("multi_task_stream", printed)
    (round_,) = json.loads((folder / "shop-rounds.json").read_text())
    joined = round_["joined"]
    assert joined["features"] == 1500 and joined["dead_letters"] == 0
    assert round_["trained"] == {"multi": 1500, "click only": 1500, "buy only": 1500}   # every joined example, by each
    assert joined["click:positives"] == round_["clicked"] and joined["buy:positives"] == round_["bought"]
    assert round_["multi"]["buy"]["examples"] == round_["single"]["buy only"]["examples"] == round_["clicked"]
    for head in ("click", "buy"):
        assert 0.0 <= round_["multi"][head]["auc"] <= 1.0 and 0.0 <= round_["single"][f"{head} only"]["auc"] <= 1.0
        assert round_["served_vs_own_max_abs_diff"][head] < 1e-4 and round_["served_std"][head] > 0.0
    assert "two heads - click only" in printed and "two heads - buy only" in printed and "max |diff|" in printed
    assert (folder / "shop-report.txt").read_text().startswith("two-task stream, shop")
