"""The trainer process: a job's model, trained from files or from the examples topic.

    monolith train --job MODULE:NAME --data train.parquet [--epochs N] [--validation test.parquet]
    monolith train --job MODULE:NAME --bootstrap HOST:PORT [--group G] [--idle-timeout S]

`--host-devices N` splits each batch's dense step over N CPU devices of the
process (the tables stay on the host; the same update as one device).

From files (CSV/Parquet, the job's feature columns and label): `--epochs`
passes in order, an evaluation after each with `--validation`; then a
snapshot, an export and a full push to the serving PS, as asked. From the
stream:
several such processes with one `--group` share the topic's partitions.
On exit (idle timeout, `--max-examples`, SIGTERM) it prints a JSON summary
line `trainer done {...}` and, with `--summary`, writes it to a file. With
`--serving-ps` it pushes touched rows and dense params there; with
`--export DIR` it writes the exported model (`monolith_jax.serving.export`) for a
predictor. With `--snapshot-dir` it snapshots everything (Orbax) by time
or steps and on SIGTERM, commits offsets only with a complete snapshot,
and resumes from the newest good one after a crash; with
`--snapshot-full-every K` every Kth snapshot is full and the ones between
are deltas (the rows changed since the one before), restored in order.

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
    p = argparse.ArgumentParser(prog="monolith train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--job", required=True, help="MODULE:NAME of the job to train")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", default=None, help="train from these CSV/Parquet files")
    source.add_argument("--bootstrap", default=None, help="train from the examples topic of this Kafka cluster")
    p.add_argument("--epochs", type=int, default=1, help="passes over --data")
    p.add_argument("--validation", nargs="+", default=None, help="files to evaluate after each epoch (--data)")
    p.add_argument("--group", default="monolith-trainer", help="consumer group the trainers share")
    p.add_argument("--topic-examples", default=K.TOPICS["examples"], help="the examples topic")
    p.add_argument("--topic-dead-letters", default=K.TOPICS["dead_letters"], help="the dead-letters topic")
    p.add_argument("--batch", type=int, default=None, help="examples per step (default: the job's batch_size)")
    p.add_argument("--max-wait", type=float, default=0.5, help="seconds a partial batch waits for more")
    p.add_argument("--idle-timeout", type=float, default=None, help="stop after this long with no examples, counted from the last one; "
                        "before the first, after max(this, 60) s")
    p.add_argument("--dedup-window", type=float, default=900.0,
                   help="seconds of event time a trained request id is remembered: a second example of it "
                        "is dropped and counted (0: off)")
    p.add_argument("--max-examples", type=int, default=None, help="stop after this many examples (stream)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long (stream)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's init and the tables' initializers")
    p.add_argument("--serving-ps", default=None, help="HOST:PORT of a serving PS to push touched rows to")
    p.add_argument("--sync-interval", type=float, default=2.0, help="seconds between sparse syncs")
    p.add_argument("--dense-sync-interval", type=float, default=30.0, help="seconds between dense syncs")
    p.add_argument("--export", default=None,
                   help="write the exported model here at start (for a predictor) and again at exit")
    p.add_argument("--snapshot-dir", default=None,
                   help="Orbax snapshots here; resume from the newest; offsets committed only with a snapshot")
    p.add_argument("--snapshot-every-s", type=float, default=60.0, help="seconds between snapshots")
    p.add_argument("--snapshot-every-steps", type=int, default=None, help="steps between snapshots")
    p.add_argument("--keep-snapshots", type=int, default=3,
                   help="snapshots kept on disk (with --snapshot-full-every > 1: full ones, each with its deltas)")
    p.add_argument("--snapshot-full-every", type=int, default=1,
                   help="every Kth snapshot is full, the ones between are deltas holding only the table rows "
                        "changed since the snapshot before (incremental snapshots); 1: every snapshot full")
    p.add_argument("--snapshot-release-memory", action="store_true",
                   help="return each table's dump memory after every snapshot write instead of keeping it for the "
                        "next dump (which then copies into pages already faulted in, blocking training less); "
                        "for tables too large to hold twice")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling every batch bucket before the first example")
    p.add_argument("--ps", default=None, help="comma-separated training PS shard addresses, in shard order")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of jax.distributed's coordinator (trainer 0's)")
    p.add_argument("--trainers", type=int, default=1, help="data-parallel trainers in the group")
    p.add_argument("--trainer-index", type=int, default=0, help="this trainer's index in the group (0: the chief)")
    p.add_argument("--async-dense", action="store_true",
                   help="exchange dense deltas with the first shard instead of all-reducing (needs --ps)")
    p.add_argument("--dense-exchange-every", type=int, default=1, help="steps between async dense exchanges")
    p.add_argument("--prequential-out", default=None,
                   help="write the labels and scores given before training (npz; per head, as HEAD.labels, ...) to this file at exit")
    p.add_argument("--placement", default="auto", choices=["auto", "in_jit", "host"],
                   help="the training step: auto (in-jit FFI tables when the dense step runs on the CPU, "
                        "tables on the host around a device step otherwise), in_jit, or host")
    p.add_argument("--host-devices", type=int, default=1,
                   help="split each batch's dense step over this many CPU devices of this process, tables on the "
                        "host (XLA's host platform device count, set before JAX starts; data parallel, the same "
                        "update): on a CPU with that many cores, faster than one device (experiments/dense_step)")
    p.add_argument("--metrics", default=None, help="append metrics as JSON lines to this file")
    p.add_argument("--tensorboard", default=None,
                   help="also write the metrics as TensorBoard event files into this folder")
    p.add_argument("--summary", default=None, help="write the final summary as JSON to this file")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="the trainer's log level (info: assignments, rebalances, snapshots, commits)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.async_dense and (not args.ps or args.coordinator):
        p.error("--async-dense needs --ps and no --coordinator")
    if args.data and (args.ps or args.coordinator or args.async_dense):
        p.error("--data trains one process on local tables: --ps, --coordinator and --async-dense need --bootstrap")
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.host_devices < 1:
        p.error("--host-devices must be >= 1")
    if args.host_devices > 1:   # before the job's module, which may start JAX
        if args.coordinator or args.ps:
            p.error("--host-devices splits one process's dense step over its own CPU devices: not with "
                    "--coordinator or --ps")
        from monolith_jax.placement import ask_host_devices

        ask_host_devices(args.host_devices)
    from monolith_jax.job import JobError, load_job

    try:
        job = load_job(args.job)
    except JobError as err:
        p.error(str(err))
    batch_size = args.batch or job.batch_size
    dp = None
    if args.coordinator:  # before any other JAX call
        from monolith_jax.distributed.data_parallel import DataParallel

        dp = DataParallel(args.coordinator, args.trainers, args.trainer_index)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    mesh = None
    if args.host_devices > 1:
        from monolith_jax.placement import HostDevicesError, host_mesh

        try:
            mesh = host_mesh(args.host_devices)
        except HostDevicesError as err:
            p.error(str(err))
    trainer = job.make_trainer(args.seed, metrics_path=args.metrics, tensorboard_dir=args.tensorboard,
                               log_every=100 if args.data else 0, placement=args.placement, mesh=mesh)
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
                              keep=args.keep_snapshots, full_every=args.snapshot_full_every,
                              keep_dump_memory=not args.snapshot_release_memory)
    if args.data:
        return train_files(job, trainer, args, batch_size, snapshots)
    from monolith_jax.online.trainer import OnlineTrainer

    try:
        online = OnlineTrainer(trainer, args.bootstrap, {"examples": args.topic_examples,
                                                        "dead_letters": args.topic_dead_letters},
                               args.group, batch_size=batch_size, max_wait_s=args.max_wait,
                               serving_ps=args.serving_ps, sparse_sync_interval_s=args.sync_interval,
                               dense_sync_interval_s=args.dense_sync_interval, warmup=not args.no_warmup,
                               snapshots=snapshots, dense_exchange=dense_exchange,
                               trainer_id=f"{args.group}-{args.trainer_index}",
                               dedup_window_s=args.dedup_window or None)
    except K.BrokerUnreachable as err:
        raise SystemExit(f"monolith train: {err}") from None
    if args.export:
        from monolith_jax.serving.export import export_model

        export_model(trainer, args.export)
    summary = online.run(args.max_examples, args.idle_timeout, args.max_seconds, stop)
    if args.export:
        export_model(trainer, args.export, negative_rate=online.negative_rate or 1.0)
    summary["segment_aucs"] = online.log.segment_aucs(10)
    if args.prequential_out:
        (online.head_logs or online.log).save(args.prequential_out)
    return finish(summary, args, trainer, snapshots)


def finish(summary: dict, args, trainer, snapshots) -> int:
    """The last line `trainer done {...}` (and --summary), then close."""
    summary["dense_devices"] = 1 if trainer.mesh_dense is None else trainer.mesh_dense.size
    line = json.dumps(summary, default=float)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            f.write(line)
    print("trainer done " + line, flush=True)
    if snapshots is not None:
        snapshots.close()
    trainer.close()
    return 0


def train_files(job, trainer, args, batch_size: int, snapshots) -> int:
    """`--data`: epochs over the files, then snapshot, export and a full push."""
    import time

    t0 = time.perf_counter()
    epochs = []
    for epoch in range(args.epochs):
        fit = trainer.fit(job.batches(args.data, batch_size=batch_size))
        record = {"epoch": epoch + 1, "examples": fit["examples"], "loss": fit["loss"],
                  "examples_per_s": fit["examples_per_s"]}
        if args.validation:
            ev = trainer.evaluate(job.batches(args.validation, batch_size=batch_size))
            record.update({k: ev[k] for k in ("auc", "logloss", "heads") if k in ev})
        print("epoch " + json.dumps(record, default=float), flush=True)
        epochs.append(record)
    if not epochs or epochs[0]["examples"] == 0:
        raise SystemExit(f"no examples in {args.data}")
    summary = {"source": "files", "files": args.data, "epochs": epochs, "examples": trainer.examples,
               "steps": trainer.step_count, "seconds": time.perf_counter() - t0}
    if snapshots is not None:
        # No stream offsets: an online trainer started on this folder resumes
        # these params and rows and reads the stream from its committed offsets.
        snapshots.save(trainer.step_count, trainer, {"offsets": {}, "examples": 0, "batches": trainer.step_count,
                                                     "max_event_ms": 0, "negative_rate": 1.0,
                                                     "trained_examples": trainer.examples})
        meta = snapshots.wait()
        summary["snapshot"] = None if meta is None else meta["step"]
    if args.export:
        from monolith_jax.serving.export import export_model

        export_model(trainer, args.export)
        summary["export"] = args.export
    if args.serving_ps:
        from monolith_jax.serving.export import dense_arrays
        from monolith_jax.serving.sync import SyncPusher

        pusher = SyncPusher(trainer.tables, args.serving_ps, f"files-{args.seed}",
                            dense_source=lambda: (dense_arrays(trainer.params), 1.0))
        ok = pusher.push_once() and pusher.push_dense()
        pusher.stop(final_push=False)
        if not ok:
            raise SystemExit(f"could not push the trained model to the serving PS at {args.serving_ps}")
        summary["pushed"] = {k: pusher.stats[k] for k in ("rows", "bytes", "dense_pushes")}
    return finish(summary, args, trainer, snapshots)


if __name__ == "__main__":
    sys.exit(main())
