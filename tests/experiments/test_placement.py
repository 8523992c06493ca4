"""The placement benchmark, small, through its command line (a run folder;
the committed results stay as they are), and the accelerator script with
the CPU standing in for the accelerator."""

import json

from experiments.placement import accelerator, main as pl_main


def test_the_arms_and_the_host_phases(runs, capsys):
    r = pl_main.main(["--batch", "256", "--hidden", "32", "--rounds", "2", "--steps", "3"])
    assert set(r["examples_per_s"]) == {"in_jit", "host_overlap", "host_plain", "plain_donated", "plain_packed",
                                        "plain_both"}
    assert all(len(v) == 2 and min(v) > 0 for v in r["examples_per_s_rounds"].values())
    for arm in ("host_overlap", "host_plain", "plain_both"):
        assert r["ms_per_step"][arm]["lookup"] > 0 and r["ms_per_step"][arm]["apply"] > 0
    assert r["dense_step_alone_ms"] > 0
    printed = capsys.readouterr().out
    assert "x the in-jit step" in printed and "ms per step" in printed
    folder = runs.folder("placement", printed)
    assert json.loads((folder / "results.json").read_text())["examples_per_s"] == r["examples_per_s"]


def test_the_accelerator_script_runs_with_the_cpu_standing_in():
    lines = []
    r = accelerator.main(["--batch", "128", "--hidden", "16", "--rounds", "1", "--steps", "2"], out=lines.append)
    assert r["stand_in"] and r["accelerator"] == "cpu" and r["cpu_placement"] == "in_jit"
    assert r["accelerator_examples_per_s"] > 0 and r["cpu_examples_per_s"] > 0
    assert "cpu" in r["export_platforms"]
    assert "the CPU stands in for it" in lines[0]
    assert any("exported model" in line for line in lines)
