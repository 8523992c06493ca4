"""Exactly-once by request id: a second example of a request (a joiner's
re-emission after its crash, a producer's retry) takes no row, is counted,
and is remembered across a trainer's snapshot and resume."""

import numpy as np
import pytest

from monolith_jax.examples.movielens.loop import movielens_trainer
from monolith_jax.examples.movielens.replay import movielens_features
from monolith_jax.online.dedup import RequestDedup
from monolith_jax.online.trainer import OnlineTrainer
from monolith_jax.snapshot import Snapshots
from monolith_jax.stream import kafka as K
from monolith_jax.stream.messages import (ExampleDecoder, encode_example, encode_example_batch, encode_features,
                                         request_hash)
from tests.stream.kafka_util import producer

QUIET = {"out": lambda *a, **k: None}


def example(rid, i, label=None):
    none = {f.source: [] for f in movielens_features()}
    f = encode_features(rid, 1_000 + i, {**none, "user": [i % 50], "movie": [i % 17]})
    return encode_example(f, float(i % 3 == 0) if label is None else label, 1.0, 2_000 + i)


def test_the_memory_agrees_with_a_set_and_forgets_by_event_time():
    rng = np.random.default_rng(0)
    dedup = RequestDedup(window_s=50.0, chunk=100)   # small chunks: many freezes and expiries
    reference: dict = {}                              # hash -> event ms
    newest = -1
    for step in range(200):
        ms = step * 1000 + rng.integers(0, 1000, 40)
        hashes = rng.integers(1, 3000, 40).astype(np.uint64)
        want = np.array([int(h) in reference for h in hashes])
        got = dedup.seen(hashes)
        # Never forgets within the window; may remember a chunk a little longer.
        recent = np.array([reference.get(int(h), -10**12) >= newest - 50_000 for h in hashes])
        assert (got >= recent).all() and (got <= want).all(), step
        dedup.add(hashes, ms)
        for h, t in zip(hashes.tolist(), ms.tolist()):
            reference[h] = max(reference.get(h, t), t)
        newest = max(newest, int(ms.max()))
    assert not dedup.seen(np.zeros(3, np.uint64)).any()       # 0 is "no request id"
    assert len(dedup) < 3000                                   # old chunks went
    again = RequestDedup(window_s=50.0, chunk=100)
    again.load(dedup.state())
    probe = np.arange(1, 3000, dtype=np.uint64)
    np.testing.assert_array_equal(again.seen(probe), dedup.seen(probe))


def test_the_native_set_agrees_with_a_dict_through_growth_expiry_and_rebuilds():
    from monolith_jax.sparse._native import engine

    rng = np.random.default_rng(1)
    live = engine().RequestSet()
    reference: dict = {}             # hash -> epoch it was last added in
    oldest = 0
    for epoch in range(60):
        hashes = rng.integers(0, 40_000, 3000).astype(np.uint64)  # repeats, old and new, and some 0s
        fresh = {int(h) for h in hashes if h and reference.get(int(h), -1) != epoch}
        assert live.add(hashes, epoch) == len(fresh)
        reference.update({h: epoch for h in fresh})
        if epoch % 7 == 6:           # forget the epochs before one some way back
            oldest = epoch - 3
            live.expire(oldest)
            reference = {h: e for h, e in reference.items() if e >= oldest}
        probe = rng.integers(0, 40_000, 5000).astype(np.uint64)
        np.testing.assert_array_equal(live.seen(probe), [bool(h) and int(h) in reference for h in probe])
        assert len(live) == len(reference) and live.min_epoch == oldest
    keys, epochs = live.dump()
    assert dict(zip(keys.tolist(), epochs.tolist())) == reference and keys.size == len(reference)
    with pytest.raises(ValueError, match="older than the oldest"):
        live.add(np.array([7], np.uint64), oldest - 1)
    live.clear()
    assert len(live) == 0 and not live.seen(keys).any()
    # A stream of new ids, four epochs kept: forgotten entries do not pile
    # up (a rebuild drops them), the table stays sized for what is live.
    for epoch in range(200):
        live.add(rng.integers(1, 2**63, 3000, dtype=np.uint64), epoch)
        live.expire(max(epoch - 3, 0))
    assert len(live) == 12_000 and live.slots <= 26_000  # at most 15,000 live (5 chunks) at a rebuild, / 0.6


def test_a_state_that_does_not_add_up_is_refused_and_changes_nothing():
    dedup = RequestDedup()
    dedup.add(np.array([5, 6], np.uint64), np.array([1, 2]))
    bad = {"hashes": np.array([1, 2, 3], np.uint64), "sizes": np.array([2], np.int64),
           "newest_ms": np.array([9], np.int64)}
    with pytest.raises(ValueError, match="does not add up"):
        dedup.load(bad)
    with pytest.raises(ValueError, match="lacks"):
        dedup.load({"hashes": bad["hashes"]})
    assert dedup.seen(np.array([5, 6, 7], np.uint64)).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="window_s"):
        RequestDedup(window_s=0)


def test_the_decoder_hashes_request_ids_as_python_does_and_drops_repeats_in_place():
    decoder = ExampleDecoder(movielens_features())
    rids = ["q0", "q1", "q0", "", "q2", "q1", "q3"]
    values = [example(rid, i, label=float(i) / 10) for i, rid in enumerate(rids)]
    values[4] = encode_example_batch([example("q2", 4, label=0.4), example("q2", 40, label=0.9)])
    dedup = RequestDedup()
    dedup.add(np.array([request_hash("q3")], np.uint64), np.array([0]))   # trained before
    b = decoder.batch(16, dedup=dedup)
    assert b.add(values) == len(values)
    batch, info, bad = b.finish()
    assert not bad
    # Kept: q0 (first), q1 (first), "" (no id: never a duplicate), q2 (first of its batch).
    assert info["rows"] == 4 and info["duplicates"] == 4
    np.testing.assert_allclose(np.asarray(batch.labels)[:4], [0.0, 0.1, 0.3, 0.4])
    assert info["request_hash"].tolist() == [request_hash("q0"), request_hash("q1"), 0, request_hash("q2")]
    assert info["event_time_ms"].tolist() == [1000, 1001, 1003, 1004]
    users = batch.ids["user"].to_numpy()[:4, 0]
    want = decoder.sparse[0].keys(np.array([0, 1, 3, 4], np.uint64))
    np.testing.assert_array_equal(users, want)
    # Without a dedup nothing is dropped, and the hashes are still given.
    _, info, _ = decoder.decode(values, 16)
    assert info["rows"] == 8 and info["duplicates"] == 0
    assert request_hash("") == 0 and request_hash("q0") == request_hash(b"q0") != 0


def run(bootstrap, group, snaps, **kw):
    online = OnlineTrainer(movielens_trainer(dim=4, hidden=(8,), **QUIET), bootstrap, group=group, batch_size=64,
                           max_wait_s=0.05, prequential=False, snapshots=snaps, **QUIET, **kw)
    return online.run(idle_timeout_s=2.0, max_seconds=120, report_every_s=0)


def test_a_request_is_trained_once_across_repeats_and_a_resume(tmp_path):
    with K.EmbeddedKafka() as kafka:
        bs = kafka.bootstrap
        K.ensure_topics(bs, {"examples": 2, "dead-letters": 1})
        prod = producer(bs)
        for i in range(300):                       # 300 requests, every 5th sent twice (a retry)
            prod.produce("examples", example(f"q{i}", i), f"q{i}")
            if i % 5 == 0:
                prod.produce("examples", example(f"q{i}", i), f"q{i}")
        prod.produce("examples", b"\xff\xff\xff", "junk")   # one dead letter, counted across the resume too
        assert prod.flush(30) == 0
        first = run(bs, "dedup", Snapshots(str(tmp_path / "snaps"), every_s=None, every_steps=2))
        assert first["examples"] == 300 and first["duplicates"] == 60 and first["dead_letters"] == 1, first
        # A joiner's re-emission after its crash: requests 200..299 again, then new ones.
        for i in range(200, 400):
            prod.produce("examples", example(f"q{i}", i), f"q{i}")
        assert prod.flush(30) == 0
        second = run(bs, "dedup", Snapshots(str(tmp_path / "snaps"), every_s=None, every_steps=2))
        assert second["resumed_from"] is not None
        assert second["examples"] == 400 and second["duplicates"] == 160, second
        assert second["dead_letters"] == 1 and sum(second["dead_letter_reasons"].values()) == 1, second
        # Off: every example trains.
        off = run(bs, "dedup-off", None, dedup_window_s=None)
        assert off["examples"] == 560 and off["duplicates"] == 0, off
