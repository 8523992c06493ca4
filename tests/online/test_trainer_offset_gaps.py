"""The online trainer counts the examples the cluster's retention deleted
before it read them (offsets_lost), in its reports, its summary and its
snapshots (a resumed trainer goes on from the count); a normal run counts
none. On the shop job."""

import json

import numpy as np

from monolith_jax.online.trainer import OnlineTrainer
from monolith_jax.snapshot import Snapshots
from monolith_jax.stream import kafka as K
from monolith_jax.stream.messages import encode_example, encode_features
from tests.jobs import shop
from tests.stream.kafka_util import commit_offsets, low_watermark, producer

OVER_RETENTION = 9000  # examples of ~1 KB, all in partition 0: more than the embedded cluster keeps of it
MORE = 300             # produced after the first run, read by the trainer resumed from its snapshot


def shop_examples(n):
    rng = np.random.default_rng(0)
    for i in range(n):
        rec = encode_features(f"q{i}", 1_000 + i, {"user": [int(rng.integers(0, 50))], "item": [i % 31],
                                                   "category": [i % 5], "recent_items": list(range(200))},
                              {"price": 10.0})
        yield f"q{i}", encode_example(rec, float(i % 3 == 0), 1.0, 2_000 + i)


def run(bootstrap, group, reports, snapshots=None):
    online = OnlineTrainer(shop.job.make_trainer(0, log_every=0), bootstrap, group=group, batch_size=256,
                           max_wait_s=0.05, prequential=False, out=reports.append, snapshots=snapshots)
    return online.run(idle_timeout_s=2.0, max_seconds=120, report_every_s=0.2)


def test_the_trainer_reports_the_examples_it_lost_to_retention_and_a_normal_run_none(tmp_path):
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        commit_offsets(bs, "behind", "examples", {p: 0 for p in range(K.EMBEDDED_PARTITIONS)})
        prod = producer(bs)
        for k, (rid, value) in enumerate(shop_examples(OVER_RETENTION)):
            prod.produce("examples", value, rid, partition=0)
            if k % 1000 == 0:
                prod.poll(0)
        assert prod.flush(30) == 0
        low = low_watermark(bs, "examples", 0)
        reports, fresh_reports = [], []
        behind = run(bs, "behind", reports, Snapshots(str(tmp_path), every_s=None, every_steps=4))
        for rid, value in list(shop_examples(OVER_RETENTION + MORE))[OVER_RETENTION:]:
            prod.produce("examples", value, rid, partition=0)
        assert prod.flush(30) == 0
        resumed = run(bs, "behind", [], Snapshots(str(tmp_path), every_s=None, every_steps=4))
        kept = low_watermark(bs, "examples", 0)
        fresh = run(bs, "fresh", fresh_reports)  # a new group reads what is kept: nothing lost to it
    assert 0 < low < OVER_RETENTION
    assert behind["examples"] == OVER_RETENTION - low and behind["dead_letters"] == 0
    assert behind["offsets_lost"] == low and behind["offsets_skipped"] == 0
    last = json.loads(reports[-1].removeprefix("trainer "))
    assert last["offsets_lost"] == low
    # From the snapshot's offsets on: the new examples, and no gap at the resume.
    assert resumed["resumed_from"] and resumed["examples"] == behind["examples"] + MORE
    assert resumed["offsets_lost"] == low and resumed["offsets_skipped"] == 0
    assert fresh["examples"] == OVER_RETENTION + MORE - kept
    assert fresh["offsets_lost"] == fresh["offsets_skipped"] == 0
    assert all(json.loads(r.removeprefix("trainer "))["offsets_lost"] == 0 for r in fresh_reports)
