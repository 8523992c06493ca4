"""The sync-interval experiment end to end, short, on a synthetic stream:
every request is scored by the serving model before its action exists, a
shorter interval syncs more often, the frozen arm's rows never move, and
the touched-row fan-out hands every pusher exactly its rows."""

import json

import numpy as np

from experiments.sync_interval import main as si_main
from experiments.sync_interval import run
from experiments.sync_interval.trainer import TouchedFanout
from monolith_jax.sparse import SGD, TableConfig, Zeros
from monolith_jax.sparse.table import EmbeddingTable
from tests.examples.streams import synthetic_ratings


def test_fanout_gives_each_view_the_rows_touched_since_its_own_drain():
    table = EmbeddingTable(TableConfig("ids", 2, Zeros(), SGD(1.0)))
    fan = TouchedFanout(table)
    fast, slow = fan.view("fast"), fan.view("slow")
    table.assign(np.array([1, 2], np.uint64), np.array([[1, 1], [2, 2]], np.float32))   # created: touched
    keys, values = fast.drain_touched()
    assert sorted(keys.tolist()) == [1, 2]
    table.apply_gradients_host(np.array([2], np.uint64), np.full((1, 2), -3.0, np.float32))   # 2 -> 5
    table.assign(np.array([3], np.uint64), np.full((1, 2), 3.0, np.float32))
    keys, values = fast.drain_touched()
    assert sorted(keys.tolist()) == [2, 3]
    keys, values = slow.drain_touched()          # everything since its start; key 2 at its newest value
    got = dict(zip(keys.tolist(), values[:, 0].tolist()))
    assert got == {1: 1.0, 2: 5.0, 3: 3.0} and keys.size == 3
    assert slow.drain_touched()[0].size == 0 and fast.drain_touched()[0].size == 0
    fan.release("slow")
    table.assign(np.array([4], np.uint64), np.ones((1, 2), np.float32))
    assert fast.drain_touched()[0].tolist() == [4]


def test_live_loop_scores_with_each_arms_serving_model_before_the_action(runs, monkeypatch, capsys):
    """The short look (`--repeats 1`, a shorter window, two arms) through the command line, into a run
    folder; the committed results stay as they are."""
    import monolith_jax.examples.movielens.data as data

    ratings = synthetic_ratings(16_000, users=1500, items=250, seed=3, days=30)
    monkeypatch.setattr(data, "load_movielens_1m", lambda: ratings)
    start = 8_000
    seconds = 8.0
    speed = float(ratings.timestamp[-1] - ratings.timestamp[start]) / seconds
    res = si_main.main(["--intervals", "0.5", "3", "--repeats", "1", "--start", str(start), "--warmup", str(start),
                        "--seconds", str(seconds), "--speed", repr(speed)])
    rep = res["repeats"][0]
    arms = rep["arms"]
    assert list(arms) == ["every0.5s", "every3s", "frozen"]
    # Scored at request time: before the action (or the joiner's example) existed.
    req = rep["requests"]
    acted = np.isfinite(req["t_action"])
    assert acted.sum() > 1000 and np.all(req["t_score"][acted] < req["t_action"][acted])
    assert rep["scored_before_action"]["before"] == rep["scored_before_action"]["actions"] == acted.sum()
    assert rep["scored_before_label"]["before"] == rep["scored_before_label"]["labelled"] == rep["labelled"] > 1000
    assert rep["requests_scored"] == rep["messages"]["paced_requests"] == len(req["rids"])
    # A shorter interval syncs more; the frozen arm never syncs after its copy.
    assert arms["every0.5s"]["syncs"] > arms["every3s"]["syncs"] >= 1 and arms["frozen"]["syncs"] == 0
    assert arms["every0.5s"]["rows_pushed"] > arms["every3s"]["rows_pushed"] > 0
    f = rep["frozen"]["frozen"]
    assert f["rows_found"] > 100 and f["rows_unchanged"] and f["pushes_applied"] == [1, 1] and f["dense_unchanged"]
    # The frozen arm misses more ids than the online arms.
    assert arms["frozen"]["unknown_share"] > arms["every0.5s"]["unknown_share"]
    for a in arms.values():
        assert 0.5 < a["auc"] < 1.0
        assert all(np.isnan(t) or 0.0 <= t <= 1.0 for t in a["tenths"]) and len(a["tenths"]) == run.SEGMENTS
    rows = run.summary_rows(res)
    assert [r["name"] for r in rows] == ["every0.5s", "every3s", "frozen", "trainer"]
    lines = run.table_lines(res)
    assert [ln.split()[0] for ln in lines[2:6]] == ["sync", "sync", "frozen", "trainer"]
    assert len(run.check_lines(res)) == 4 and len(run.ids_lines(res)) == 3
    assert rep["joiner"]["dead_letters"] == 0 and rep["joiner"]["positives"] > 0
    folder = runs.folder("sync_interval", capsys.readouterr().out)
    assert (folder / "auc_by_interval.png").stat().st_size > 0
    assert "AUC of the serving model's scores" in (folder / "output.txt").read_text()
    written = json.loads((folder / "results.json").read_text())
    assert [r["name"] for r in written["summary"]] == ["every0.5s", "every3s", "frozen", "trainer"]
