"""The scale-out benchmark, small, through its command line (a run folder;
the committed results stay as they are): it measures the local table and
sharded tables, and estimates."""

import json

from experiments.scale_out import main as so_main


def test_throughput_and_estimate(runs, capsys):
    r, e = so_main.main(["--shards", "1", "2", "--dim", "8", "--batch-ids", "2048", "--steps", "4"])
    assert r["local"]["ids_per_s"] > 0 and r["shards_1"]["ids_per_s"] > 0 and r["shards_2"]["vs_local"] > 0
    assert "shards_4" not in r
    assert e["machines_for_memory"] > 1 and e["shards_for_target"] >= 1
    folder = runs.folder("scale_out", capsys.readouterr().out)
    assert json.loads((folder / "results.json").read_text())["estimate"] == e
