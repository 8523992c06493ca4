"""Which requests a trainer has trained: the memory behind exactly-once.

The joiner is at-least-once after its own crash: its successor re-reads
features from the oldest request still waiting and emits again the examples
of requests after it that had already left. A producer that retries, or a
user's app that sends a request twice, does the same. Every example carries
its request id; the decoder hashes it (`messages.request_hash`, 64 bits),
and `RequestDedup` remembers the hashes of the examples trained, so that a
second example of one request takes no row and is counted as a duplicate.

Memory is bounded by event time: hashes live in chunks of up to `chunk`
entries (each one sorted uint64 array, 8 bytes an id; the one filling is
merged into as batches are trained), and a chunk is forgotten once its newest event time is more than
`window_s` behind the newest the trainer has seen. Duplicates come from
re-reads that reach back at most the joiner's window (plus its restart), so
the window needs to cover that, not the stream's history. The state goes
into the trainer's snapshots (`state()` / `load()`), in step with the
stream offsets, so that a trainer resumed from a snapshot remembers
exactly what it had trained up to that snapshot.

A data-parallel group keeps each member's memory in that member only (its
snapshots hold the group's dense state and offsets, not every member's
ids): a group restarted from a snapshot starts with an empty memory, and a
partition that moves to another member in a rebalance leaves its ids with
the old one.

Two different request ids share a hash with probability about n^2 / 2^65
for n remembered ids (1e-6 at six million): the later one would be dropped
as a duplicate.
"""

from __future__ import annotations

import numpy as np

DEFAULT_WINDOW_S = 900.0


def in_sorted(arr: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A bool per value of `x`: whether the sorted array `arr` holds it."""
    if not arr.size:
        return np.zeros(x.shape, bool)
    at = np.minimum(np.searchsorted(arr, x), arr.size - 1)
    return arr[at] == x


def merge_sorted(arr: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The sorted array `arr` with `new`'s values not in it (one pass, no re-sort of `arr`)."""
    new = np.unique(new)
    new = new[~in_sorted(arr, new)]
    return np.insert(arr, np.searchsorted(arr, new), new) if new.size else arr


class RequestDedup:
    def __init__(self, window_s: float = DEFAULT_WINDOW_S, chunk: int = 1 << 16):
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.window_ms = int(window_s * 1000)
        self.chunk = int(chunk)
        self._frozen: list = []          # [(newest event ms, sorted uint64 hashes)]
        self._recent = np.zeros(0, np.uint64)   # the chunk filling, sorted
        self._recent_ms = np.iinfo(np.int64).min
        self.newest_ms = np.iinfo(np.int64).min

    def __len__(self) -> int:
        return self._recent.size + sum(a.size for _, a in self._frozen)

    def seen(self, hashes: np.ndarray) -> np.ndarray:
        """A bool per hash: whether it was added (0, no request id, never is)."""
        hashes = np.asarray(hashes, np.uint64)
        found = in_sorted(self._recent, hashes)
        for _, arr in self._frozen:
            found |= in_sorted(arr, hashes)
        return found & (hashes != 0)

    def add(self, hashes: np.ndarray, event_ms: np.ndarray) -> None:
        """Remembers trained examples' hashes (0s are skipped) with their
        event times, and forgets chunks older than the window."""
        hashes = np.asarray(hashes, np.uint64)
        event_ms = np.asarray(event_ms, np.int64)
        keep = hashes != 0
        if keep.any():
            newest = int(event_ms[keep].max())
            self._recent = merge_sorted(self._recent, hashes[keep])
            self._recent_ms = max(self._recent_ms, newest)
            self.newest_ms = max(self.newest_ms, newest)
            if self._recent.size >= self.chunk:
                self._frozen.append((self._recent_ms, self._recent))
                self._recent = np.zeros(0, np.uint64)
                self._recent_ms = np.iinfo(np.int64).min
        self._expire()

    def _expire(self) -> None:
        horizon = self.newest_ms - self.window_ms
        self._frozen = [(ms, a) for ms, a in self._frozen if ms >= horizon]

    # ------------------------------------------------------------ snapshot
    def state(self) -> dict:
        """Arrays for a snapshot: every chunk's hashes, sizes and newest time."""
        chunks = list(self._frozen)
        if self._recent.size:
            chunks.append((self._recent_ms, self._recent))
        return {"hashes": np.concatenate([a for _, a in chunks]) if chunks else np.zeros(0, np.uint64),
                "sizes": np.array([a.size for _, a in chunks], np.int64),
                "newest_ms": np.array([ms for ms, _ in chunks], np.int64)}

    def load(self, state: dict) -> None:
        """Replaces the memory with a snapshot's (`state()`); a state that
        does not add up raises ValueError and changes nothing."""
        try:
            hashes = np.asarray(state["hashes"], np.uint64)
            sizes = np.asarray(state["sizes"], np.int64)
            newest = np.asarray(state["newest_ms"], np.int64)
        except KeyError as err:
            raise ValueError(f"request dedup state lacks {err}") from None
        if sizes.shape != newest.shape or (sizes < 0).any() or int(sizes.sum()) != hashes.size:
            raise ValueError(f"request dedup state does not add up: {hashes.size} hashes, chunk sizes "
                             f"{sizes.tolist()[:8]}..., {newest.size} chunk times")
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        chunks = [(int(ms), np.sort(hashes[bounds[i]:bounds[i + 1]])) for i, ms in enumerate(newest)]
        self._frozen = [c for c in chunks if c[1].size]
        self._recent, self._recent_ms = np.zeros(0, np.uint64), np.iinfo(np.int64).min
        self.newest_ms = max((ms for ms, _ in self._frozen), default=np.iinfo(np.int64).min)
