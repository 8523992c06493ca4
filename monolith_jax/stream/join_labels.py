"""The join of a multi-label config (`JoinConfig(labels=...)`): one named
Label per rule in each example (messages.py, version 2).

The event-time rules of `join_state` hold as they are (watermark,
lateness, holds, spill, orphans, at most one example per request); what
changes is what decides a request, per label (`labels.Labeller`):

- a request waits for the longest of its labels' windows; each label
  counts only the actions within its own window of the features (one past
  every window it counts in is late);
- with `emit_positives="on_action"` an example leaves before its window
  ends only once every label is decided: all binary labels are 1 (a value
  label, or a 0, is known only when the window closes); otherwise it leaves
  at the window's end, as with "at_window_end";
- its label time is the latest of those positive actions when it leaves
  early, else the end of its longest window;
- at the window's end each label is decided by its rule (0s sampled per
  label); an example whose labels are all undefined is dropped, counted as
  `negatives_sampled_out`.

Counters: `positives` counts examples with some binary label 1,
`negatives` the other examples emitted; per label, `NAME:positives`,
`NAME:negatives`, `NAME:sampled_out` (binary), `NAME:values`,
`NAME:defaults` (value) and `NAME:undefined`. An action is `repeat` when
the labels it makes were set already, `late` when it comes after every
window it counts in (or for an emitted request, for a label that was not
1), `other` when no label reads it.

A spilled request keeps its label state in the spill store beside its row.
`native_join.NativeJoinState` decides the same way in C++ (for the same
config), and the tests run both on the same streams.
"""

from __future__ import annotations

import heapq

from monolith_jax.stream.join_state import JoinState
from monolith_jax.stream.labels import Labeller
from monolith_jax.stream.messages import encode_example


class MultiLabelJoinState(JoinState):
    def __init__(self, config, emit, spill_dir=None, reject=None, clock=None, encode=None):
        kw = {} if clock is None else {"clock": clock}
        super().__init__(config, emit, spill_dir, reject=reject, **kw)
        if not config.labels:
            raise ValueError("MultiLabelJoinState needs JoinConfig(labels=...)")
        self.labeller = Labeller(config.labels, config.seed)
        self.window = self.labeller.window
        for name in self.labeller.counters:
            self.counts[name] = 0
        self._state: dict = {}   # rid -> label state, of the requests pending in memory

    # ------------------------------------------------------------ inputs
    def _add_features(self, rid, event_ms, payload, origin=None, see=True):
        if not self._accept_features(rid, event_ms, origin, see):
            return
        state = self.labeller.new()
        early = self._early.pop(rid, None)
        for ta, kind, value, _ in sorted(early or (), key=lambda a: a[0]):
            self._count(self.labeller.take(state, event_ms, ta, kind, value))
        if early and not self._defer and self.labeller.complete(state):
            self._emit(rid, event_ms, payload, state, max(state))
            return
        self._pending[rid] = (event_ms, payload, origin)
        self._state[rid] = state
        heapq.heappush(self._pending_heap, (event_ms + self.window, rid))
        if len(self._pending) > self.cfg.max_in_memory:
            self._spill()

    def _add_action(self, rid, event_ms, kind, value, origin=None, see=True):
        self.counts["actions"] += 1
        if see:
            self._see(event_ms, origin)
        closed = self._closed.get(rid)
        if closed is not None:
            self._count(self.labeller.closed_outcome(closed[1], kind, value))
            return
        waiting = self._pending.get(rid)
        if waiting is None and len(self._store):
            row = self._store.take(rid)
            if row is not None:
                self.counts["unspilled"] += 1
                self._state[rid] = self._kept(rid, row)
                waiting = (row[2], row[3], (row[4], row[5], row[6]))
                self._pending[rid] = waiting
                heapq.heappush(self._pending_heap, (row[2] + self.window, rid))
        if waiting is None:
            self._early.setdefault(rid, []).append((event_ms, kind, value, origin))
            heapq.heappush(self._early_heap, (event_ms, rid))
            return
        state = self._state[rid]
        self._count(self.labeller.take(state, waiting[0], event_ms, kind, value))
        if not self._defer and self.labeller.complete(state):
            del self._pending[rid]
            del self._state[rid]
            self._emit(rid, waiting[0], waiting[1], state, max(state))

    def _count(self, outcome: str) -> None:
        if outcome != "used":
            self.counts[{"repeat": "repeat_actions", "late": "late_actions", "other": "other_actions"}[outcome]] += 1

    # ---------------------------------------------------------- deciding
    def _finalize(self, rid, tf, payload, kept=None):
        self._emit(rid, tf, payload, kept if kept is not None else self.labeller.new(), tf + self.window)

    def _emit(self, rid, tf, payload, state, label_ms):
        self._close(rid, tf + self.window, self.labeller.positives(state))
        labels, positive = self.labeller.finish(rid, state, self.counts)
        if all(lab[3] for lab in labels):
            self.counts["negatives_sampled_out"] += 1
            return
        self.counts["positives" if positive else "negatives"] += 1
        self.emit(rid, encode_example(payload, 0.0, 1.0, label_ms, labels=labels))

    # ------------------------------------------------------------ spill
    def _park(self, rid):
        return (self.labeller.dumps(self._state.pop(rid)),)

    def _kept(self, rid, row=None):
        if row is None:
            return self._state.pop(rid, None)
        return self.labeller.loads(row[7]) if len(row) > 7 and row[7] else self.labeller.new()

    def drop_partitions(self, tps):
        n = super().drop_partitions(tps)
        self._state = {rid: s for rid, s in self._state.items() if rid in self._pending}
        return n
