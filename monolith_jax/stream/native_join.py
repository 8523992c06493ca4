"""The join state in C++ (ffi/src/join_state.cc): `JoinState`'s rules,
counts, reasons and emitted bytes, at the engine's speed.

`NativeJoinState` has `JoinState`'s interface (the joiner uses either), and
one more call, `process(msgs, limit, nexts, slow)`: a consumed batch of
Kafka messages read (`fast_codec`'s reader) and joined in C++; a message
the C++ reader leaves to the protobuf reference (JSON, unusable, too large,
a Kafka event) goes to `slow(msg)` in its turn, whose handler reads it and
calls `add_features` / `add_action`, or dead-letters it. With
`group_examples` the examples are grouped into ExampleBatch values per
partition in C++ as well (`ExampleGrouper`'s rules), taken by
`take_groups`, rather than handed to `emit` one at a time.

The spill store stays `SpillStore` (SQLite, the same file and crash
behaviour), called from C++ only while requests are spilled. The clock is
read once per call (`process` reads it once per batch).
"""

from __future__ import annotations

import time
import zlib
from typing import Callable, Sequence

from monolith_jax.stream.join_state import COUNTERS, JoinConfig
from monolith_jax.stream.spill import SpillStore


def _ignore(ref, reason) -> None:
    """No reject callback: a refused record is only counted."""


class NativeJoinState:
    def __init__(self, config: JoinConfig, emit: Callable[[str, bytes], None], spill_dir: str | None = None,
                 reject: Callable | None = None, clock: Callable[[], float] = time.time,
                 features_topic: str = "features", dense: Sequence = (), sparse: Sequence = ()):
        """`features_topic`, `dense`, `sparse`: for `process` (which messages
        are features, and the job's rules for them, as `parse_features`)."""
        from monolith_jax.sparse._native import engine

        self.cfg = config
        self.emit = emit
        self.reject = reject
        self.clock = clock
        self._store = SpillStore(spill_dir)
        dense, sparse = tuple(dense or ()), tuple(sparse or ())
        seed = str(config.seed).encode() + b"\0"
        labels, order, self._counters, window = [], [], COUNTERS, int(round(config.window_s * 1000))
        if config.labels:  # the multi-label join (join_labels' rules)
            from monolith_jax.stream.labels import Labeller

            lab = Labeller(config.labels, config.seed)
            labels = [(name, list(r.action_types), r.binary, float(r.min_value), w, t, float(r.negative_rate),
                       r.default is not None, float(r.default or 0.0), -1 if g is None else g)
                      for name, r, w, t, g in zip(lab.names, lab.rules, lab.windows, lab.thresholds, lab.given)]
            order = list(lab.order)
            self._counters, window = COUNTERS + lab.counters, lab.window
        self._core = engine().JoinCore(
            window, int(round(config.lateness_s * 1000)), list(config.positive_types),
            float(config.min_value), int(config.negative_rate * 2**32), zlib.crc32(seed), float(config.negative_rate),
            config.emit_positives == "at_window_end", int(config.max_in_memory), config.max_future_s * 1000.0,
            float(config.max_future_s), float(config.idle_partition_s), self._store, emit,
            reject if reject is not None else _ignore, features_topic,
            sorted({f.source for f in dense if f.fill is not None}), list(dict.fromkeys(f.source for f in sparse)),
            list(dict.fromkeys(f.source for f in dense if f.fill is None)), labels, order)

    # ------------------------------------------------------------ inputs
    def add_features(self, rid: str, event_ms: int, payload: bytes, origin=None, ref=None) -> None:
        self._core.add_features(rid, int(event_ms), payload, origin, ref, self.clock() * 1000.0)

    def add_action(self, rid: str, event_ms: int, kind: str, value: float, origin=None, ref=None) -> None:
        self._core.add_action(rid, int(event_ms), kind, float(value), origin, ref, self.clock() * 1000.0)

    def add_record(self, record) -> None:
        kind, rid, t, body, origin, ref = record
        if kind == "features":
            self.add_features(rid, t, body, origin, ref)
        else:
            self.add_action(rid, t, body[0], body[1], origin, ref)

    def process(self, msgs: list, limit: int, nexts: dict, slow: Callable, expect: dict | None = None) -> list:
        """`nexts[(topic, partition)]` becomes one past each message's offset,
        and `expect` too; returns the gaps, [((topic, partition), expected,
        offset)]: messages further on than `expect` said (`OffsetGaps`)."""
        return self._core.process(msgs if isinstance(msgs, list) else list(msgs), int(limit), nexts,
                                  {} if expect is None else expect, self.clock() * 1000.0, slow)

    # ---------------------------------------------------------- grouping
    def group_examples(self, partitions: int, group_size: int, limit: int) -> None:
        """From now on the examples are grouped here, by `ExampleGrouper.add`'s
        rules, instead of passed to `emit` one by one."""
        self._core.group_examples(int(partitions), int(group_size), int(limit))

    def take_groups(self, older_than_s: float) -> list:
        """[(partition, value, examples)]: the full groups, then the open ones
        at least `older_than_s` old (a negative age: all of them)."""
        return self._core.take_groups(float(older_than_s))

    def set_group_limit(self, limit: int) -> None:
        self._core.set_group_limit(int(limit))

    # ---------------------------------------------------------- deciding
    def advance(self) -> int:
        return self._core.advance()

    def flush(self) -> int:
        return self._core.flush()

    # ------------------------------------------------------------ state
    def low_offsets(self) -> dict:
        return self._core.low_offsets()

    def drop_partitions(self, tps) -> int:
        return self._core.drop_partitions(list(set(tps)))

    def set_partitions(self, tps) -> None:
        self._core.set_partitions(list(tps))

    def partition_idle(self, tp) -> None:
        self._core.partition_idle(tuple(tp))

    def partition_busy(self, tp) -> None:
        self._core.partition_busy(tuple(tp))

    @property
    def counts(self) -> dict:
        return dict(zip(self._counters, self._core.counts()))

    @property
    def watermark(self) -> int:
        return self._core.watermark

    @property
    def waiting(self) -> int:
        return self._core.in_memory + len(self._store) + self._core.held

    @property
    def in_memory(self) -> int:
        return self._core.in_memory

    def close(self) -> None:
        self._store.close()
