"""What the online trainer measures and how it pads: prequential logs (the
scores each batch got before it was trained on; per head for a job with
heads) and `shrink`, which pads a partial batch to the next power of two."""

from __future__ import annotations

import collections

import numpy as np

from monolith_jax.metrics import auc


class PrequentialLog:
    """Labels and the scores given before training, over the whole stream,
    with the running AUC of the last `window` examples."""

    def __init__(self, window: int = 50_000):
        self.window = window
        self._labels: list = []
        self._scores: list = []
        self._times: list = []
        self._recent = collections.deque()
        self._recent_n = 0

    def add(self, labels, scores, event_ms) -> None:
        self._labels.append(np.asarray(labels, np.float32))
        self._scores.append(np.asarray(scores, np.float32))
        self._times.append(np.asarray(event_ms, np.int64))
        self._recent.append((self._labels[-1], self._scores[-1]))
        self._recent_n += len(labels)
        while self._recent and self._recent_n - len(self._recent[0][0]) >= self.window:
            self._recent_n -= len(self._recent.popleft()[0])

    def __len__(self) -> int:
        return sum(len(x) for x in self._labels)

    def recent(self):
        """(labels, scores) of the last `window` examples."""
        if not self._recent:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        return np.concatenate([r[0] for r in self._recent]), np.concatenate([r[1] for r in self._recent])

    def running_auc(self) -> float:
        if not self._recent:
            return float("nan")
        return auc(*self.recent())

    def arrays(self):
        """(labels, scores, event_ms), in training order."""
        if not self._labels:
            return np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        return np.concatenate(self._labels), np.concatenate(self._scores), np.concatenate(self._times)

    def save(self, path: str) -> None:
        """labels, scores and event_ms as an .npz file (arrays only)."""
        labels, scores, event_ms = self.arrays()
        np.savez(path, labels=labels, scores=scores, event_ms=event_ms)

    def segment_aucs(self, segments: int = 10) -> list:
        """AUC of each of `segments` equal slices of the stream, in order."""
        y, s, _ = self.arrays()
        return [auc(a, b) for a, b in zip(np.array_split(y, segments), np.array_split(s, segments))]


class HeadLogs:
    """Prequential logs of a job's heads: each head's labels and scores over
    the rows where it is defined (mask > 0). Binary heads report AUC, value
    heads RMSE; `main` is the first binary head's log (or the first's)."""

    def __init__(self, heads, window: int = 50_000):
        self.heads = tuple(heads)
        self.logs = {h.name: PrequentialLog(window) for h in self.heads}
        first = next((h for h in self.heads if h.binary), self.heads[0])
        self.main = self.logs[first.name]

    def add(self, batch, scores: dict, rows: int, event_ms) -> None:
        labels = np.asarray(batch.labels)[:rows]
        mask = np.asarray(batch.label_mask)[:rows] if batch.label_mask is not None else np.ones_like(labels)
        event_ms = np.asarray(event_ms)
        for k, h in enumerate(self.heads):
            on = mask[:, k] > 0
            self.logs[h.name].add(labels[on, k], np.asarray(scores[h.name])[:rows][on], event_ms[on])

    def _metric(self, h, y, s) -> dict:
        if h.binary:
            return {"auc": round(auc(y, s), 4) if y.size else float("nan"), "examples": int(y.size)}
        rmse = float(np.sqrt(np.mean(np.square(s - y)))) if y.size else float("nan")
        return {"rmse": round(rmse, 4), "examples": int(y.size)}

    def running(self) -> dict:
        """Each head's metric over its last `window` defined examples."""
        out = {}
        for h in self.heads:
            out[h.name] = self._metric(h, *self.logs[h.name].recent())
        return out

    def save(self, path: str) -> None:
        """Each head's labels, scores and event_ms as `HEAD.labels`, ... in one .npz (arrays only)."""
        arrays = {}
        for name, hlog in self.logs.items():
            for key, a in zip(("labels", "scores", "event_ms"), hlog.arrays()):
                arrays[f"{name}.{key}"] = a
        np.savez(path, **arrays)

    def summary(self) -> dict:
        """Each head's metric over the whole stream (prequential)."""
        out = {}
        for h in self.heads:
            y, s, _ = self.logs[h.name].arrays()
            out[h.name] = self._metric(h, y, s)
        return out


def shrink(batch, rows: int, min_bucket: int):
    """A batch of `rows` real examples padded to batch.size -> padded only to
    the next power of two (at least `min_bucket`): a partial batch (low
    traffic, `max_wait_s` passed) costs a step of its own size, and the step
    compiles once per bucket, not per size."""
    from monolith_jax.features import SparseBatch
    from monolith_jax.sparse import Keys

    size = max(1 << max(rows - 1, 0).bit_length(), min_bucket)
    if size >= batch.size:
        return batch
    return SparseBatch(ids={n: Keys(k.words[:size]) for n, k in batch.ids.items()},
                       lengths={n: v[:size] for n, v in batch.lengths.items()}, dense=batch.dense[:size],
                       labels=batch.labels[:size], weights=batch.weights[:size],
                       label_mask=None if batch.label_mask is None else batch.label_mask[:size])
