"""Which requests a trainer has trained: the memory behind exactly-once.

The joiner is at-least-once after its own crash: its successor re-reads
features from the oldest request still waiting and emits again the examples
of requests after it that had already left. A producer that retries, or a
user's app that sends a request twice, does the same. Every example carries
its request id; the decoder hashes it (`messages.request_hash`, 64 bits),
and `RequestDedup` remembers the hashes of the examples trained, so that a
second example of one request takes no row and is counted as a duplicate.

Memory is bounded by event time: hashes are added in chunks of up to
`chunk` distinct entries, and a chunk is forgotten once its newest event
time is more than `window_s` behind the newest the trainer has seen. The
hashes live in one open-addressing table in C++ (`RequestSet`: 8 bytes of
hash and 4 of chunk per slot, 60-85% of the slots filled: 14-20 bytes an id), each tagged with the
chunk it was last added in, so a lookup costs one probe run however many
chunks the window holds (a binary search per chunk of sorted arrays cost
1.8 us an example at 30 chunks). Duplicates come from
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
        from monolith_jax.sparse._native import engine

        self.window_ms = int(window_s * 1000)
        self.chunk = int(chunk)
        self._set = engine().RequestSet()
        self._frozen: list = []          # [(chunk number, newest event ms)], oldest first
        self._epoch = 0                  # the chunk filling
        self._recent = 0                 # its distinct hashes so far
        self._recent_ms = np.iinfo(np.int64).min
        self.newest_ms = np.iinfo(np.int64).min

    def __len__(self) -> int:
        return len(self._set)

    def seen(self, hashes: np.ndarray) -> np.ndarray:
        """A bool per hash: whether it was added (0, no request id, never is)."""
        return self._set.seen(np.ascontiguousarray(hashes, np.uint64))

    def add(self, hashes: np.ndarray, event_ms: np.ndarray) -> None:
        """Remembers trained examples' hashes (0s are skipped) with their
        event times, and forgets chunks older than the window."""
        hashes = np.ascontiguousarray(hashes, np.uint64)
        event_ms = np.asarray(event_ms, np.int64)
        keep = hashes != 0
        if keep.any():
            newest = int(event_ms[keep].max())
            self._recent += self._set.add(hashes, self._epoch)
            self._recent_ms = max(self._recent_ms, newest)
            self.newest_ms = max(self.newest_ms, newest)
            if self._recent >= self.chunk:
                self._frozen.append((self._epoch, self._recent_ms))
                self._epoch, self._recent, self._recent_ms = self._epoch + 1, 0, np.iinfo(np.int64).min
        self._expire()

    def _expire(self) -> None:
        horizon = self.newest_ms - self.window_ms
        old = 0
        while old < len(self._frozen) and self._frozen[old][1] < horizon:
            old += 1
        if old:
            # Chunks are forgotten oldest first: one newer than the horizon
            # keeps those after it (their newest times may be older).
            self._frozen = self._frozen[old:]
            self._set.expire(self._frozen[0][0] if self._frozen else self._epoch)

    # ------------------------------------------------------------ snapshot
    def state(self) -> dict:
        """Arrays for a snapshot: every chunk's hashes (each chunk's sorted),
        sizes and newest time, oldest chunk first."""
        hashes, epochs = self._set.dump()
        order = np.lexsort((hashes, epochs))
        hashes, epochs = hashes[order], epochs[order]
        chunks = dict(self._frozen)
        if self._recent:
            chunks[self._epoch] = self._recent_ms
        numbers, sizes = np.unique(epochs, return_counts=True)
        return {"hashes": hashes, "sizes": sizes.astype(np.int64),
                "newest_ms": np.array([chunks[int(e)] for e in numbers], np.int64)}

    def load(self, state: dict) -> None:
        """Replaces the memory with a snapshot's (`state()`); a state that
        does not add up raises ValueError and changes nothing."""
        try:
            hashes = np.ascontiguousarray(state["hashes"], np.uint64)
            sizes = np.asarray(state["sizes"], np.int64)
            newest = np.asarray(state["newest_ms"], np.int64)
        except KeyError as err:
            raise ValueError(f"request dedup state lacks {err}") from None
        if sizes.ndim != 1 or sizes.shape != newest.shape or (sizes < 0).any() or int(sizes.sum()) != hashes.size:
            raise ValueError(f"request dedup state does not add up: {hashes.size} hashes, chunk sizes "
                             f"{sizes.tolist()[:8]}..., {newest.size} chunk times")
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        self._set.clear()
        self._frozen = []
        for ms, lo, hi in zip(newest.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
            if hi > lo:  # chunks numbered from 0 in order, the filling one after them
                self._set.add(hashes[lo:hi], len(self._frozen))
                self._frozen.append((len(self._frozen), int(ms)))
        self._epoch, self._recent, self._recent_ms = len(self._frozen), 0, np.iinfo(np.int64).min
        self.newest_ms = max((ms for _, ms in self._frozen), default=np.iinfo(np.int64).min)
