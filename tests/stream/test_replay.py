"""The replayer of any time-stamped log: rows -> features records and
actions, in event-time order, named as the job's features; the joiner's
warning when a stream's actions made no positive."""

import math

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import monolith_jax as mj
from monolith_jax.features import DenseFeature, SparseFeature
from monolith_jax.stream.join_state import JoinConfig
from monolith_jax.stream.joiner import warn_if_unlabelled
from monolith_jax.stream.messages import parse_action, parse_features
from monolith_jax.stream.replay import LogReplay
from monolith_jax.sparse.keys import hash_strings

JOB = mj.Job(
    sparse=[SparseFeature("user", "ids", column="uid"), SparseFeature("tags", "ids", combiner="mean", max_len=3,
                                                                     separator="|")],
    dense=[DenseFeature("price")], tables=[mj.TableConfig("ids", 4)], model=lambda rngs: None,
    labels=mj.LabelRule(positive=("click", "buy")),
    log=mj.LogSpec(time_column="t", request_id_column="rid", actions={"click": "clicked", "buy": "bought"}))

LOG = {"rid": ["a", "b", "c"], "t": [30, 10, 20], "uid": [7, 8, 7], "tags": ["x|y", "", "y"],
       "price": [1.5, None, 3.0], "clicked": [1, 0, 1], "bought": [0.0, 0.0, 25.0]}


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_a_log_becomes_requests_and_actions_in_event_time_order(tmp_path, ext):
    path = tmp_path / f"log.{ext}"
    table = pa.table(LOG)
    (pq.write_table if ext == "parquet" else pcsv.write_csv)(table, str(path))
    r = LogReplay(JOB, str(path))
    msgs = list(r.messages())
    assert [(k, rid, t) for k, rid, _, t in msgs] == [
        ("features", "b", 10_000), ("features", "c", 20_000), ("actions", "c", 21_000), ("actions", "c", 21_000),
        ("features", "a", 30_000), ("actions", "a", 31_000)]
    feats = {rid: parse_features(v) for k, rid, v, _ in msgs if k == "features"}
    a = feats["a"]
    assert {s.name: list(s.ids) for s in a.sparse} == {"uid": [7], "tags": hash_strings(["x", "y"]).tolist()}
    assert [(d.name, d.values[0]) for d in a.dense] == [("price", 1.5)]
    assert [s.name for s in feats["b"].sparse if not s.ids] == ["tags"]  # an empty list, not an absent feature
    assert not feats["b"].dense  # the missing price is left out: the reader's rule decides
    acts = sorted((parse_action(v).type, parse_action(v).value) for k, rid, v, _ in msgs if k == "actions" and rid == "c")
    assert acts == [("buy", 25.0), ("click", 1.0)]
    assert r.counts == {"requests": 3, "click": 2, "buy": 1}


def test_command_line_columns_override_the_job_and_bad_logs_are_named(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({**LOG, "t": [3000, 1000, 2000]}), str(path))
    r = LogReplay(JOB, str(path), time_column="t", time_unit="ms", actions={"click": "clicked"},
                  request_id_column=None, action_delay_s=0.5, limit=2)
    msgs = list(r.messages())
    assert [(k, rid, t) for k, rid, _, t in msgs] == [("features", "b", 1000), ("features", "c", 2000),
                                                      ("actions", "c", 2500)]
    with pytest.raises(KeyError, match=r"lacks columns \['nope'\]"):
        LogReplay(JOB, str(path), actions={"click": "nope"})
    with pytest.raises(ValueError, match="unknown file type"):
        LogReplay(JOB, str(tmp_path / "log.json"))
    bare = mj.Job(sparse=JOB.sparse, dense=JOB.dense, tables=JOB.tables, model=JOB.model)
    with pytest.raises(ValueError, match="time column"):
        LogReplay(bare, str(path))


def test_the_joiner_says_when_no_action_made_a_positive():
    config = JoinConfig(window_s=60, positive_types=("click",), min_value=-math.inf)
    line = warn_if_unlabelled({"actions": 500, "positives": 0, "other_actions": 500}, config)
    assert "no positive" in line and "--positive click" in line and "500 actions of other types" in line
    assert warn_if_unlabelled({"actions": 500, "positives": 3}, config) is None
    assert warn_if_unlabelled({"actions": 0, "positives": 0}, config) is None


@pytest.mark.parametrize("rate", [0.0, 50_000.0])
def test_replay_writes_every_message_to_its_topic_keyed_by_request_and_counts_them(tmp_path, rate):
    """Unpaced (produced and counted a chunk at a time) and paced, a log of
    1,500 requests and their actions lands whole in the topics it names."""
    from monolith_jax.stream import kafka as K
    from monolith_jax.stream.replay import replay
    from tests.stream.kafka_util import read_topic

    n = 1_500
    log = {"rid": [f"q{i}" for i in range(n)], "t": list(range(n)), "uid": [i % 37 for i in range(n)],
           "tags": ["x|y" if i % 2 else "z" for i in range(n)], "price": [float(i) for i in range(n)],
           "clicked": [int(i % 3 == 0) for i in range(n)], "bought": [float(i % 7 == 0) for i in range(n)]}
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table(log), str(path))
    msgs = list(LogReplay(JOB, str(path)).messages())
    topics = {"features": "f-in", "actions": "a-in"}
    with K.EmbeddedKafka() as kafka:
        K.ensure_topics(kafka.bootstrap, {t: 2 for t in topics.values()})
        counts = replay(kafka.bootstrap, LogReplay(JOB, str(path)), topics, report_every_s=0, rate=rate)
        got = {kind: sorted((m.key().decode(), m.value()) for m in read_topic(kafka.bootstrap, topic))
               for kind, topic in topics.items()}
        with pytest.raises(KeyError, match="clicks"):  # a kind with no topic is refused, not guessed
            replay(kafka.bootstrap, [("clicks", "q1", b"v", 0)], topics, report_every_s=0, rate=rate)
    want = {kind: sorted((rid, v) for k, rid, v, _ in msgs if k == kind) for kind in topics}
    assert got == want
    assert counts["features"] == n and counts["actions"] == len(want["actions"]) == len(range(0, n, 3)) + len(range(0, n, 7))
