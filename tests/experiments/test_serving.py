"""The serving benchmark end to end, short, on a synthetic stream, through
its command line (the short variant, into a run folder): every probe is
served, the sync carries only touched rows, the predictor answers with and
without a sync load, holding the tables itself (one hop, 0.5 s syncs), and
the committed results are untouched."""

import json

import numpy as np
import pytest

from experiments.serving import main as serving_main
from experiments.serving import run
from tests.examples.streams import synthetic_ratings


def test_short_variant_serves_every_probe_into_a_run_folder(runs, monkeypatch, capsys):
    import monolith_jax.examples.movielens.data as data

    monkeypatch.setattr(data, "load_movielens_1m", lambda: synthetic_ratings(20_000, users=2000, items=300, seed=3))
    # One setup (the one-hop predictor at 0.5 s syncs): a second live loop
    # would double the test's minutes for the same code; the two-hop path
    # is served end to end by the shop job's stream test.
    results = serving_main.main(["--rate", "800", "--seconds", "14", "--probe-every", "0.5", "--warmup", "4",
                                 "--serving-seconds", "1", "--setups", "one-hop:0.5"])
    assert sorted(results) == ["embedded/one-hop-0.5s"]
    check_run(results["embedded/one-hop-0.5s"], one_hop=True)
    printed = capsys.readouterr().out
    assert "freshness, action produced -> prediction uses the trained row" in printed
    folder = runs.folder("serving", printed)
    saved = json.loads((folder / "results.json").read_text())
    assert saved["embedded/one-hop-0.5s"]["freshness_s"]["n"] == results["embedded/one-hop-0.5s"]["freshness_s"]["n"]


def check_run(r, one_hop):
    assert r["one_hop"] is one_hop and r["sync_interval_s"] == (0.5 if one_hop else 1.0)
    f = r["freshness_s"]
    assert r["trained"]["examples"] > 0
    assert r["produced"]["probes"] >= 15 and r["missed_probes"] == 0 and f["n"] == r["produced"]["probes"]
    assert 0 < f["p50"] <= f["p99"] < 30
    assert r["stages_s"]["example"]["n"] == f["n"]
    c = r["sync_cost"]
    assert c["pushes"] > 3 and c["over_touched_total"] <= 1.2 and c["share_of_full_copy_median"] <= 1.0
    # One hop: the trainer's first pushes may find the predictor still compiling (its port opens after).
    assert r["trained"]["sync"]["failures"] <= (5 if one_hop else 0) and r["trained"]["sync"]["dense_pushes"] >= 1
    served = r["serving"]
    for key in ("no_syncs/batch1", "no_syncs/batch256", "syncs/batch1", "syncs/batch256"):
        assert served[key]["requests"] > 0 and np.isfinite(served[key]["p99"])
    assert served["sync_load"] in (0, -15)  # it ran until told to stop


def test_a_run_that_served_nothing_says_so():
    logs = {"trainer": ["trainer done {...}\n"], "joiner": []}
    why = run.nothing_served({"examples": 0, "seconds": 8.2}, {"messages": 1200, "probes": 3, "seconds": 14.0},
                             0, 3, logs)
    assert "the trainer trained no example" in why and "1,200 messages" in why and "trainer done" in why
    why = run.nothing_served({"examples": 900, "seconds": 20.0}, {"messages": 1200, "probes": 3, "seconds": 14.0},
                             0, 3, logs)
    assert "no probe was served (3 of 3 probes missed)" in why
    assert run.nothing_served({"examples": 900}, {"probes": 3}, 3, 0, logs) is None


def test_the_command_line_stops_with_the_reason_not_a_key_error(runs, monkeypatch):
    import monolith_jax.examples.movielens.data as data

    def served_nothing(*a, **k):
        raise run.NothingServed("the live loop measured no freshness: the trainer trained no example")

    monkeypatch.setattr(data, "load_movielens_1m", lambda: synthetic_ratings(100))
    monkeypatch.setattr(run, "freshness", served_nothing)
    with pytest.raises(SystemExit, match=r"experiments.serving \(embedded broker\): .*trained no example"):
        serving_main.main(["--seconds", "5"])


def test_report_prints_dashes_where_nothing_was_measured(capsys):
    empty = {"n": 0}
    r = {"freshness_s": empty, "missed_probes": 2, "stages_s": {"example": empty, "example_to_served": empty},
         "sync_cost": {"pushes": 0}, "cores_used": {},
         "trained": {"examples": 0, "sync": {"pushes": 1, "full_copies": 1, "dense_pushes": 1, "failures": 0}}}
    serving_main.report(r, 1.0)
    out = capsys.readouterr().out
    assert "p50 -" in out and "no delta push carried rows" in out
