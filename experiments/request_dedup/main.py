"""The trainer's request dedup (exactly-once by request id), per example,
against what it replaced and what a user would write, in one run.

    python -m experiments.request_dedup.main              # ~1 min; replaces results/
    python -m experiments.request_dedup.main --examples 500000 --rounds 3

Each round streams the same batches of 1,024 random 64-bit request hashes
(with 2% repeats of earlier ones, as a joiner's re-emissions give) through
`seen` (the decoder's check before a batch is built) and `add` (after it
is trained), with event times spread so that the window holds `--window-
chunks` chunks of 65,536 hashes once it is full. Three memories:

- `RequestDedup`: one open-addressing set in C++, each hash tagged with its
  chunk (monolith_jax/online/dedup.py);
- sorted chunks: a sorted uint64 array per chunk, a binary search in each
  (the previous RequestDedup, with the package's own in_sorted/merge_sorted);
- Python set: a `set` of ints per chunk, looked up in each.

Every memory must give the same answers (checked): the figures are
nanoseconds per example for seen and add, medians of the rounds, and the
bytes per remembered id of the two array-backed memories at each round's end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from experiments import run_folder
from monolith_jax.online.dedup import RequestDedup, in_sorted, merge_sorted

BATCH = 1024
CHUNK = 1 << 16


class SortedChunks:
    """The previous memory: a sorted array per chunk, expired by event time."""

    def __init__(self, window_ms: int):
        self.window_ms, self.frozen, self.recent, self.recent_ms, self.newest = window_ms, [], np.zeros(0, np.uint64), 0, 0

    def seen(self, h):
        found = in_sorted(self.recent, h)
        for _, arr in self.frozen:
            found |= in_sorted(arr, h)
        return found

    def add(self, h, ms):
        self.recent = merge_sorted(self.recent, h)
        self.recent_ms = max(self.recent_ms, int(ms.max()))
        self.newest = max(self.newest, self.recent_ms)
        if self.recent.size >= CHUNK:
            self.frozen.append((self.recent_ms, self.recent))
            self.recent, self.recent_ms = np.zeros(0, np.uint64), 0
        self.frozen = [(t, a) for t, a in self.frozen if t >= self.newest - self.window_ms]


class PythonSets:
    """A user's first version: a Python set of ints per chunk."""

    def __init__(self, window_ms: int):
        self.window_ms, self.frozen, self.recent, self.recent_ms, self.newest = window_ms, [], set(), 0, 0

    def seen(self, h):
        sets = [s for _, s in self.frozen] + [self.recent]
        return np.fromiter((any(x in s for s in sets) for x in h.tolist()), bool, h.size)

    def add(self, h, ms):
        self.recent.update(h.tolist())
        self.recent_ms = max(self.recent_ms, int(ms.max()))
        self.newest = max(self.newest, self.recent_ms)
        if len(self.recent) >= CHUNK:
            self.frozen.append((self.recent_ms, self.recent))
            self.recent, self.recent_ms = set(), 0
        self.frozen = [(t, s) for t, s in self.frozen if t >= self.newest - self.window_ms]


def stream(examples: int, window_chunks: int, seed: int):
    """Batches of (hashes, event ms): 1 ms of event time per example, so a
    window of window_chunks * CHUNK ms holds that many chunks."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(1, 2**63, examples, dtype=np.uint64)
    repeat = rng.random(examples) < 0.02
    back = np.maximum(np.arange(examples) - rng.integers(1, 50_000, examples), 0)
    hashes[repeat] = hashes[back[repeat]]
    ms = np.arange(examples, dtype=np.int64)
    return [(hashes[i:i + BATCH], ms[i:i + BATCH]) for i in range(0, examples, BATCH)], window_chunks * CHUNK


def bytes_per_id(memory) -> float:
    """Bytes the memory's tables take per hash it remembers (what it holds
    more is not counted: Python sets have no such figure here)."""
    if isinstance(memory, RequestDedup):
        return memory._set.slots * 12 / max(len(memory), 1)
    if isinstance(memory, SortedChunks):
        arrays = [a for _, a in memory.frozen] + [memory.recent]
        return 8 * sum(a.size for a in arrays) / max(np.unique(np.concatenate(arrays)).size, 1)
    return float("nan")


def timed(memory, batches) -> tuple[float, float, np.ndarray]:
    t_seen = t_add = 0.0
    answers = []
    for h, ms in batches:
        t0 = time.perf_counter()
        answers.append(memory.seen(h))
        t1 = time.perf_counter()
        memory.add(h, ms)
        t_add += time.perf_counter() - t1
        t_seen += t1 - t0
    n = sum(h.size for h, _ in batches)
    return t_seen / n * 1e9, t_add / n * 1e9, np.concatenate(answers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2_000_000, help="examples per round")
    p.add_argument("--window-chunks", type=int, default=24, help="chunks of 65,536 hashes the window holds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="results folder (default: results/ for the default command)")
    args = p.parse_args(argv)
    out_dir = str(run_folder.output_dir("request_dedup", p, args))
    print(f"Request dedup: {args.examples:,} examples a round in batches of {BATCH:,}, a window of "
          f"{args.window_chunks} chunks of {CHUNK:,}; ns per example (seen / add):")
    makers = {"RequestDedup (C++ set)": lambda w: RequestDedup(window_s=w / 1000, chunk=CHUNK),
              "sorted chunks (previous)": SortedChunks, "Python set per chunk": PythonSets}
    rounds = {name: [] for name in makers}
    for r in range(args.rounds):
        batches, window_ms = stream(args.examples, args.window_chunks, seed=r)
        answers, sizes = {}, {}
        for name, make in makers.items():
            memory = make(window_ms)
            seen_ns, add_ns, answers[name] = timed(memory, batches)
            rounds[name].append((seen_ns, add_ns))
            sizes[name] = bytes_per_id(memory)
        first = next(iter(answers.values()))
        assert all(np.array_equal(first, a) for a in answers.values()), "the memories disagree"
        print(f"  round {r + 1}/{args.rounds}: " + "; ".join(f"{n} {s:,.0f} / {a:,.0f}" for n, ((s, a),)
                                                                 in ((n, v[-1:]) for n, v in rounds.items()))
              + f"  ({int(first.sum()):,} repeats found; bytes per id held: C++ set "
                f"{sizes['RequestDedup (C++ set)']:.1f}, sorted chunks {sizes['sorted chunks (previous)']:.1f})")
    med = {n: (statistics.median(s for s, _ in v), statistics.median(a for _, a in v)) for n, v in rounds.items()}
    ours = sum(med["RequestDedup (C++ set)"])
    print("medians (seen / add ns per example, and seen + add against RequestDedup's):")
    for name, (s, a) in med.items():
        print(f"  {name:26s} {s:8,.0f} / {a:6,.0f}   {(s + a) / ours:6.1f}x")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"rounds": rounds, "median": med, "args": vars(args)}, f, indent=1)
    print(f"wrote {out_dir}/results.json")


if __name__ == "__main__":
    main()
