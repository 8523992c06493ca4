"""Online training of a job with several heads: version-2 examples (a label
per head) from the examples topic, per-head prequential metrics, the
per-head negative rates serving corrects for, and version-1 examples
dead-lettered with the head they lack."""

import zlib

import numpy as np

from monolith_jax.online.trainer import OnlineTrainer
from monolith_jax.stream import kafka as K
from monolith_jax.stream.messages import encode_example, encode_features
from tests.jobs import shop_tasks
from tests.stream.kafka_util import producer, read_topic


def examples_of(cols: dict, buy_rate: float = 1.0):
    """(request id, v2 Example) per row of a shop_tasks log: click always
    defined, buy only where clicked; negatives of buy carry `buy_rate`."""
    for k, rid in enumerate(cols["request"]):
        rec = encode_features(rid, int(cols["ts"][k]) * 1000,
                              {"user": [int(cols["user"][k])], "item": [int(cols["item"][k])],
                               "category": [zlib.crc32(cols["category"][k].encode())],
                               "recent_items": [int(x) for x in cols["recent_items"][k]]},
                              {"price": float(cols["price"][k] or 0.0)})
        bought = cols["bought"][k]
        labels = [("click", float(cols["clicked"][k]), 1.0, False),
                  ("buy", float(bought or 0), buy_rate if not bought else 1.0, bought is None)]
        yield rid, encode_example(rec, 0.0, 0.0, int(cols["ts"][k]) * 1000 + 1000, labels=labels)


def test_a_two_head_job_trains_online_with_metrics_and_rates_per_head(tmp_path):
    cols = shop_tasks.make_log(str(tmp_path / "log.parquet"), n=6000, users=60, items=60)
    trainer = shop_tasks.job.make_trainer(metrics_path=str(tmp_path / "metrics.jsonl"))
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        prod = producer(bs)
        for rid, value in examples_of(cols, buy_rate=0.5):
            prod.produce("examples", value, rid)
        v1 = encode_example(encode_features("old", 1, {"user": [1], "item": [2], "category": [], "recent_items": []},
                                            {"price": 1.0}), 1.0, 1.0, 2)
        prod.produce("examples", v1, "old")
        assert prod.flush(30) == 0
        online = OnlineTrainer(trainer, bs, group="heads", batch_size=256, max_wait_s=0.05,
                               out=lambda *a, **k: None)
        summary = online.run(idle_timeout_s=2.0, max_seconds=120, report_every_s=0.5)
        dead = read_topic(bs, "dead-letters")
    clicked = int(np.sum(cols["clicked"]))
    assert summary["examples"] == 6000 and summary["dead_letters"] == 1
    assert [dict(m.headers())["reason"].decode() for m in dead] == ["example lacks the label of head(s) 'click'"]
    heads = summary["heads"]
    assert heads["click"]["examples"] == 6000 and heads["buy"]["examples"] == clicked
    assert heads["click"]["auc"] > 0.6 and heads["buy"]["auc"] > 0.5
    assert summary["stream_auc"] == heads["click"]["auc"] or abs(summary["stream_auc"] - heads["click"]["auc"]) < 1e-3
    assert online.negative_rate == {"click": 1.0, "buy": 0.5}
    import json

    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    online_lines = [x for x in lines if x.get("event") == "online"]
    assert online_lines and set(online_lines[-1]["heads"]) == {"click", "buy"}
