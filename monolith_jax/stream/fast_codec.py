"""The joiner's codec in C++ (ffi/src/stream_codec.cc): a consumed batch of
Kafka messages read in one call, and Examples and ExampleBatches written
around features records' bytes.

`messages.parse_features` / `parse_action` stay the reference and the
judge: the C++ reader takes a message only when it is a binary record the
reference accepts, with the same fields; every other message (JSON, an
unusable one, a legal one beyond the reader) comes back as "slow", for the
reference to read or to name why not. So the joiner's output and its dead
letters' reasons are the reference's, message for message.

The native library loads on first use, not on import.
"""

from __future__ import annotations

from typing import Sequence

from monolith_jax.features import DenseFeature, SparseFeature


def _engine():
    from monolith_jax.sparse._native import engine

    return engine()


class StreamReader:
    """Reads a consumed batch (a list of confluent_kafka Messages):

        items = reader.read(msgs, limit, nexts)

    one item per message, in order: a join record `("features", rid,
    event_ms, value, origin, msg)` or `("actions", rid, event_ms, (type,
    value), origin, msg)` (origin = (topic, partition, offset); the shape
    `JoinState.add_record` takes), `("slow", msg)` for the reference
    parser, or `("event", msg)` for a Kafka event (end of partition, an
    error). `nexts[(topic, partition)]` is set to each message's offset + 1.
    A features record whose Example would not fit in `limit` bytes (the
    grouper's) is slow: the reference path dead-letters it with the reason.
    `dense` / `sparse`: the job's features, checked as `parse_features`
    checks them."""

    def __init__(self, features_topic: str, dense: Sequence[DenseFeature] = (),
                 sparse: Sequence[SparseFeature] = ()):
        dense, sparse = tuple(dense or ()), tuple(sparse or ())
        filled = sorted({f.source for f in dense if f.fill is not None})
        need_sparse = list(dict.fromkeys(f.source for f in sparse))
        need_dense = list(dict.fromkeys(f.source for f in dense if f.fill is None))
        self._native = _engine().StreamReader(features_topic, filled, need_sparse, need_dense)

    def read(self, msgs: list, limit: int, nexts: dict) -> list:
        return self._native.read(msgs if isinstance(msgs, list) else list(msgs), int(limit), nexts)


def encode_example(features: bytes, label: float, sample_rate: float, label_time_ms: int) -> bytes:
    """`messages.encode_example` in C++ (the same bytes)."""
    return _engine().encode_example(features, label, sample_rate, label_time_ms)


def encode_example_batch(examples: Sequence[bytes]) -> bytes:
    """`messages.encode_example_batch` in C++ (the same bytes)."""
    return _engine().encode_example_batch(examples if isinstance(examples, list) else list(examples))


def encoders():
    """(encode_example, encode_example_batch) bound to the loaded engine,
    for a hot path that calls them per example."""
    e = _engine()
    return e.encode_example, e.encode_example_batch
