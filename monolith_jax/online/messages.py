"""Stream message formats, version 1: the one place they are documented.

Three topics carry three protobuf messages (`proto/messages.proto`, package
`monolith_jax.v1`); every message is one Kafka value, keyed by its request
id so that a request's features and actions land in the same partition
number of both topics.

  features   FeatureRecord  what was known when a request was served
               version        uint32   1 (0 = unset reads as 1)
               request_id     string   joins features, actions and examples
               event_time_ms  int64    when the request was served
               sparse[]       IdList   {name, ids: repeated fixed64} per sparse feature
                                       (64-bit keys; strings via hash_strings)
               dense[]        FloatList {name, values: repeated float}, one value each
  actions    Action         what the user did with it
               version, request_id, event_time_ms
               type           string   e.g. "click", "rate"
               value          float    e.g. the rating
  examples   Example        a joined training example, written by the joiner
               version        uint32
               features       FeatureRecord  (the request's, byte for byte)
               label          float    in [0, 1]
               sample_rate    float    probability the joiner kept this example
                                       (1 for positives; 0 = unset reads as 1):
                                       serving adds log(sample_rate) to the logit
               label_time_ms  int64    the action's time, or the window's end

Hand-made messages may be JSON (protobuf's JSON mapping, field names as
above: `{"request_id": "r1", "event_time_ms": 5, "sparse": [{"name": "user",
"ids": ["42"]}]}`); a value whose first non-blank byte is `{` is read as
JSON, anything else as binary. A newer `version` than this build knows is
refused, so old readers never misread new data.

The trainer decodes examples with a C++ reader (`ExampleDecoder`) that
writes straight into a batch's arrays; these protobuf classes are the
reference it is tested against.
"""

from __future__ import annotations

import math
import struct
from typing import Mapping, Sequence

import numpy as np

from monolith_jax.features import PAD_KEY, DenseFeature, SparseBatch, SparseFeature
from monolith_jax.sparse.keys import Keys

SCHEMA_VERSION = 1

# Status codes of the C++ decoder (ffi/src/example_codec.h) and what they mean.
DECODE_REASONS = {
    1: "not protobuf wire format, or truncated",
    2: "schema version newer than this build reads",
    3: "example has no features record",
    4: "a dense feature is missing or has other than one value",
    5: "label, sample rate or a dense value is not finite",
    6: "label outside [0, 1] or sample rate outside (0, 1]",
    7: "JSON example could not be read",
    8: "empty message",
}


class MessageError(ValueError):
    """A stream message that cannot be used; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _pb():
    from monolith_jax.online import messages_pb2

    return messages_pb2


def _is_json(value: bytes) -> bool:
    return value.lstrip()[:1] == b"{"


def _parse(cls, value, what: str):
    from google.protobuf import json_format
    from google.protobuf.message import DecodeError

    if value is None or len(value) == 0:
        raise MessageError(f"empty {what} message")
    msg = cls()
    try:
        if _is_json(value):
            json_format.Parse(value.decode("utf-8"), msg)
        else:
            msg.ParseFromString(value)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError) as err:
        raise MessageError(f"unreadable {what} message: {err}") from None
    if msg.version > SCHEMA_VERSION:
        raise MessageError(f"{what} message has schema version {msg.version}; this build reads <= {SCHEMA_VERSION}")
    return msg


def parse_features(value: bytes):
    """A FeatureRecord from binary or JSON; MessageError if unusable."""
    rec = _parse(_pb().FeatureRecord, value, "features")
    if not rec.request_id:
        raise MessageError("features message has no request_id")
    for d in rec.dense:
        if len(d.values) != 1 or not math.isfinite(d.values[0]):
            raise MessageError(f"features message: dense feature {d.name!r} must hold one finite value")
    return rec


def parse_action(value: bytes):
    """An Action from binary or JSON; MessageError if unusable."""
    act = _parse(_pb().Action, value, "actions")
    if not act.request_id:
        raise MessageError("actions message has no request_id")
    if not act.type:
        raise MessageError("actions message has no type")
    if not math.isfinite(act.value):
        raise MessageError("actions message has a non-finite value")
    return act


def parse_example(value: bytes):
    return _parse(_pb().Example, value, "examples")


def encode_features(request_id: str, event_time_ms: int, sparse: Mapping[str, Sequence[int]],
                    dense: Mapping[str, float] | None = None) -> bytes:
    pb = _pb()
    rec = pb.FeatureRecord(version=SCHEMA_VERSION, request_id=request_id, event_time_ms=int(event_time_ms))
    for name, ids in sparse.items():
        rec.sparse.add(name=name, ids=np.asarray(ids, np.uint64).reshape(-1).tolist())
    for name, value in (dense or {}).items():
        rec.dense.add(name=name, values=[float(value)])
    return rec.SerializeToString()


def encode_action(request_id: str, event_time_ms: int, type: str, value: float = 1.0) -> bytes:
    return _pb().Action(version=SCHEMA_VERSION, request_id=request_id, event_time_ms=int(event_time_ms),
                        type=type, value=float(value)).SerializeToString()


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # int64 as protobuf writes it: two's complement
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_example(features: bytes, label: float, sample_rate: float, label_time_ms: int) -> bytes:
    """An Example around a FeatureRecord's binary bytes, without re-encoding
    them (the joiner's hot path). Equal to protobuf's own serialization."""
    return b"".join((b"\x08\x01", b"\x12", _varint(len(features)), features,
                     b"\x1d", struct.pack("<f", label), b"\x25", struct.pack("<f", sample_rate),
                     b"\x28", _varint(int(label_time_ms))))


def features_to_binary(value: bytes) -> bytes:
    """A features message as binary (JSON ones are converted)."""
    return parse_features(value).SerializeToString() if _is_json(value) else value


class ExampleDecoder:
    """Kafka values of Examples -> SparseBatch, through the C++ reader.

    decode(values, batch_size) fills one batch (padded with weight-0 rows)
    and returns it with the good examples' event and label times and
    sample rates, and `(index, reason)` for each value that could not be
    used (the caller dead-letters those). At most `batch_size` examples are
    taken; `taken` says how many values were consumed."""

    def __init__(self, sparse: Sequence[SparseFeature], dense: Sequence[DenseFeature] = ()):
        from monolith_jax.sparse._native import engine

        self.sparse = tuple(sparse)
        self.dense = tuple(dense)
        self._native = engine().ExampleDecoder([f.source for f in self.sparse], [f.max_len for f in self.sparse],
                                               [f.source for f in self.dense], PAD_KEY)

    def decode(self, values: list, batch_size: int, messages: bool = False):
        """values: bytes (or None), or with `messages=True` Kafka messages,
        whose partition and offset then come back in info ("partition",
        "offset"; status -3 marks events such as end of partition)."""
        n_sparse, n_dense = len(self.sparse), len(self.dense)
        ids = [np.empty((batch_size, f.max_len), np.uint64) for f in self.sparse]
        lengths = np.zeros((batch_size, n_sparse), np.int32)
        dense = np.zeros((batch_size, n_dense), np.float32)
        labels = np.zeros(batch_size, np.float32)
        rates = np.ones(batch_size, np.float32)
        event_ms = np.zeros(batch_size, np.int64)
        label_ms = np.zeros(batch_size, np.int64)
        status = np.zeros(len(values), np.int32)
        values = list(values)
        meta = (np.zeros(len(values), np.int32), np.zeros(len(values), np.int64)) if messages else (None, None)
        rows = self._native.decode(values, 0, ids, lengths, dense, labels, rates, event_ms, label_ms, status, *meta)
        reasons = {}
        json_values = np.flatnonzero(status == 7)
        if json_values.size:  # rare: convert hand-made JSON to binary, decode again
            for i in json_values:
                try:
                    raw = values[i] if isinstance(values[i], bytes) else values[i].value()
                    values[i] = parse_example(raw).SerializeToString()
                except MessageError as err:
                    values[i], reasons[int(i)] = None, err.reason
            rows = self._native.decode(values, 0, ids, lengths, dense, labels, rates, event_ms, label_ms, status)
        bad = [(int(i), reasons.get(int(i)) or DECODE_REASONS.get(int(status[i]), f"status {status[i]}"))
               for i in np.flatnonzero(status > 0)]
        untaken = np.flatnonzero(status == -1)
        taken = int(untaken[0]) if untaken.size else len(values)
        for f in range(n_sparse):
            ids[f][rows:] = PAD_KEY
        weights = np.zeros(batch_size, np.float32)
        weights[:rows] = 1.0
        batch = SparseBatch(
            ids={f.name: Keys.from_ids(ids[k]) for k, f in enumerate(self.sparse)},
            lengths={f.name: np.ascontiguousarray(lengths[:, k]) for k, f in enumerate(self.sparse)},
            dense=dense, labels=labels, weights=weights)
        info = {"rows": rows, "taken": taken, "sample_rate": rates[:rows], "event_time_ms": event_ms[:rows],
                "label_time_ms": label_ms[:rows], "status": status}
        if messages:
            info["partition"], info["offset"] = meta
        return batch, info, bad
