"""Stream message formats, version 2 (reading version 1): the one place they are documented.

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
  examples   Example or ExampleBatch   joined training examples, written by the joiner
               version        uint32
               features       FeatureRecord  (the request's, byte for byte)
               label          float    in [0, 1]
               sample_rate    float    probability the joiner kept this example
                                       (1 for positives; 0 = unset reads as 1):
                                       serving adds log(sample_rate) to the logit
               label_time_ms  int64    the action's time, or the window's end
               labels[]       Label    version 2, a job with several heads: one per
                                       head, by name (label and sample_rate are
                                       then unset); written with version 2
                 name         string   the head's name
                 value        float    binary label in [0, 1], or a value label
                 sample_rate  float    probability its negative sampling kept it
                                       (0 = unset reads as 1); serving corrects
                                       that head's logit by log(sample_rate)
                 undefined    bool     no such label here (e.g. a conversion
                                       without a click): the head is masked
             ExampleBatch   several Examples bound for one partition, in one value
               version        uint32
               examples[]     Example  (field 16, which an Example never uses)

Hand-made messages may be JSON (protobuf's JSON mapping, field names as
above: `{"request_id": "r1", "event_time_ms": 5, "sparse": [{"name": "user",
"ids": ["42"]}]}`); a value whose first non-blank byte is `{` is read as
JSON, anything else as binary. A newer `version` than this build knows is
refused, so old readers never misread new data. Features and actions are
written as version 1 (their fields did not change); an Example is version 2
only when it carries `labels`, so a version-1 reader keeps reading the
examples of single-label jobs.

Which label a trainer reads: a job without heads (one implicit binary head)
reads `label` and `sample_rate`, and refuses an example that carries
`labels` (it was joined for a job with several heads). A job with heads
reads, for each head, the Label of its name: absent, the example is refused
unless the head declares `missing="mask"` (then the head is masked there);
`undefined` masks the head; a binary head's value must lie in [0, 1]. Labels
that name no head of the job are ignored (a stream may carry more objectives
than one model learns).

The trainer decodes examples with a C++ reader (`ExampleDecoder`) that
writes straight into a batch's arrays; these protobuf classes are the
reference it is tested against.

What the decoder takes from a record (the rule files and predictor
requests follow too, `monolith_jax.features`):

- a feature is found by its `source` (`column`, else the feature name):
  an IdList or FloatList of that `name`;
- every sparse feature the job reads must have an IdList, possibly with no
  ids (`"ids": []`); an example whose record lacks one altogether is
  refused (dead-lettered as "a sparse feature is missing", naming it);
- ids are raw: the decoder maps them to keys with each feature's
  `SparseFeature.keys` (its id space), padding stays `PAD_KEY`;
- a dense feature holds one finite value; a missing or non-finite one is
  refused, unless the `DenseFeature` declares a `fill`, which replaces it
  (counted in `info["filled"]` and `monolith_jax.features.fill_counts()`).
  Upstream, `parse_features` (the joiner's check) refuses a non-finite
  value unless it is given the job's dense features and that one has a
  fill.
"""

from __future__ import annotations

import math
import struct
from typing import Mapping, Sequence

import numpy as np

from monolith_jax.features import PAD_KEY, DenseFeature, SparseBatch, SparseFeature, fill_dense
from monolith_jax.sparse.keys import Keys

SCHEMA_VERSION = 2   # what this build reads
RECORD_VERSION = 1   # what it writes for features, actions and single-label examples

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
    10: "example batch holds more examples than a training batch",
    11: "a sparse feature is missing (an empty id list is not missing)",
    12: "example carries named labels (version 2); the job has one unnamed head",
    13: "example lacks the label of a head that does not declare missing='mask'",
}
SPARSE_MISSING = 11
HEAD_MISSING = 13


class MessageError(ValueError):
    """A stream message that cannot be used; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _pb():
    from monolith_jax.stream import messages_pb2

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
    except Exception as err:  # any shape of value (e.g. JSON nested past the recursion limit): a reason, not a crash
        raise MessageError(f"unreadable {what} message: {type(err).__name__}: {str(err)[:200]}") from None
    if msg.version > SCHEMA_VERSION:
        raise MessageError(f"{what} message has schema version {msg.version}; this build reads <= {SCHEMA_VERSION}")
    return msg


def parse_features(value: bytes, dense: Sequence[DenseFeature] | None = None,
                   sparse: Sequence[SparseFeature] | None = None):
    """A FeatureRecord from binary or JSON; MessageError if unusable. Each
    dense value must be one finite number, except, when the job's `dense`
    features are given, a non-finite one of a feature that declares a
    `fill` (the trainer's decoder fills it). Given the job's features, the
    record must also carry what the trainer's decoder needs: every sparse
    feature's source (its id list may be empty) and every dense feature
    without a fill; otherwise its example would be refused at the trainer,
    with the examples grouped beside it."""
    rec = _parse(_pb().FeatureRecord, value, "features")
    if not rec.request_id:
        raise MessageError("features message has no request_id")
    filled = {f.source for f in dense or () if f.fill is not None}
    for d in rec.dense:
        if len(d.values) != 1 or not (math.isfinite(d.values[0]) or d.name in filled):
            raise MessageError(f"features message: dense feature {d.name!r} must hold one finite value")
    if sparse:
        have = {s.name for s in rec.sparse}
        lack = [f.source for f in sparse if f.source not in have]
        if lack:
            raise MessageError(f"features message lacks sparse feature(s) "
                               f"{', '.join(repr(x) for x in dict.fromkeys(lack))}")
    if dense:
        have = {d.name for d in rec.dense}
        lack = [f.source for f in dense if f.fill is None and f.source not in have]
        if lack:
            raise MessageError(f"features message lacks dense feature(s) "
                               f"{', '.join(repr(x) for x in dict.fromkeys(lack))} (no fill declared)")
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
    rec = pb.FeatureRecord(version=RECORD_VERSION, request_id=request_id, event_time_ms=int(event_time_ms))
    for name, ids in sparse.items():
        rec.sparse.add(name=name, ids=np.asarray(ids, np.uint64).reshape(-1).tolist())
    for name, value in (dense or {}).items():
        rec.dense.add(name=name, values=[float(value)])
    return rec.SerializeToString()


def encode_action(request_id: str, event_time_ms: int, type: str, value: float = 1.0) -> bytes:
    return _pb().Action(version=RECORD_VERSION, request_id=request_id, event_time_ms=int(event_time_ms),
                        type=type, value=float(value)).SerializeToString()


_M64 = (1 << 64) - 1


def request_hash(request_id: str | bytes) -> int:
    """A request id's 64-bit hash, as the C++ decoder computes it for every
    example (FNV-1a over the UTF-8 bytes, then splitmix64's finalizer);
    never 0, which stands for "no request id"."""
    data = request_id.encode() if isinstance(request_id, str) else bytes(request_id)
    if not data:
        return 0
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & _M64
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & _M64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & _M64
    h ^= h >> 31
    return h or 1


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


def encode_label(name: str, value: float, sample_rate: float = 1.0, undefined: bool = False) -> bytes:
    """One Label (field 6 of an Example, version 2), its tag and length included."""
    raw = name.encode()
    body = b"".join((b"\x0a", _varint(len(raw)), raw, b"\x15", struct.pack("<f", value),
                     b"\x1d", struct.pack("<f", sample_rate), b"\x20\x01" if undefined else b""))
    return b"\x32" + _varint(len(body)) + body


def encode_example(features: bytes, label: float, sample_rate: float, label_time_ms: int,
                   labels: Sequence | None = None) -> bytes:
    """An Example around a FeatureRecord's binary bytes, without re-encoding
    them (the joiner's hot path). Equal to protobuf's own serialization.
    `labels`: (name, value, sample_rate, undefined) per head, for a job with
    several heads: the Example is then version 2 and label/sample_rate unset."""
    if labels:
        return b"".join((b"\x08\x02", b"\x12", _varint(len(features)), features,
                         b"\x28", _varint(int(label_time_ms)), *(encode_label(*lab) for lab in labels)))
    return b"".join((b"\x08\x01", b"\x12", _varint(len(features)), features,
                     b"\x1d", struct.pack("<f", label), b"\x25", struct.pack("<f", sample_rate),
                     b"\x28", _varint(int(label_time_ms))))


def labels_overhead(labels: Sequence) -> int:
    """Bytes `encode_example` adds for `labels`, beyond EXAMPLE_OVERHEAD."""
    return sum(len(encode_label(*lab)) for lab in labels)


def features_to_binary(value: bytes, record=None) -> bytes:
    """A features message as binary (JSON ones are converted; `record`:
    the value already parsed, e.g. by `parse_features`)."""
    if not _is_json(value):
        return value
    return (record if record is not None else parse_features(value)).SerializeToString()


class ExampleDecoder:
    """Kafka values of the examples topic (Example or ExampleBatch) ->
    SparseBatch, through the C++ reader.

        b = decoder.batch(batch_size, messages=True)
        taken = b.add(kafka_messages)   # as many as fit; the rest wait for the next batch
        batch, info, bad = b.finish()   # padded with weight-0 rows

    `bad` lists `(index, reason)` for values that could not be used (the
    caller dead-letters them); info holds the good examples' event and
    label times and sample rates, `filled` (dense feature -> values
    replaced by its fill in this batch) and, for Kafka messages, each
    value's partition and offset (status -3 marks events such as end of
    partition). The batch's ids are keys (each feature's id space).

    `heads` (a job's `Head`s): the batch's labels are (B, H), one column
    per head read from the Labels of version 2 (see the module docstring),
    with `label_mask` (B, H), and info's sample rates are (rows, H)."""

    def __init__(self, sparse: Sequence[SparseFeature], dense: Sequence[DenseFeature] = (), heads=None):
        from monolith_jax.sparse._native import engine

        self.sparse = tuple(sparse)
        self.dense = tuple(dense)
        self.heads = tuple(heads) if heads else ()
        self._native = engine().ExampleDecoder([f.source for f in self.sparse], [f.max_len for f in self.sparse],
                                               [f.source for f in self.dense], PAD_KEY,
                                               [int(f.fill is not None) for f in self.dense],
                                               [h.name for h in self.heads], [int(h.binary) for h in self.heads],
                                               [int(h.missing == "mask") for h in self.heads])

    @staticmethod
    def _examples(value) -> list:
        """A value's Examples, parsed by protobuf (the slow path, to name a
        reason); [] if it does not parse."""
        try:
            raw = value if isinstance(value, (bytes, type(None))) else value.value()
            pb = _pb()
            batch = pb.ExampleBatch.FromString(raw)
            return list(batch.examples) or [pb.Example.FromString(raw)]
        except Exception:  # the reason stays the generic one
            return []

    def missing_sparse(self, value) -> list:
        """The sources of the sparse features a value's (first incomplete)
        example lacks; [] if it cannot tell."""
        for ex in self._examples(value):
            have = {s.name for s in ex.features.sparse}
            lack = [f.source for f in self.sparse if f.source not in have]
            if lack:
                return list(dict.fromkeys(lack))
        return []

    def missing_heads(self, value) -> list:
        """The heads (that may not be masked) whose label a value's (first
        incomplete) example lacks; [] if it cannot tell."""
        for ex in self._examples(value):
            have = {lab.name for lab in ex.labels}
            lack = [h.name for h in self.heads if h.missing != "mask" and h.name not in have]
            if lack and not (not have and len(self.heads) == 1):
                return lack
        return []

    def batch(self, batch_size: int, messages: bool = False, limit: int | None = None,
              dedup=None) -> "BatchBuilder":
        """A batch of `batch_size` rows to fill, taking at most `limit`
        examples. With `dedup` (a `monolith_jax.online.dedup.RequestDedup`),
        an example whose request id it has seen, or that this batch already
        holds, takes no row and is counted in `duplicates`."""
        return BatchBuilder(self, batch_size, messages, limit, dedup)

    def decode(self, values: list, batch_size: int, messages: bool = False):
        """One batch from `values` (those that do not fit are not taken:
        info["taken"] says how many were)."""
        b = self.batch(batch_size, messages)
        b.add(values)
        return b.finish()


class BatchBuilder:
    def __init__(self, decoder: ExampleDecoder, batch_size: int, messages: bool, limit: int | None = None,
                 dedup=None):
        self.d = decoder
        self.dedup = dedup
        self.duplicates = 0
        self._held = np.zeros(0, np.uint64)   # request hashes of this batch's rows, sorted
        self.size = batch_size
        self.limit = batch_size if limit is None else max(1, min(limit, batch_size))
        self.messages = messages
        self.ids = [np.empty((batch_size, f.max_len), np.uint64) for f in decoder.sparse]
        self.lengths = np.zeros((batch_size, len(decoder.sparse)), np.int32)
        self.dense = np.zeros((batch_size, len(decoder.dense)), np.float32)
        shape = (batch_size, len(decoder.heads)) if decoder.heads else (batch_size,)
        self.labels = np.zeros(shape, np.float32)
        self.rates = np.ones(shape, np.float32)
        self.masks = np.zeros(shape, np.float32) if decoder.heads else None
        self.event_ms = np.zeros(batch_size, np.int64)
        self.label_ms = np.zeros(batch_size, np.int64)
        self.request_hash = np.zeros(batch_size, np.uint64)
        self.rows = 0
        self.taken = 0
        self.events = 0   # of the taken, Kafka events (end of partition, errors): no message
        self.bad: list = []
        self._status, self._parts, self._offs = [], [], []

    @property
    def full(self) -> bool:
        return self.rows >= self.limit

    def _decode(self, values):
        status = np.zeros(len(values), np.int32)
        meta = (np.zeros(len(values), np.int32), np.zeros(len(values), np.int64)) if self.messages else (None, None)
        n = self.limit  # views of the first `limit` rows: the decoder fills no more
        r0 = self.rows
        self.rows += self.d._native.decode(values, self.rows, [a[:n] for a in self.ids], self.lengths[:n],
                                           self.dense[:n], self.labels[:n], self.rates[:n], self.event_ms[:n],
                                           self.label_ms[:n], status, *meta, request_hash=self.request_hash[:n],
                                           masks=None if self.masks is None else self.masks[:n])
        if self.dedup is not None and self.rows > r0:
            self._drop_repeats(r0)
        return status, meta

    def _drop_repeats(self, r0: int) -> None:
        """Removes the rows from r0 on whose request id was trained before
        (the dedup's memory) or is in this batch already, moving the rest up."""
        from monolith_jax.online.dedup import in_sorted, merge_sorted

        h = self.request_hash[r0:self.rows]
        drop = self.dedup.seen(h) | (in_sorted(self._held, h) & (h != 0))
        new = np.flatnonzero((h != 0) & ~drop)
        _, first = np.unique(h[new], return_index=True)   # repeats within these rows: the first stays
        if first.size < new.size:
            later = np.ones(new.size, bool)
            later[first] = False
            drop[new[later]] = True
        self._held = merge_sorted(self._held, h[new[first]])
        if not drop.any():
            return
        keep = r0 + np.flatnonzero(~drop)
        end = r0 + keep.size
        for a in (*self.ids, self.lengths, self.dense, self.labels, self.rates, self.event_ms, self.label_ms,
                  self.request_hash, *(() if self.masks is None else (self.masks,))):
            a[r0:end] = a[keep]
        self.duplicates += int(drop.sum())
        self.rows = end

    def add(self, values) -> int:
        """Decodes values in order until one does not fit; returns how many
        were taken (good, bad or events)."""
        values = list(values)
        before = self.taken
        start = 0
        while start < len(values):
            status, (parts, offs) = self._decode(values[start:])
            stop = np.flatnonzero(status == -1)
            end = int(stop[0]) if stop.size else len(values) - start
            json_at = np.flatnonzero(status[:end] == 7)
            if json_at.size:  # a hand-made JSON value: convert it, decode again from it
                j = int(json_at[0])
                end = j
            self._keep(status[:end], parts, offs, end, values[start:start + end])
            start += end
            if not json_at.size:
                break
            item = values[start]
            raw = item if isinstance(item, (bytes, type(None))) else item.value()
            p, o = (parts[j], offs[j]) if parts is not None else (0, 0)
            try:
                values[start] = _json_examples_to_binary(raw)
            except MessageError as err:
                self._keep(np.array([-2], np.int32), np.array([p], np.int32),
                           np.array([o], np.int64), 1)
                self.bad.append((self.taken - 1, err.reason))
                start += 1
                continue
            status, _ = self._decode(values[start:start + 1])
            if status[0] == -1:
                break
            self._keep(status, np.array([p], np.int32), np.array([o], np.int64), 1, values[start:start + 1])
            start += 1
        return self.taken - before

    def _keep(self, status, parts, offs, n, values=None) -> None:
        for i in np.flatnonzero(status[:n] > 0):
            code = int(status[i])
            reason = DECODE_REASONS.get(code, f"status {code}")
            if code == SPARSE_MISSING and values is not None:
                lack = self.d.missing_sparse(values[i])
                if lack:
                    reason = f"{reason}: {', '.join(repr(x) for x in lack)}"
            if code == HEAD_MISSING and values is not None:
                lack = self.d.missing_heads(values[i])
                if lack:
                    reason = f"example lacks the label of head(s) {', '.join(repr(x) for x in lack)}"
            self.bad.append((self.taken + int(i), reason))
        self._status.append(status[:n].copy())
        self.events += int(np.count_nonzero(status[:n] == -3))
        if self.messages:
            self._parts.append(parts[:n].copy())
            self._offs.append(offs[:n].copy())
        self.taken += n

    def finish(self):
        rows = self.rows
        # Rows past the last good example may hold a refused one's partial
        # fields: padding rows are zeros, no ids.
        self.lengths[rows:] = 0
        self.dense[rows:] = 0.0
        self.labels[rows:] = 0.0
        if self.masks is not None:
            self.masks[rows:] = 0.0
        for k, f in enumerate(self.d.sparse):
            ids = self.ids[k]
            ids[rows:] = PAD_KEY
            real = np.arange(f.max_len)[None, :] < self.lengths[:rows, k][:, None]
            ids[:rows][real] = f.keys(ids[:rows][real])  # raw ids -> keys; padding stays PAD_KEY
        filled = fill_dense(self.dense[:rows], self.d.dense, "examples") if self.d.dense else {}
        weights = np.zeros(self.size, np.float32)
        weights[:rows] = 1.0
        batch = SparseBatch(
            ids={f.name: Keys.from_ids(self.ids[k]) for k, f in enumerate(self.d.sparse)},
            lengths={f.name: np.ascontiguousarray(self.lengths[:, k]) for k, f in enumerate(self.d.sparse)},
            dense=self.dense, labels=self.labels, weights=weights, label_mask=self.masks)
        status = np.concatenate(self._status) if self._status else np.zeros(0, np.int32)
        info = {"rows": rows, "taken": self.taken, "sample_rate": self.rates[:rows],
                "event_time_ms": self.event_ms[:rows], "label_time_ms": self.label_ms[:rows], "status": status,
                "filled": filled, "request_hash": self.request_hash[:rows], "duplicates": self.duplicates}
        if self.messages:
            info["partition"] = np.concatenate(self._parts) if self._parts else np.zeros(0, np.int32)
            info["offset"] = np.concatenate(self._offs) if self._offs else np.zeros(0, np.int64)
        return batch, info, self.bad


def _json_examples_to_binary(raw) -> bytes:
    """A JSON Example or ExampleBatch (`{"examples": [...]}`) as binary."""
    import json

    if raw is None:
        raise MessageError("empty message")
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError(f"a JSON {type(obj).__name__}, not an object")
        is_batch = "examples" in obj
    except (ValueError, TypeError) as err:
        raise MessageError(f"unreadable examples message: {err}") from None
    except Exception as err:  # e.g. RecursionError: JSON nested deeper than Python's recursion limit
        raise MessageError(f"unreadable examples message: {type(err).__name__}: {str(err)[:200]}") from None
    return _parse(_pb().ExampleBatch if is_batch else _pb().Example, raw, "examples").SerializeToString()


def encode_example_batch(examples: Sequence[bytes]) -> bytes:
    """An ExampleBatch around Examples' binary bytes (field 16 each)."""
    return b"".join([b"\x08\x01"] + [b"\x82\x01" + _varint(len(e)) + e for e in examples])


def split_example_batch(value: bytes) -> list:
    """The Examples' bytes of an ExampleBatch that `encode_example_batch`
    wrote (its version, then field 16 per example), each exactly as it went
    in; MessageError for any other value."""
    if value[:2] != b"\x08\x01":
        raise MessageError("not an ExampleBatch of version 1")
    out, i, n = [], 2, len(value)
    while i < n:
        if value[i:i + 2] != b"\x82\x01":
            raise MessageError(f"ExampleBatch entry at byte {i} is not field 16")
        i += 2
        size = shift = 0
        while True:
            if i >= n or shift > 63:
                raise MessageError(f"ExampleBatch entry length at byte {i} is cut off")
            b = value[i]
            i += 1
            size |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if i + size > n:
            raise MessageError(f"ExampleBatch entry of {size} bytes runs past the value's {n}")
        out.append(bytes(value[i:i + size]))
        i += size
    return out


# What `encode_example` adds around a features record, at most (tags, a
# length, label, sample rate, a 10-byte label time), and what
# `encode_example_batch` adds: its version, then per example a tag and a length.
EXAMPLE_OVERHEAD = 32
BATCH_OVERHEAD = 2


def batch_entry_size(example_size: int) -> int:
    """Bytes one Example of `example_size` takes inside an ExampleBatch
    (its tag, the varint of its length, its bytes)."""
    return 2 + max((example_size.bit_length() + 6) // 7, 1) + example_size
