"""What the soak runs, what it may kill, and the faults it injects (with
their weights in the mix)."""

from __future__ import annotations

import dataclasses


KILLABLE = ("joiner", "trainer", "serving-ps")
DAY_MS = 86_400_000
# What a fault is expected to become: a dead letter from the joiner (source
# topic features or actions), a dead letter from the trainer (the example
# it is in), a joiner counter (duplicates), or a trained example (valid).
FAULTS = {  # kind -> relative weight in the mix
    "garbage": 4, "truncated": 4, "nested_json": 2, "empty": 3, "oversize": 1, "near_limit": 1,
    "future_time": 3, "negative_time": 3, "dup_features": 4, "dup_action": 4, "large_valid": 1,
    "missing_sparse": 1,
}


@dataclasses.dataclass
class Config:
    job: str
    minutes: float = 10.0
    seed: int = 0
    out: str | None = None
    rate: float = 50.0                     # valid requests per second
    positive_share: float = 0.3            # of them, with a positive action
    fault_every_s: tuple = (0.5, 3.0)      # seconds between injected faults (uniform)
    kill_every_s: tuple = (40.0, 90.0)     # seconds between SIGKILLs (uniform), of a random victim
    kill_at: list | None = None            # instead: [(seconds after the traffic starts, name), ...]
    faults: tuple = tuple(FAULTS)
    window_s: float = 10.0                 # the joiner's window (event time)
    lateness_s: float = 2.0
    idle_flush_s: float = 4.0              # the joiner decides what waits after this long without input
    drain_timeout_s: float = 180.0
    start_timeout_s: float = 300.0
    stop_timeout_s: float = 60.0
    sample_rows: int = 500
    compile_cache: bool = True             # JAX's persistent compilation cache, in the run folder
    ids_per_feature: int = 5000
