"""A sync load for the serving benchmark: a stand-in trainer that pushes touched rows.

    python -m experiments.serving.sync_load --serving-ps HOST:PORT --rows N --keys KEYS.npy [--interval 1]

It holds the MovieLens DeepFM's table with a row for every key in KEYS.npy
(the ids of the data set), and every `interval` seconds applies a gradient step to `rows` random
ids of it, so that each sparse sync carries that many touched rows (the
live loop's figure); the dense params go every `dense-interval` seconds.
The pushes are the trainer's own (`SyncPusher`); only the training is
replaced by random steps, to load the serving side without loading the CPU
with a trainer.
"""

import argparse
import signal
import sys
import threading

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serving-ps", required=True)
    p.add_argument("--rows", type=int, required=True, help="touched rows per sync")
    p.add_argument("--keys", required=True, help=".npy file of the uint64 keys the table holds")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--dense-interval", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from monolith_jax.serving.export import dense_arrays
    from monolith_jax.examples.movielens.loop import movielens_trainer
    from monolith_jax.serving.sync import SyncPusher

    keys = np.load(args.keys, allow_pickle=False)
    if keys.dtype != np.uint64 or keys.ndim != 1:
        raise SystemExit(f"--keys must hold a 1-d uint64 array, got {keys.dtype}{keys.shape}")
    trainer = movielens_trainer(args.seed, out=lambda *a, **k: None)
    table = trainer.tables["ids"]
    table.lookup_host(keys)
    pusher = SyncPusher(trainer.tables, args.serving_ps, "sync-load", args.interval,
                        dense_source=lambda: (dense_arrays(trainer.params), 0.5), dense_interval_s=args.dense_interval)
    pusher.start()
    print(f"sync load of {args.rows} rows per {args.interval} s pushing to {args.serving_ps}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    rng = np.random.default_rng(args.seed)
    step = 0
    while not done.wait(args.interval):
        step += 1
        touched = rng.choice(keys, min(args.rows, keys.size), replace=False)
        grads = rng.normal(0, 0.01, (touched.size, table.config.dim)).astype(np.float32)
        table.apply_gradients_host(touched, grads, step=step)
    pusher.stop(final_push=False)
    print(f"sync load done {pusher.stats}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
