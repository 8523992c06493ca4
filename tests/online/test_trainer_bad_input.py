"""No message stops the online trainer: every one is trained or
dead-lettered (with its reason; a too large one truncated, with its size),
and a restart on the same group finds nothing left to read."""

import numpy as np
import pytest

from monolith_jax.examples.movielens.loop import movielens_trainer
from monolith_jax.examples.movielens.replay import movielens_features
from monolith_jax.online.trainer import OnlineTrainer
from monolith_jax.stream import kafka as K
from monolith_jax.stream.messages import encode_example, encode_features
from tests.stream.kafka_util import producer, read_topic

N = 300


def valid_examples(n):
    none = {f.source: [] for f in movielens_features()}  # a record carries every feature the job reads
    rng = np.random.default_rng(0)
    for i in range(n):
        f = encode_features(f"q{i}", 1_000 + i, {**none, "user": [int(rng.integers(0, 50))], "movie": [i % 17]})
        yield f"q{i}", encode_example(f, float(i % 3 == 0), 1.0, 2_000 + i)


def run(bootstrap, group, max_seconds=120):
    online = OnlineTrainer(movielens_trainer(dim=4, hidden=(8,), out=lambda *a, **k: None), bootstrap,
                           group=group, batch_size=64, max_wait_s=0.05, prequential=False, out=lambda *a, **k: None)
    return online.run(idle_timeout_s=2.0, max_seconds=max_seconds, report_every_s=0)


DEEP = b"[" * 100_000 + b"]" * 100_000
BAD = {
    # JSON nested past Python's recursion limit (RecursionError), and other shapes.
    "deep": {"deep-json": (b'{"features": ' + DEEP + b"}", "unreadable examples"),
             "deep-batch": (b'{"examples": [' + DEEP + b"]}", "unreadable examples"),
             "json-list": (b'{"examples": [1, 2]}', "unreadable examples"),
             "truncated": (next(valid_examples(1))[1][:-4], "not protobuf")},
    # Over 1 MB: their dead letters would be over the producer's limit.
    "large": {"big-junk": (b"\x08\x01" + b"\xff" * 1_500_000, "not protobuf"),
              "big-json": (b'{"features": "' + b"a" * 1_500_000 + b'"}', "unreadable examples")},
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_no_message_stops_training_and_each_is_trained_or_dead_lettered(kind):
    bad = BAD[kind]
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        prod = producer(bs, **{"message.max.bytes": 5_000_000})  # a producer that may send what ours cannot
        for k, (rid, value) in enumerate(valid_examples(N)):
            prod.produce("examples", value, rid)
            if k % 50 == 0:  # one bad message among every 50 good ones
                for key, (junk, _) in list(bad.items())[k // 50: k // 50 + 1]:
                    prod.produce("examples", junk, key)
        assert prod.flush(30) == 0
        first = run(bs, f"bad-{kind}")
        dead = read_topic(bs, "dead-letters")
        again = run(bs, f"bad-{kind}", max_seconds=8)  # a restart on the same group: nothing is read twice
    assert first["examples"] == N, first
    assert first["dead_letters"] == len(dead) == len(bad) and first["dead_letters_failed"] == 0
    by_key = {m.key().decode(): m for m in dead}
    assert set(by_key) == set(bad)
    for key, (value, why) in bad.items():
        headers = dict(by_key[key].headers())
        assert why in headers["reason"].decode(), (key, headers["reason"])
        assert headers["source.topic"] == b"examples"
        if len(value) > 1_000_000:
            assert headers["truncated"] == b"1" and int(headers["original.size"]) == len(value)
            assert value.startswith(by_key[key].value()) and len(by_key[key].value()) < 1_000_000
        else:
            assert by_key[key].value() == value
    assert again["examples"] == 0 and again["dead_letters"] == 0
