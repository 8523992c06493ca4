"""The join of features and actions on request id, in event time, without Kafka.

Rules (times are event times, in ms):

- A request's features wait `window` for a positive action: an action whose
  type is in `positive_types` and whose value is >= `min_value`, with
  `action_time - feature_time <= window`. The first one makes the request
  a positive (label 1, sample rate 1), emitted at once with
  `emit_positives="on_action"` (freshest) or when the window closes with
  `"at_window_end"` (examples then leave in request-time order, so that a
  positive is never trained on before the negatives served beside it: the
  delayed-feedback bias of emitting on action); later ones are counted as
  repeats. Other actions are counted and change nothing.
- Messages of one partition may arrive out of order by up to `lateness`:
  the watermark is the least, over the input partitions, of the latest
  event time seen in each, minus `lateness` (partitions are read at
  different paces, so one partition's progress says nothing of another's),
  and a request is finalized
  when its `feature_time + window` falls below the watermark. A finalized
  request without a positive becomes a negative, kept with probability
  `negative_rate` (a stable hash of the request id decides, so a re-read
  decides the same way) and carrying that rate.
- An action that arrives before its features waits for them; one whose
  features never come (its time falls `window` below the watermark) is
  counted as an orphan. A positive action for a request already finalized,
  or more than `window` after its features, is counted as late and emits
  nothing. Each request emits at most one example.
- Features beyond `max_in_memory` waiting requests go to the SpillStore on
  disk, those that have waited longest first, and are read back when their
  action or their deadline comes.
- Event times are bounded, so that no record moves the watermark where the
  stream is not: a negative one, or one more than `max_future_s` ahead of
  the joiner's clock, is refused at once; one more than `max_future_s`
  ahead of the stream's front (the latest event time taken so far, over
  all partitions) is held aside until the next message of its partition
  says which it is: if that one is also that far ahead, the stream jumped
  (a gap in the log) and both are taken; if the front has come within
  `max_future_s` of the held one meanwhile (other partitions went on), it
  is taken; else it was an outlier and is refused. Refused records go to `reject(ref, reason)`
  (the joiner dead-letters them) and are counted as `bad_times`. At the
  end of the stream (`flush`) a held record is decided with the rest but
  does not move the watermark.

This is the reference; `native_join.NativeJoinState` decides the same way
in C++ (the joiner's default), and the tests run both on the same streams.

Several named labels (`JoinConfig(labels={name: LabelRule, ...})`, one per
head of a multi-task job): `JoinState(config, ...)` is then a
`join_labels.MultiLabelJoinState`, which keeps these event-time rules and
decides each label by its own rule and window (`labels`), writing
version-2 examples; `NativeJoinState` does the same for such a config.

`emit(request_id, example_bytes)` receives every example. `origin` values
(topic, partition, offset) travel with what is pending so that the caller
can commit only offsets whose messages are fully handled.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
import zlib
from typing import Callable

from monolith_jax.stream.messages import encode_example
from monolith_jax.stream.spill import SpillStore


@dataclasses.dataclass(frozen=True)
class JoinConfig:
    window_s: float = 300.0
    lateness_s: float = 10.0
    positive_types: tuple = ("click",)
    min_value: float = float("-inf")
    negative_rate: float = 1.0
    max_in_memory: int = 1_000_000
    seed: int = 0
    emit_positives: str = "on_action"
    idle_partition_s: float = 2.0
    max_future_s: float = 86_400.0
    labels: tuple = ()  # ((name, LabelRule), ...): several named labels (join_labels); then the four above unset

    def __post_init__(self):
        import math

        if self.labels:
            from monolith_jax.stream.labels import check_rules

            labels = self.labels.items() if hasattr(self.labels, "items") else self.labels
            try:
                rules = check_rules(dict(labels), "JoinConfig.labels")
            except (TypeError, ValueError) as err:
                raise ValueError(str(err)) from None
            object.__setattr__(self, "labels", tuple(rules.items()))
            single = [f for f, v, d in (("window_s", self.window_s, 300.0), ("positive_types",
                      tuple(self.positive_types), ("click",)), ("min_value", self.min_value, -math.inf),
                      ("negative_rate", self.negative_rate, 1.0)) if v != d]
            if single:
                raise ValueError(f"JoinConfig: {', '.join(single)} {'describes' if len(single) == 1 else 'describe'} "
                                 "a single label; with labels= each LabelRule gives its own")
        if self.emit_positives not in ("on_action", "at_window_end"):
            raise ValueError(f"emit_positives must be 'on_action' or 'at_window_end', got {self.emit_positives!r}")
        if not 0.0 < self.negative_rate <= 1.0:
            raise ValueError(f"negative_rate must be in (0, 1], got {self.negative_rate}")
        if self.window_s < 0 or self.lateness_s < 0:
            raise ValueError("window_s and lateness_s must be >= 0")
        if self.max_in_memory < 1:
            raise ValueError("max_in_memory must be >= 1")
        if not self.max_future_s > 0:
            raise ValueError(f"max_future_s must be > 0, got {self.max_future_s}")
        object.__setattr__(self, "positive_types", tuple(self.positive_types))


COUNTERS = ("features", "actions", "positives", "negatives", "negatives_sampled_out", "late_actions",
            "orphan_actions", "repeat_actions", "other_actions", "duplicate_features", "spilled", "unspilled",
            "bad_times")
BAD_TIME = "event time out of bounds"
_FLUSH = 2**64  # the watermark while flushing: above every int64 deadline


class JoinState:
    def __new__(cls, config: JoinConfig, *args, **kwargs):
        if cls is JoinState and config.labels:  # several named labels: the multi-label join
            from monolith_jax.stream.join_labels import MultiLabelJoinState

            return object.__new__(MultiLabelJoinState)
        return object.__new__(cls)

    def __init__(self, config: JoinConfig, emit: Callable[[str, bytes], None], spill_dir: str | None = None,
                 reject: Callable | None = None, clock: Callable[[], float] = time.time,
                 encode: Callable[[bytes, float, float, int], bytes] = encode_example):
        """`encode`: writes an Example around a record (`messages.encode_example`,
        or the same in C++, `fast_codec.encode_example`)."""
        self.cfg = config
        self.emit = emit
        self._encode = encode
        self.reject = reject      # reject(ref, reason): a record refused for its event time
        self.clock = clock        # seconds since the epoch
        self.window = int(round(config.window_s * 1000))
        self.lateness = int(round(config.lateness_s * 1000))
        self.max_future = config.max_future_s * 1000  # ms; may be inf
        self.front = None          # the latest event time taken, over all partitions
        self._held: dict = {}      # (topic, partition) -> a record far ahead of the front, until the next one
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._part_max: dict = {}     # (topic, partition) or None -> latest event time
        self._inputs: set = set()     # assigned input partitions
        self._idle: dict = {}         # of those, read to their end: since when
        self.watermark = -(2**62)
        self._pending: dict = {}      # rid -> (event_ms, payload, origin)
        self._pending_heap: list = []  # (deadline, rid)
        self._early: dict = {}        # rid -> [(event_ms, type, value, origin)]
        self._early_heap: list = []    # (event_ms, rid)
        self._closed: dict = {}       # rid -> (deadline, positive)
        self._closed_heap: list = []
        self._marked: dict = {}       # rid -> positive action time, emitted at window end
        self._defer = config.emit_positives == "at_window_end"
        self._store = SpillStore(spill_dir)
        self._seed = str(config.seed).encode() + b"\0"
        self._threshold = int(config.negative_rate * 2**32)

    # ------------------------------------------------------------ inputs
    def add_features(self, rid: str, event_ms: int, payload: bytes, origin=None, ref=None) -> None:
        """A request's features; `ref` is what `reject` receives if its
        event time is refused (the joiner's Kafka message)."""
        record = ("features", rid, int(event_ms), payload, origin, ref)
        if self._admit(record):
            self._add_features(rid, int(event_ms), payload, origin)

    def add_action(self, rid: str, event_ms: int, kind: str, value: float, origin=None, ref=None) -> None:
        record = ("actions", rid, int(event_ms), (kind, value), origin, ref)
        if self._admit(record):
            self._add_action(rid, int(event_ms), kind, value, origin)

    def add_record(self, record) -> None:
        """A record as `fast_codec.StreamReader` gives it: ("features", rid,
        event_ms, payload, origin, ref) or ("actions", rid, event_ms,
        (type, value), origin, ref); the same as `add_features` / `add_action`."""
        if self._admit(record):
            self._apply(record)

    def _accept_features(self, rid: str, event_ms: int, origin, see: bool) -> bool:
        """Counts a features record (and its time, if `see`); False for a
        request already pending or decided (a duplicate, counted)."""
        self.counts["features"] += 1
        if see:
            self._see(event_ms, origin)
        if rid in self._pending or rid in self._closed:
            self.counts["duplicate_features"] += 1
            return False
        return True

    def _add_features(self, rid: str, event_ms: int, payload: bytes, origin=None, see: bool = True) -> None:
        if not self._accept_features(rid, event_ms, origin, see):
            return
        early = self._early.pop(rid, None)
        if early:
            labelled = emitted = False
            for ta, kind, value, _ in sorted(early, key=lambda a: a[0]):
                if not self._positive(kind, value):
                    self.counts["other_actions"] += 1
                elif labelled:  # a second positive of the request: counted as it is in arrival order
                    self.counts["repeat_actions"] += 1
                elif ta - event_ms <= self.window:
                    labelled = True
                    if not self._defer:
                        self._emit_positive(rid, event_ms, payload, ta)
                        emitted = True
                    else:
                        self._marked.setdefault(rid, ta)
                else:
                    self.counts["late_actions"] += 1
            if emitted:
                return
        self._pending[rid] = (event_ms, payload, origin)
        heapq.heappush(self._pending_heap, (event_ms + self.window, rid))
        if len(self._pending) > self.cfg.max_in_memory:
            self._spill()

    def _add_action(self, rid: str, event_ms: int, kind: str, value: float, origin=None, see: bool = True) -> None:
        self.counts["actions"] += 1
        if see:
            self._see(event_ms, origin)
        closed = self._closed.get(rid)
        if closed is not None:
            if self._positive(kind, value):
                self.counts["repeat_actions" if closed[1] else "late_actions"] += 1
            else:
                self.counts["other_actions"] += 1
            return
        waiting = self._pending.get(rid)
        if waiting is None and len(self._store):
            row = self._store.take(rid)
            if row is not None:
                self.counts["unspilled"] += 1
                waiting = (row[2], row[3], (row[4], row[5], row[6]))
                self._pending[rid] = waiting  # back in memory until decided
                heapq.heappush(self._pending_heap, (row[2] + self.window, rid))  # (the stored deadline is clamped)
        if waiting is None:
            self._early.setdefault(rid, []).append((event_ms, kind, value, origin))
            heapq.heappush(self._early_heap, (event_ms, rid))
            return
        if not self._positive(kind, value):
            self.counts["other_actions"] += 1
            return
        tf, payload, _ = waiting
        if event_ms - tf > self.window:
            self.counts["late_actions"] += 1
            return
        if self._defer:
            if rid in self._marked:
                self.counts["repeat_actions"] += 1
            else:
                self._marked[rid] = event_ms
            return
        del self._pending[rid]
        self._emit_positive(rid, tf, payload, event_ms)

    # ------------------------------------------------------- event times
    def _admit(self, record) -> bool:
        """Whether a record is taken now (see the module's rules on event
        times); a held one is decided by the next of its partition."""
        kind, rid, t, _, origin, ref = record
        if t < 0:
            self._refuse(ref, f"{BAD_TIME}: {kind} event time {t} ms is negative")
            return False
        now_ms = self.clock() * 1000.0
        if t > now_ms + self.max_future:
            self._refuse(ref, f"{BAD_TIME}: {kind} event time {t} ms is more than {self.cfg.max_future_s:g} s "
                              f"ahead of the joiner's clock ({int(now_ms)} ms)")
            return False
        part = None if origin is None else (origin[0], origin[1])
        beyond = self.front is not None and t > self.front + self.max_future
        held = self._held.pop(part, None)
        if held is not None:
            if beyond or held[2] <= self.front + self.max_future:
                # Two in a row that far ahead: the stream jumped (a gap), both
                # are real; or the stream has caught up with the held one since.
                self._apply(held)
                beyond = t > self.front + self.max_future
                if not beyond:
                    return True
            else:
                    self._refuse(held[5], f"{BAD_TIME}: {held[0]} event time {held[2]} ms is more than "
                                      f"{self.cfg.max_future_s:g} s ahead of the stream (latest event time "
                                      f"{self.front} ms), and the next message of its partition is not")
        if beyond:
            self._held[part] = record
            return False
        return True

    def _apply(self, record, see: bool = True) -> None:
        kind, rid, t, body, origin, _ = record
        if kind == "features":
            self._add_features(rid, t, body, origin, see)
        else:
            self._add_action(rid, t, body[0], body[1], origin, see)

    def _refuse(self, ref, reason: str) -> None:
        self.counts["bad_times"] += 1
        if self.reject is not None:
            self.reject(ref, reason)

    # ---------------------------------------------------------- deciding
    def advance(self) -> int:
        """Finalizes requests and drops orphans below the watermark; returns
        the number of requests finalized."""
        if self._part_max and self.watermark < _FLUSH:
            self.watermark = max(self.watermark, self._low_time() - self.lateness)
        wm = self.watermark
        due = []  # (deadline, rid, event_ms, payload, kept state), from memory and disk, in deadline order
        heap = self._pending_heap
        while heap and heap[0][0] < wm:
            deadline, rid = heapq.heappop(heap)
            entry = self._pending.get(rid)
            if entry is None or entry[0] + self.window != deadline:
                continue  # emitted as a positive, or spilled
            del self._pending[rid]
            due.append((deadline, rid, entry[0], entry[1], self._kept(rid)))
        for row in self._store.pop_due(wm):
            due.append((row[1], row[0], row[2], row[3], self._kept(row[0], row)))
        due.sort(key=lambda d: d[0])
        for _, rid, tf, payload, kept in due:
            self._finalize(rid, tf, payload, kept)
        done = len(due)
        eh = self._early_heap
        while eh and eh[0][0] + self.window < wm:
            _, rid = heapq.heappop(eh)
            actions = self._early.pop(rid, None)
            if actions:
                self.counts["orphan_actions"] += len(actions)
        ch = self._closed_heap
        while ch and ch[0][0] + self.window + self.lateness < wm:
            _, rid = heapq.heappop(ch)
            self._closed.pop(rid, None)
        return done

    def flush(self) -> int:
        """End of stream: decide every waiting request now (and count the
        actions still waiting for features as orphans). Records held for
        their event time are taken with the rest, without moving the
        watermark."""
        held, self._held = list(self._held.values()), {}
        for record in held:
            self._apply(record, see=False)
        self.watermark = _FLUSH
        done = self.advance()
        self.watermark = max(self._part_max.values()) - self.lateness if self._part_max else -(2**62)
        return done

    # ------------------------------------------------------------ state
    def low_offsets(self) -> dict:
        """{(topic, partition): smallest offset still needed}, over
        everything pending in memory, on disk, or waiting for features."""
        low: dict = {}

        def see(origin):
            if origin is not None:
                key = (origin[0], origin[1])
                if key not in low or origin[2] < low[key]:
                    low[key] = origin[2]

        for _, _, origin in self._pending.values():
            see(origin)
        for record in self._held.values():
            see(record[4])
        for actions in self._early.values():
            for a in actions:
                see(a[3])
        for key, off in self._store.min_offsets().items():
            see((key[0], key[1], off))
        return low

    def drop_partitions(self, tps) -> int:
        """Forgets what came from these (topic, partition)s (after a
        rebalance moved them away: their new owner re-reads them)."""
        tps = set(tps)
        self._inputs -= tps
        for tp in tps:
            self._idle.pop(tp, None)
        held = 0
        for tp in tps:
            self._part_max.pop(tp, None)
            held += self._held.pop(tp, None) is not None
        gone = [rid for rid, (_, _, o) in self._pending.items() if o is not None and (o[0], o[1]) in tps]
        for rid in gone:
            del self._pending[rid]
            self._marked.pop(rid, None)
        for rid in [r for r, acts in self._early.items() if any(a[3] and (a[3][0], a[3][1]) in tps for a in acts)]:
            self._early[rid] = [a for a in self._early[rid] if not (a[3] and (a[3][0], a[3][1]) in tps)]
            if not self._early[rid]:
                del self._early[rid]
        return len(gone) + held + self._store.drop_partitions(tps)

    @property
    def waiting(self) -> int:
        """Requests waiting to be decided, and records held for their event time."""
        return len(self._pending) + len(self._store) + len(self._held)

    @property
    def in_memory(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._store.close()

    # ---------------------------------------------------------- internal
    def set_partitions(self, tps) -> None:
        """The input partitions: until each has been read (or reported
        caught up), the watermark waits for it."""
        self._inputs = set(tps)
        self._idle = {tp: t for tp, t in self._idle.items() if tp in self._inputs}

    def partition_idle(self, tp) -> None:
        """A partition read to its end, and silent for `idle_partition_s`
        since (wall clock: a producer may still hold its next messages),
        does not hold the watermark back until it has new messages."""
        self._idle.setdefault(tp, time.monotonic())

    def partition_busy(self, tp) -> None:
        """A partition reported idle has messages on their way after all
        (fetched, not yet handed over): it holds the watermark back again."""
        self._idle.pop(tp, None)

    def _low_time(self) -> int:
        now = time.monotonic()
        idle = {tp for tp, t in self._idle.items() if now - t >= self.cfg.idle_partition_s}
        active = self._inputs - idle
        if not active:
            return min(self._part_max.values())
        return min(self._part_max.get(tp, -(2**62)) for tp in active)

    def _see(self, event_ms: int, origin) -> None:
        part = None if origin is None else (origin[0], origin[1])
        if event_ms > self._part_max.get(part, -(2**62)):
            self._part_max[part] = event_ms
        if self.front is None or event_ms > self.front:
            self.front = event_ms
        if self._idle:
            self._idle.pop(part, None)

    def _positive(self, kind: str, value: float) -> bool:
        return kind in self.cfg.positive_types and value >= self.cfg.min_value

    def _emit_positive(self, rid: str, tf: int, payload: bytes, ta: int) -> None:
        self.counts["positives"] += 1
        self._close(rid, tf + self.window, True)
        self.emit(rid, self._encode(payload, 1.0, 1.0, ta))

    def _finalize(self, rid: str, tf: int, payload: bytes, kept=None) -> None:
        ta = self._marked.pop(rid, None) if self._marked else None
        if ta is not None:
            self._emit_positive(rid, tf, payload, ta)
            return
        self._close(rid, tf + self.window, False)
        if self._threshold >= 2**32 or zlib.crc32(rid.encode(), zlib.crc32(self._seed)) < self._threshold:
            self.counts["negatives"] += 1
            self.emit(rid, self._encode(payload, 0.0, self.cfg.negative_rate, tf + self.window))
        else:
            self.counts["negatives_sampled_out"] += 1

    def _close(self, rid: str, deadline: int, positive: bool) -> None:
        self._closed[rid] = (deadline, positive)
        heapq.heappush(self._closed_heap, (deadline, rid))

    def _park(self, rid: str) -> tuple:
        """What a spilled request keeps beside its row (the multi-label state)."""
        return ()

    def _kept(self, rid: str, row=None):
        """The state kept beside a request being decided (in memory, or in
        its spilled row): none here; the multi-label join's label state."""
        return None

    def _spill(self) -> None:
        target = int(self.cfg.max_in_memory * 0.9)
        rows = []
        heap = self._pending_heap
        while len(self._pending) > target and heap:
            deadline, rid = heapq.heappop(heap)
            entry = self._pending.get(rid)
            if entry is None or entry[0] + self.window != deadline:
                continue
            del self._pending[rid]
            o = entry[2] or ("", -1, -1)
            rows.append((rid, deadline, entry[0], entry[1], o[0], o[1], o[2], *self._park(rid)))
        self._store.put_many(rows)
        self.counts["spilled"] += len(rows)
