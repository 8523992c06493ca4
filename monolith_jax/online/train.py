"""An online trainer process: the examples topic -> the MovieLens DeepFM.

    python -m monolith_jax.online.train --bootstrap HOST:PORT [--group G] [--idle-timeout S]

Several such processes with one `--group` share the topic's partitions.
On exit (idle timeout, `--max-examples`, SIGTERM) it prints a JSON summary
line `trainer done {...}` and, with `--summary`, writes it to a file. With
`--serving-ps` it pushes touched rows and dense params there; with
`--export DIR` it writes the exported model (`monolith_jax.serving.export`) for a
predictor. With `--snapshot-dir` it snapshots everything (Orbax) by time
or steps and on SIGTERM, commits offsets only with a complete snapshot,
and resumes from the newest good one after a crash.

Scale-out (`monolith_jax.distributed.cluster` starts these for you):
- `--ps HOST:PORT,HOST:PORT`: the tables live on training PS shards
  (`training_ps`), in that shard order; this process holds no rows.
- `--coordinator HOST:PORT --trainers M --trainer-index J`: one of M
  data-parallel trainers (`monolith_jax.distributed.data_parallel`, synchronous all-reduce
  of the dense gradients); J = 0 is the chief, which pushes the dense
  params and has the shards snapshot. The group takes one snapshot, in
  `--snapshot-dir`/trainers: the chief writes the dense params and every
  member's offsets, and every member resumes from it.
- `--async-dense`: instead of the all-reduce, exchange dense deltas with
  the master copy on the first shard (`dense_ps`), as Monolith does.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from monolith_jax.stream import kafka as K


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--group", default="monolith-trainer")
    p.add_argument("--topic-examples", default=K.TOPICS["examples"])
    p.add_argument("--topic-dead-letters", default=K.TOPICS["dead_letters"])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--max-wait", type=float, default=0.5, help="seconds a partial batch waits for more")
    p.add_argument("--idle-timeout", type=float, default=None, help="stop after this long with no examples")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serving-ps", default=None, help="HOST:PORT of a serving PS to push touched rows to")
    p.add_argument("--sync-interval", type=float, default=2.0, help="seconds between sparse syncs")
    p.add_argument("--dense-sync-interval", type=float, default=30.0, help="seconds between dense syncs")
    p.add_argument("--export", default=None,
                   help="write the exported model here at start (for a predictor) and again at exit")
    p.add_argument("--snapshot-dir", default=None,
                   help="Orbax snapshots here; resume from the newest; offsets committed only with a snapshot")
    p.add_argument("--snapshot-every-s", type=float, default=60.0, help="seconds between snapshots")
    p.add_argument("--snapshot-every-steps", type=int, default=None, help="steps between snapshots")
    p.add_argument("--keep-snapshots", type=int, default=3)
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling every batch bucket before the first example")
    p.add_argument("--ps", default=None, help="comma-separated training PS shard addresses, in shard order")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of jax.distributed's coordinator (trainer 0's)")
    p.add_argument("--trainers", type=int, default=1, help="data-parallel trainers in the group")
    p.add_argument("--trainer-index", type=int, default=0)
    p.add_argument("--async-dense", action="store_true",
                   help="exchange dense deltas with the first shard instead of all-reducing (needs --ps)")
    p.add_argument("--dense-exchange-every", type=int, default=1, help="steps between async dense exchanges")
    p.add_argument("--prequential-out", default=None,
                   help="write the labels and scores given before training (npz) to this file at exit")
    p.add_argument("--metrics", default=None, help="append metrics as JSON lines to this file")
    p.add_argument("--summary", default=None, help="write the final summary as JSON to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.async_dense and (not args.ps or args.coordinator):
        p.error("--async-dense needs --ps and no --coordinator")
    dp = None
    if args.coordinator:  # before any other JAX call
        from monolith_jax.distributed.data_parallel import DataParallel

        dp = DataParallel(args.coordinator, args.trainers, args.trainer_index)
    from monolith_jax.examples.movielens.loop import movielens_trainer
    from monolith_jax.online.trainer import OnlineTrainer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    trainer = movielens_trainer(args.seed, metrics_path=args.metrics)
    addresses = args.ps.split(",") if args.ps else []
    if addresses:
        from monolith_jax.distributed.training_ps import use_shards

        use_shards(trainer, addresses)
    if dp is not None:
        dp.attach(trainer)
    dense_exchange = None
    if args.async_dense:
        from monolith_jax.distributed.dense_ps import AsyncDense

        dense_exchange = AsyncDense(addresses[0], f"{args.group}-{args.trainer_index}", args.dense_exchange_every)
    snapshots = None
    if args.snapshot_dir:
        import os

        from monolith_jax.snapshot import Snapshots

        # A data-parallel group shares one snapshot folder (the chief writes
        # it); asynchronous trainers on shards keep one each.
        folder = args.snapshot_dir if args.trainers == 1 and not addresses else \
            os.path.join(args.snapshot_dir, "trainers") if dp is not None else \
            os.path.join(args.snapshot_dir, f"trainer-{args.trainer_index}")
        snapshots = Snapshots(folder, every_s=args.snapshot_every_s, every_steps=args.snapshot_every_steps,
                              keep=args.keep_snapshots)
    online = OnlineTrainer(trainer, args.bootstrap, {"examples": args.topic_examples,
                                                    "dead_letters": args.topic_dead_letters},
                           args.group, batch_size=args.batch, max_wait_s=args.max_wait,
                           serving_ps=args.serving_ps, sparse_sync_interval_s=args.sync_interval,
                           dense_sync_interval_s=args.dense_sync_interval, warmup=not args.no_warmup,
                           snapshots=snapshots, dense_exchange=dense_exchange,
                           trainer_id=f"{args.group}-{args.trainer_index}")
    if args.export:
        from monolith_jax.serving.export import export_model

        export_model(trainer, args.export)
    summary = online.run(args.max_examples, args.idle_timeout, args.max_seconds, stop)
    if args.export:
        export_model(trainer, args.export, negative_rate=online.negative_rate or 1.0)
    summary["segment_aucs"] = online.log.segment_aucs(10)
    if args.prequential_out:
        online.log.save(args.prequential_out)
    line = json.dumps(summary, default=float)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            f.write(line)
    print("trainer done " + line, flush=True)
    if snapshots is not None:
        snapshots.close()
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
