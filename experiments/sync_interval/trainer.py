"""The sync-interval experiment's trainer process: one online trainer, several serving PSes.

    python -m experiments.sync_interval.trainer --bootstrap HOST:PORT \\
        --arm 1s=127.0.0.1:P:1 --arm 10s=127.0.0.1:Q:10 --arm frozen=127.0.0.1:R:0 [--export DIR]

It is `python -m monolith_jax.online.train` (the MovieLens DeepFM behind an
`OnlineTrainer`, every batch bucket compiled before the first example) with
one difference: its rows and dense params go to several serving PSes, one
per arm, each through its own `SyncPusher` at its own interval. So every
arm serves the same training run and the arms differ only in when they see
it.

A table's touched marks can be drained once, so each pusher reads the table
through a `TouchedFanout` view: a drain by any view drains the table and
hands the rows to every view; a view returns the rows touched since its own
last drain (newest values win). Each serving PS thus gets exactly the rows
the trainer changed since its own last push, as it would from a trainer of
its own.

Control, one line each on stdin:

    start     once every example in the topic is trained (the warm-up: the
              experiment says start when the joiner has decided every
              request): a full copy, rows and dense params, to every
              serving PS; then each arm's pusher
              follows its interval (dense params at the same interval unless
              --dense-interval is given). An arm of interval 0 gets this
              copy only: it is frozen from here on. Prints `syncing {...}`.
    stop      ends training; each running arm pushes once more; prints
              `trainer done {...}` and writes --summary (JSON) and
              --prequential-out (npz: the trainer's own scores before training).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

import numpy as np


class TouchedFanout:
    """One table's touched rows, drained once and handed to every view."""

    def __init__(self, table):
        self.table = table
        self._lock = threading.Lock()
        self._buffers: dict = {}   # view name -> [(keys, float32 values)] drained since its last drain

    def view(self, name: str) -> "FanoutView":
        with self._lock:
            self._buffers[name] = []
        return FanoutView(self, name)

    def release(self, name: str) -> None:
        """A view that will drain no more (a frozen arm): stop keeping rows for it."""
        with self._lock:
            self._buffers.pop(name, None)

    def drain(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            keys, values = self.table.drain_touched("float32")
            if keys.size:
                for parts in self._buffers.values():
                    parts.append((keys, values))
            parts, self._buffers[name] = self._buffers.get(name, []), []
        if not parts:
            return np.zeros(0, np.uint64), np.zeros((0, self.table.dim), np.float32)
        keys = np.concatenate([k for k, _ in parts])
        values = np.concatenate([v for _, v in parts])
        # A key drained twice since this view's last drain: its newest values.
        _, first_from_end = np.unique(keys[::-1], return_index=True)
        newest = keys.size - 1 - first_from_end
        return keys[newest], values[newest]


class FanoutView:
    """What a SyncPusher needs of a table, read through a TouchedFanout."""

    def __init__(self, fanout: TouchedFanout, name: str):
        self.fanout, self.name = fanout, name
        self.config = fanout.table.config

    def __len__(self) -> int:
        return len(self.fanout.table)

    def drain_touched(self, dtype="float32"):
        keys, values = self.fanout.drain(self.name)
        return keys, _cast(values, dtype)

    def export(self, dtype="float32"):
        return self.fanout.table.export(dtype)


def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    import ml_dtypes

    return values.astype({"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype])


def parse_arm(spec: str) -> dict:
    """NAME=HOST:PORT:INTERVAL -> {"name", "address", "interval_s"} (interval 0: frozen)."""
    name, _, rest = spec.partition("=")
    address, _, interval = rest.rpartition(":")
    if not name or not address or not interval:
        raise argparse.ArgumentTypeError(f"an arm is NAME=HOST:PORT:INTERVAL, got {spec!r}")
    return {"name": name, "address": address, "interval_s": float(interval)}


class MultiSync:
    """Every arm's pusher over one trainer's tables."""

    def __init__(self, online, arms: list, trainer_id: str, dense_interval_s: float | None = None):
        from monolith_jax.serving.export import dense_arrays

        self.online, self.arms = online, arms
        trainer = online.trainer
        self.fanouts = {name: TouchedFanout(t) for name, t in trainer.tables.items()}
        self.trainer_id = trainer_id
        self.dense_interval_s = dense_interval_s
        self._dense = lambda: (dense_arrays(trainer.params), online.negative_rate)
        self.pushers: dict = {}
        self.started_at = None

    def start(self) -> dict:
        """The full copy to every arm, then the running arms' intervals."""
        from monolith_jax.serving.sync import SyncPusher

        self.started_at = time.time()
        copies = {}
        for arm in self.arms:
            name, interval = arm["name"], arm["interval_s"]
            views = {t: f.view(name) for t, f in self.fanouts.items()}
            every = interval if interval > 0 else 3600.0   # a frozen arm's pusher never runs its loop
            pusher = SyncPusher(views, arm["address"], f"{self.trainer_id}-{name}", every, dense_source=self._dense,
                                dense_interval_s=(self.dense_interval_s or every) if interval > 0 else every)
            ok = pusher.push_once() and pusher.push_dense()
            copies[name] = {"applied": bool(ok), "rows": pusher.stats["rows"]}
            if interval > 0:
                pusher.start()
            else:
                for f in self.fanouts.values():
                    f.release(name)
            self.pushers[name] = pusher
        return copies

    def stop(self) -> dict:
        out = {}
        for arm in self.arms:
            pusher = self.pushers.get(arm["name"])
            if pusher is None:
                continue
            pusher.stop(final_push=arm["interval_s"] > 0)
            out[arm["name"]] = {"interval_s": arm["interval_s"], "stats": dict(pusher.stats),
                                "history": [dict(zip(("time", "full", "rows", "bytes", "table_rows"), h))
                                            for h in pusher.history]}
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--group", default="sync-interval-trainer")
    p.add_argument("--arm", type=parse_arm, action="append", required=True, help="NAME=HOST:PORT:INTERVAL (0: frozen)")
    p.add_argument("--dense-interval", type=float, default=None,
                   help="seconds between dense syncs (default: each arm's own interval)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--max-wait", type=float, default=0.1, help="seconds a partial batch waits for more")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", default=None, help="write the exported model here before training (for predictors)")
    p.add_argument("--summary", default=None, help="write the summary as JSON to this file")
    p.add_argument("--prequential-out", default=None, help="write the trainer's own scores (npz) here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from monolith_jax.examples.movielens.loop import movielens_trainer
    from monolith_jax.online.trainer import OnlineTrainer

    quiet = dict(out=lambda *a, **k: None)
    trainer = movielens_trainer(args.seed, **quiet)
    online = OnlineTrainer(trainer, args.bootstrap, group=args.group, batch_size=args.batch,
                           max_wait_s=args.max_wait, warmup=True, **quiet)
    if args.export:
        from monolith_jax.serving.export import export_model

        export_model(trainer, args.export)
    sync = MultiSync(online, args.arm, args.group, args.dense_interval)
    stop = threading.Event()
    state: dict = {}

    def control() -> None:
        from monolith_jax.stream import kafka as K

        for line in sys.stdin:
            word = line.strip()
            if word == "start" and "start" not in state:
                # Trained all there is: this group has committed the end of every partition, twice in a row.
                lag = K.LagGate(args.bootstrap, args.group, [K.TOPICS["examples"]], 0)
                while not stop.is_set():
                    if lag.lag() == 0:
                        time.sleep(0.2)
                        if lag.lag() == 0:
                            break
                    time.sleep(0.05)
                lag.close()
                state["start"] = {"examples": online.examples, "copies": sync.start(), "time": sync.started_at}
                print("syncing " + json.dumps(state["start"]), flush=True)
            elif word == "stop":
                break
        stop.set()

    threading.Thread(target=control, name="control", daemon=True).start()
    print(f"trainer ready (warm-up compile {online.warmup_s:.1f} s)", flush=True)
    summary = online.run(stop=stop, report_every_s=0)
    summary.pop("sync_history", None)
    summary["arms"] = sync.stop()
    summary["start"] = state.get("start")
    if args.prequential_out:
        online.log.save(args.prequential_out)
    line = json.dumps(summary, default=float)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            f.write(line)
    print("trainer done " + json.dumps({k: summary[k] for k in ("examples", "batches", "seconds")}), flush=True)
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
