"""The online trainer: the examples topic -> continuous training.

    OnlineTrainer(trainer, bootstrap).run(idle_timeout_s=..., max_examples=...)

It consumes the examples topic in a consumer group (several trainer
processes share the partitions), forms a batch when `batch_size` examples
have arrived or `max_wait_s` has passed since the first, and trains on it.
With `prequential=True` every batch is scored by the model before its
update: the running AUC is the AUC of predictions made before the model saw
those examples. The in-jit step (on the CPU) scores in its own forward pass,
at no extra cost, with the rows as the step reads them (a row it creates
scores at its initial values); the host-tables step scores first with
`Trainer.predict` (read-only lookups, zeros for ids without a row).

A partial batch is padded only to the next power of two (`shrink`), so
that low traffic with a short `max_wait_s` (freshness) does not pay for
full batches of padding.

Offsets: after each batch is trained, its messages' offsets (dead letters
included, once delivered) are committed asynchronously, so a restart
resumes after the last trained batch. When a rebalance takes partitions
away, the trainer first commits, synchronously, the offsets of everything
it trained from them (with snapshots and no data-parallel group: it takes
a snapshot and commits its offsets), then drops the batch being filled and
what was fetched but not trained: the next owner starts exactly after the
last trained example, so each example is trained once across a rebalance.
(A data-parallel group with snapshots commits only with its group
snapshots, which a callback cannot take: there, a rebalance may repeat
what was trained since the last one.) On librdkafka's embedded cluster the
coordinator refuses commits during a rebalance, so exactly-once across
trainers needs a Kafka broker there (`monolith cluster` refuses several
trainers on the embedded cluster).

With `snapshots` (`monolith_jax.snapshot.Snapshots`) offsets are instead
committed only once a snapshot holding them (and everything trained
before them) is complete on disk; a trainer started on the same folder
restores the newest good snapshot and seeks each partition to its offset,
so a crash (even SIGKILL) loses nothing and trains nothing twice. A clean
stop takes a last snapshot. Incremental snapshots (`Snapshots(...,
full_every=K)`: deltas of the changed rows between full ones) resume
alike: the restore applies the chain in order.

No message stops training: one that cannot be used (unreadable of any
shape or size, an example the decoder refuses) goes to the dead-letter
topic with the reason and is counted; a dead letter too large for one
message is truncated (headers say its original size), and one that cannot
be written is counted and logged (`dead_letters_failed`). Per message:
trained, or dead-lettered.

Scale-out: with tables on training PS shards (`training_ps.use_shards`)
or a data-parallel trainer (`distributed.DataParallel.attach`), each batch
takes the host-tables step. A data-parallel group moves in lockstep: every
member fills a batch (at most `max_wait_s`), they agree on its size (a
member with nothing takes an all-padding step), on whether to snapshot
first and on whether to go on (until all are done). The chief (process 0)
pushes the dense params to the serving PS and has the shards snapshot;
the shards push their own rows. `dense_exchange` (`dense_ps.AsyncDense`)
trains asynchronously instead. Off a data-parallel group the host-tables
step overlaps as the trainer's `overlap` says (`placement.HostPipeline`):
a batch's offsets go once its update is applied; snapshots, rebalances and
stops first finish the steps in flight.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np

from monolith_jax.metrics import auc
from monolith_jax.online.dedup import DEFAULT_WINDOW_S as DEFAULT_DEDUP_WINDOW_S, RequestDedup
from monolith_jax.online.prequential import HeadLogs, PrequentialLog, shrink  # noqa: F401 (public here too)
from monolith_jax.stream import kafka as K
from monolith_jax.stream.dead_letters import DeadLetters
from monolith_jax.stream.offset_gaps import OffsetGaps
from monolith_jax.stream.messages import ExampleDecoder

log = logging.getLogger("monolith_jax.online.trainer")
# Seconds a subscribed trainer waits for its first partition before it warns.
UNASSIGNED_WARN_S = 60.0
# With an idle timeout, how long a trainer that has had no example yet waits
# for its first (end-of-partition events are not examples).
FIRST_EXAMPLE_WAIT_S = 60.0


class OnlineTrainer:
    def __init__(self, trainer, bootstrap: str, topics: dict | None = None, group: str = "monolith-trainer",
                 batch_size: int = 1024, max_wait_s: float = 0.5, prequential: bool = True,
                 auc_window: int = 50_000, consumer_extra: dict | None = None, out=print,
                 serving_ps: str | None = None, sparse_sync_interval_s: float = 2.0, sync_dtype: str = "float32",
                 trainer_id: str | None = None, dense_sync_interval_s: float = 30.0, min_bucket: int = 64,
                 warmup: bool = False, snapshots=None, dense_exchange=None, connect_timeout_s: float = 15.0,
                 dedup_window_s: float | None = DEFAULT_DEDUP_WINDOW_S):
        from confluent_kafka import Consumer, Producer

        self.heads = getattr(trainer, "heads", None)
        K.check_reachable(bootstrap, connect_timeout_s)  # a clear error, not a silent wait on a dead address
        self.trainer = trainer
        self.topics = {**K.TOPICS, **(topics or {})}
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.prequential = prequential
        self.min_bucket = min_bucket
        # A job with heads reads one label per head (messages version 2).
        self.decoder = ExampleDecoder(trainer.features, trainer.dense_features, heads=self.heads)
        # Exactly-once by request id (online/dedup.py): a second example of a
        # request trained within the window takes no row and is counted.
        self.dedup = RequestDedup(dedup_window_s) if dedup_window_s else None
        self.duplicates = 0
        self.group = group
        self.consumer = Consumer(K.consumer_config(bootstrap, group, **{"enable.auto.commit": False,
                                                                         **(consumer_extra or {})}))
        producer_conf = K.producer_config(bootstrap)
        self.producer = Producer(producer_conf)
        self.dead = DeadLetters(self.producer, self.topics["dead_letters"], K.max_message_bytes(producer_conf))
        self.gaps = OffsetGaps("trainer")  # examples the cluster deleted before they were read
        # Per head (a job with heads): prequential scores where the head is
        # defined; `log` is then the first binary head's (the summary's AUC).
        self.head_logs = HeadLogs(self.heads, auc_window) if self.heads is not None else None
        self.log = self.head_logs.main if self.head_logs is not None else PrequentialLog(auc_window)
        self._unlogged = None  # the in-jit step's last scores, logged once the next step is on its way
        self.out = out
        self.examples = 0
        self.batches = 0
        self.max_event_ms = 0
        self.on_batch = None  # optional callback(online_trainer, batch, info) after each trained batch
        # The sample rate the last negatives carried (serving corrects for it):
        # a job with heads keeps one per binary head, {head name: rate}.
        self.negative_rate = None
        # Touched rows go to the serving PS every sparse_sync_interval_s, the
        # dense params every dense_sync_interval_s, off this thread.
        # Tables in other processes (training PS shards), data-parallel
        # trainers and a dense step off the CPU (the trainer's placement)
        # take the host-tables step; the chief (process 0 of a
        # data-parallel group, or a lone trainer) pushes the dense params and
        # has the shards snapshot their rows.
        self.dp = trainer.data_parallel
        self.remote = {name: t for name, t in trainer.tables.items() if not hasattr(t, "dump")}
        self.host_step = self.dp is not None or bool(self.remote) or trainer.step_placement() == "host"
        self.chief = self.dp is None or self.dp.chief
        # The host-tables step overlapped as the trainer's `overlap` says (`placement.HostPipeline`; a
        # data-parallel group steps in lockstep, without): a batch counts as trained once its update is applied.
        self.pipeline = trainer.host_pipeline() if self.host_step and self.dp is None and \
            trainer.overlapping() else None
        self._empty = None
        self._params_lock = threading.Lock()  # the pusher copies params a step may donate (Trainer(donate=))
        self.pusher = None
        if serving_ps:
            from monolith_jax.serving.sync import SyncPusher

            # Rows of remote tables are pushed by their shards (`training_ps --serving-ps`).
            local = {name: t for name, t in trainer.tables.items() if name not in self.remote}
            self.pusher = SyncPusher(local, serving_ps, trainer_id or f"{group}-{id(self):x}",
                                     sparse_sync_interval_s, sync_dtype,
                                     dense_source=self._dense_to_push if self.chief else None,
                                     dense_interval_s=dense_sync_interval_s)
        self._carry: list = []  # messages fetched but not yet taken into a batch
        self._building = None   # (BatchBuilder, messages taken) while a batch fills
        self._t_first = None   # when the first example arrived
        self._t_last = 0.0     # when the last batch was trained
        self._max_examples = None
        self._revoked = False
        self._committed: dict = {}  # (topic, partition) -> TopicPartition(next offset) of trained messages
        self._assigned: set = set()
        self._ever_assigned = False
        # With snapshots, offsets are committed only once a snapshot holding
        # them is complete, and a restart resumes from the newest one.
        self.snapshots = snapshots
        self._resume: dict = {}     # (topic, partition) -> offset to seek to on assignment
        self._pending_commits: dict = {}  # data-parallel: snapshot step -> this member's offsets in it
        self.resumed_from = None
        if snapshots is not None:
            meta = snapshots.restore(trainer)
            if meta is not None:
                self.resumed_from = meta["step"]
                self.examples = int(meta["examples"])
                self.batches = int(meta["batches"])
                self.duplicates = int(meta.get("duplicates", 0))
                self._restore_dead_counts(meta)
                group = meta.get("trainers")
                if self.dp is not None and group is not None:
                    # The group's snapshot: this member's own counts.
                    mine = group[self.dp.process_id] if len(group) == self.dp.num_processes else {}
                    self.examples, self.batches = int(mine.get("examples", 0)), int(mine.get("batches", 0))
                    self.duplicates = int(mine.get("duplicates", 0))
                    self._restore_dead_counts(mine)
                    trainer.examples = int(mine.get("trained_examples", 0))
                self.max_event_ms = int(meta["max_event_ms"])
                self.negative_rate = meta.get("negative_rate")
                saved = snapshots.restored_extra.get("dedup")
                if self.dedup is not None and saved is not None:
                    self.dedup.load(saved)
                self._resume = {(t, int(p)): int(o) for t, parts in meta["offsets"].items() for p, o in parts.items()}
                log.info("trainer resumes from snapshot %d: %d examples trained, offsets %s", meta["step"],
                         self.examples, meta["offsets"])
        # Asynchronous dense training (dense_ps.AsyncDense): trainers exchange
        # parameter deltas through a training PS shard instead of all-reducing.
        self.dense_exchange = dense_exchange
        if dense_exchange is not None:
            if self.dp is not None:
                raise ValueError("a trainer is either data-parallel (synchronous) or exchanges dense deltas")
            dense_exchange.start(trainer)
        self.warmup_s = self.warmup() if warmup else None

    def _restore_dead_counts(self, meta: dict) -> None:
        """The dead letters and lost offsets counted up to a snapshot (its
        messages are not read again after a resume, so the counts carry over
        as examples do)."""
        self.gaps.restore(meta)
        self.dead.count = int(meta.get("dead_letters", 0))
        reasons = meta.get("dead_letter_reasons") or {}
        self.dead.by_reason = {str(k): int(v) for k, v in reasons.items()} if isinstance(reasons, dict) else {}

    # ---------------------------------------------------------- rebalance
    def _on_assign(self, consumer, partitions) -> None:
        self._assigned = {(p.topic, p.partition) for p in partitions}
        self._ever_assigned = True
        log.info("trainer assigned %s", sorted(self._assigned))
        self.gaps.assigned(consumer, partitions, known=self._resume)
        if self._resume:
            # Where the snapshot stopped, whatever was committed (a commit may
            # have been lost, or an older snapshot used).
            from confluent_kafka import TopicPartition

            consumer.assign([TopicPartition(p.topic, p.partition, self._resume.get((p.topic, p.partition), p.offset))
                             for p in partitions])

    def _on_revoke(self, consumer, partitions) -> None:
        # Inside consume(), before the partitions go: commit what was trained
        # from them, synchronously, then drop the batch being filled and what
        # was fetched but not trained; the next owner reads from the commit.
        revoked = {(p.topic, p.partition) for p in partitions}
        self._drain()  # the steps in flight count as trained (their offsets are committed below)
        self._building = None
        self._carry = []
        self._revoked = True
        self._assigned -= revoked
        self.gaps.revoked(revoked)
        if not revoked:
            return
        if self.snapshots is None:
            done = [tp for key, tp in self._committed.items() if key in revoked]
            if done:
                self.producer.flush(10)  # the dead letters among them, first
                self._commit(done, asynchronous=False, attempts=3)
        elif self.dp is None:  # offsets go with a snapshot that holds them: take one now
            if self.trainer.step_count != self.snapshots.last_step:
                self._snapshot()
            self._commit_snapshots(wait=True)
        for key in revoked:  # no longer ours: neither committed nor resumed by this trainer
            self._committed.pop(key, None)
            self._resume.pop(key, None)
        log.info("trainer gives up %s", sorted(revoked))

    # -------------------------------------------------------------- steps
    def buckets(self) -> list:
        """The batch sizes `shrink` pads to: powers of two from min_bucket, and batch_size."""
        sizes, b = [], self.min_bucket
        while b < self.batch_size:
            sizes.append(b)
            b *= 2
        return sizes + [self.batch_size]

    def warmup(self) -> float:
        """Compiles the training step and the scoring for every bucket before
        the first example, so that no batch of a new size waits seconds for
        XLA mid-stream (a freshness spike). The steps run on all-padding
        batches (weight 0: zero gradients) and their results are dropped,
        so the model does not change. Returns the seconds spent."""
        import jax
        import jax.numpy as jnp

        from monolith_jax.placement import dense_call

        t0 = time.perf_counter()
        empty = self.empty_batch()
        t = self.trainer
        coll = t.collection
        for size in self.buckets():
            batch = shrink(empty, size, size)
            if self.host_step:  # the dense program alone, on zero rows: no table is touched
                rows = {name: np.zeros((size, sum(f.max_len for f in feats), coll.tables[name].dim), np.float32)
                        for name, feats in coll.by_table.items() if feats}
                params, opt_state = jax.tree.map(jnp.copy, (t.params, t.opt_state))  # the step donates its inputs
                # the program the step runs (packed in the pipeline, over a mesh's devices if it has one)
                out = self.dp.step(t, rows, batch) if self.dp is not None else \
                    dense_call(t, params, opt_state, rows, batch, self.pipeline is not None and t.pack_transfers)
            else:
                out = t._train(t.params, t.opt_state, batch, 0)
            jax.block_until_ready(out[:3])
            if self.prequential and self.host_step:  # the in-jit step scores in its own program
                t.predict(batch)
        return time.perf_counter() - t0

    def empty_batch(self):
        """An all-padding batch (weight 0) of batch_size."""
        if self._empty is None:
            self._empty = self.decoder.batch(self.batch_size).finish()[0]
        return self._empty

    def _fill(self, deadline_s: float):
        """Fills one batch from the stream: until it is full, `max_wait_s`
        has passed since its first example, or `deadline_s`. Returns
        (builder, messages taken) or None."""
        limit = None
        if self._max_examples is not None:  # take no more than run() was asked for
            limit = self._max_examples - self.examples
        builder = self.decoder.batch(self.batch_size, messages=True, limit=limit, dedup=self.dedup)
        taken: list = []
        self._building = (builder, taken)
        first = None
        while not builder.full:
            now = time.monotonic()
            if first is not None and now - first >= self.max_wait_s:
                break
            if self._carry:
                msgs, self._carry = self._carry, []
            else:
                wait = self.max_wait_s if first is None else self.max_wait_s - (now - first)
                wait = min(wait, max(deadline_s - now, 0.0))
                # Short waits: measured, consume() with a long timeout takes
                # ~13 ms per call even with messages queued; <= 10 ms returns at once.
                msgs = self.consumer.consume(num_messages=self.batch_size, timeout=min(wait, 0.01))
                if self._revoked:  # a rebalance dropped the batch: start again with what came after it
                    self._revoked = False
                    builder = self.decoder.batch(self.batch_size, messages=True, limit=limit, dedup=self.dedup)
                    taken = []
                    self._building = (builder, taken)
                    first = None
            if msgs:
                k = builder.add(msgs)
                taken.extend(msgs[:k])
                self._carry = msgs[k:]
                if first is None and builder.taken > builder.events:  # a message, not only events (EOF)
                    first = time.monotonic()
                    if self._t_first is None:
                        self._t_first = first
                if self._carry:
                    break  # the next value does not fit: this batch is as full as it gets
            elif time.monotonic() >= deadline_s:
                break
        self._building = None
        return (builder, taken) if taken else None

    def _train(self, builder, msgs: list, agreed_rows: int = 0) -> int:
        """Trains on a filled batch. agreed_rows: in a data-parallel group,
        the most rows any member has this step (every member pads to that
        size; a member with nothing, builder None, takes an all-padding step)."""
        from confluent_kafka import KafkaError, TopicPartition

        if builder is None:
            if agreed_rows:
                self.trainer.train_step_host(shrink(self.empty_batch(), agreed_rows, self.min_bucket),
                                             stamp=self._stamp())
            return 0
        batch, info, bad = builder.finish()
        self.duplicates += info["duplicates"]
        batch = shrink(batch, max(info["rows"], agreed_rows), self.min_bucket)
        status = info["status"]
        for i in np.flatnonzero(status == -3):
            err = msgs[i].error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err)
        for i, reason in bad:
            self.dead.send(msgs[i], reason)
        if bad:
            self.producer.flush(10)  # dead letters delivered (or counted as failed) before their offsets commit
        rows = info["rows"]
        if not rows and agreed_rows:
            self.trainer.train_step_host(batch, stamp=self._stamp())
        done = []
        real = status != -3
        if real.any():
            parts, offs = info["partition"][real], info["offset"][real]
            topic = self.topics["examples"]
            self.gaps.batch(self.consumer, topic, parts, offs)
            done = [TopicPartition(topic, int(p), int(offs[parts == p].max()) + 1) for p in np.unique(parts)]
        if rows:
            def score(batch):
                self._log_scores(batch, self.trainer.predict(batch), rows, info["event_time_ms"])

            self.max_event_ms = max(self.max_event_ms, int(info["event_time_ms"].max()))
            self._note_negative_rates(batch, info, rows)
            if self.pipeline is not None:  # scored once the rows it reads hold every step before it
                with self._params_lock:
                    applied = self.pipeline.submit(batch, stamp=self._stamp(), tag=(info, done),
                                                   before=score if self.prequential else None)
                self._trained(applied)
            elif self.host_step:
                if self.prequential:
                    score(batch)
                with self._params_lock:
                    self.trainer.train_step_host(batch, stamp=self._stamp())
            else:  # the in-jit step scores the batch in its own forward pass, before its update
                with self._params_lock:
                    out = self.trainer.train_step(batch, stamp=self._stamp(), scores=self.prequential)
                if self.prequential:  # logged once the next step is on its way: this one is not waited for
                    self._log_scores()
                    self._unlogged = (batch, out[1], rows, info["event_time_ms"])
            if self.dense_exchange is not None:
                self.dense_exchange.after_step(self.trainer)
            self.examples += rows
            self.batches += 1
            if self.dedup is not None:  # taken now: the next batch (filled while this one trains) skips its requests
                self.dedup.add(info["request_hash"], info["event_time_ms"])
            if self.pipeline is None:
                self._trained([(batch, (info, done))])
        elif done:  # dead letters only: their offsets after every batch before them
            self._drain()
            self._mark_trained(done)
        if self.dp is None and self.snapshots is not None and self.snapshots.due(self.trainer.step_count):
            self._snapshot()
        return rows

    def _log_scores(self, batch=None, scores=None, rows: int = 0, event_ms=None) -> None:
        """Logs a batch's prequential scores; with no batch, the in-jit
        step's scores not yet logged, if any (waiting for that step)."""
        if batch is None:
            if self._unlogged is None:
                return
            (batch, scores, rows, event_ms), self._unlogged = self._unlogged, None
        if self.head_logs is not None:
            self.head_logs.add(batch, scores, rows, event_ms)
        else:
            self.log.add(np.asarray(batch.labels)[:rows], np.asarray(scores)[:rows], event_ms)

    def _trained(self, steps) -> None:
        """Batches whose update is applied ((batch, (info, offsets)), or `Done`s): on_batch, then offsets."""
        for step in steps:
            batch, (info, done) = (step.batch, step.tag) if not isinstance(step, tuple) else step
            if self.on_batch is not None:
                self._log_scores()  # the hook sees every batch before it logged
                self.on_batch(self, batch, info)
            self._mark_trained(done)

    def _mark_trained(self, done: list) -> None:
        for tp in done:
            self._committed[(tp.topic, tp.partition)] = tp
            self._resume.pop((tp.topic, tp.partition), None)
        if done and self.snapshots is None:
            self._commit(done, asynchronous=True)

    def _drain(self) -> None:
        """Finishes the steps in flight: every batch taken is then trained, its offsets marked."""
        if self.pipeline is not None and self.pipeline.busy:
            self._trained(self.pipeline.drain())

    def _dense_to_push(self):
        from monolith_jax.serving.export import dense_arrays

        with self._params_lock:
            return dense_arrays(self.trainer.params), self.negative_rate

    def _note_negative_rates(self, batch, info: dict, rows: int) -> None:
        labels = np.asarray(batch.labels)[:rows]
        if self.heads is None:
            negatives = labels == 0
            if negatives.any():
                self.negative_rate = float(info["sample_rate"][negatives][-1])
            return
        mask = np.asarray(batch.label_mask)[:rows]
        rates = dict(self.negative_rate) if isinstance(self.negative_rate, dict) else {}
        for k, h in enumerate(self.heads):
            negatives = (labels[:, k] == 0) & (mask[:, k] > 0)
            if h.binary and negatives.any():
                rates[h.name] = float(info["sample_rate"][:rows, k][negatives][-1])
        self.negative_rate = rates or self.negative_rate

    def _stamp(self) -> int:
        """The rows' last_update: event time in seconds."""
        return min(max(self.max_event_ms // 1000, 0), 2**31 - 1)

    # ---------------------------------------------------------- snapshots
    def _commit(self, offsets: list, asynchronous: bool, attempts: int = 1) -> bool:
        from confluent_kafka import KafkaError, KafkaException

        for attempt in range(attempts):
            try:
                self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
                return True
            except KafkaException as err:
                kerr = err.args[0] if err.args else None
                if isinstance(kerr, KafkaError) and kerr.code() == KafkaError._NO_OFFSET:  # nothing new to commit
                    return True
                retriable = isinstance(kerr, KafkaError) and kerr.retriable()
                if not retriable or attempt == attempts - 1:
                    log.warning("commit failed: %s", err)
                    return False
            except Exception as err:
                log.warning("commit failed: %s", err)
                return False
        return False

    def _snapshot(self) -> None:
        """Starts a snapshot of everything trained so far and the offsets
        after it. A data-parallel group (all members call this between the
        same two steps) takes one snapshot, written by the chief: the dense
        params (the same everywhere) and every member's offsets and counts."""
        self._drain()  # every applied update of the steps before it, and their offsets
        meta = self._snapshot_meta()
        step = self.trainer.step_count
        if self.dp is None:
            extra = {"dedup": self.dedup.state()} if self.dedup is not None else None
            self.snapshots.save(step, self.trainer, meta, extra=extra)
            return
        group = self.dp.gather_json(meta)
        self._pending_commits[step] = list(self._committed.values())
        if not self.chief:
            self.snapshots.mark(step)
            return
        offsets: dict = {}
        for m in group:  # a partition's newest offset (a member's stale resume point is older)
            for topic, parts in m["offsets"].items():
                for p, o in parts.items():
                    offsets.setdefault(topic, {})[p] = max(o, offsets.get(topic, {}).get(p, 0))
        self.snapshots.save(step, self.trainer, {
            "offsets": offsets, "examples": sum(m["examples"] for m in group), "batches": meta["batches"],
            "max_event_ms": max(m["max_event_ms"] for m in group), "negative_rate": meta["negative_rate"],
            "trained_examples": sum(m["trained_examples"] for m in group), "trainers": group})

    def _snapshot_meta(self) -> dict:
        offsets: dict = {}
        for tp in self._committed.values():
            offsets.setdefault(tp.topic, {})[str(tp.partition)] = tp.offset
        for (topic, p), off in self._resume.items():  # partitions not read since the restore
            offsets.setdefault(topic, {}).setdefault(str(p), off)
        if self.chief and self.remote:
            # The shards copy their rows now (every trainer's updates up to
            # this step are in: a data-parallel group snapshots between steps)
            # and write them in the background, as this snapshot does.
            from monolith_jax.distributed.training_ps import snapshot_shards

            snapshot_shards(self.remote.values(), self.trainer.step_count)
        return {"offsets": offsets, "examples": self.examples, "batches": self.batches,
                "max_event_ms": self.max_event_ms, "negative_rate": self.negative_rate,
                "trained_examples": self.trainer.examples, "duplicates": self.duplicates,
                "dead_letters": self.dead.count, "dead_letter_reasons": dict(self.dead.by_reason),
                **self.gaps.counts()}

    def _commit_snapshots(self, wait: bool = False) -> None:
        """Commits the offsets of a snapshot that has completed."""
        from confluent_kafka import TopicPartition

        if self.dp is not None:  # the chief's completed snapshot, agreed by all; each commits its own
            done = self.snapshots.wait() if wait and self.chief else \
                self.snapshots.completed() if self.chief else None
            step = int(self.dp.agree([done["step"] if done else 0])[0])
            self._commit_group(step, asynchronous=not wait)
            return
        meta = self.snapshots.wait() if wait else self.snapshots.completed()
        if meta is not None:
            done = [TopicPartition(t, int(p), int(o)) for t, parts in meta["offsets"].items() for p, o in parts.items()]
            if done:
                self._commit(done, asynchronous=not wait)

    def _commit_group(self, step: int, asynchronous: bool) -> None:
        """Commits this member's offsets of every group snapshot up to `step`."""
        for s in sorted(k for k in self._pending_commits if k <= step):
            offsets = self._pending_commits.pop(s)
            if offsets:
                self._commit(offsets, asynchronous=asynchronous)

    # ---------------------------------------------------------------- run
    def run(self, max_examples: int | None = None, idle_timeout_s: float | None = None,
            max_seconds: float | None = None, stop: threading.Event | None = None,
            report_every_s: float = 5.0, upstream_done=None) -> dict:
        """Trains until `stop` is set, `max_examples` are trained, nothing
        has arrived for `idle_timeout_s` since the last example (counted
        once one has come, and once `upstream_done()`, if given, is true;
        a trainer that has had none stops after max(idle_timeout_s,
        FIRST_EXAMPLE_WAIT_S) from its start: it may start before its
        stream), or `max_seconds` pass."""
        self.consumer.subscribe([self.topics["examples"]], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._max_examples = max_examples
        if self.pusher is not None:
            self.pusher.start()
        t0 = last_data = last_report = time.monotonic()
        seen_at_report, start_examples = self.examples, self.examples
        unassigned_warned = False
        together = False   # a data-parallel group left its loop together (its last steps are collective)
        failed = False
        try:
            while True:
                now = time.monotonic()
                done = (stop is not None and stop.is_set()) or \
                    (max_seconds is not None and now - t0 > max_seconds) or \
                    (max_examples is not None and self.examples >= max_examples)
                # Idle: counted from the last example once one has come; a
                # trainer that never got one waits for its stream longer
                # (it may start before the joiner's first example).
                idle = idle_timeout_s is not None and (
                    now - last_data > idle_timeout_s if self._t_first is not None
                    else now - last_data > max(idle_timeout_s, FIRST_EXAMPLE_WAIT_S))
                if not done and idle:
                    if upstream_done is None or upstream_done():
                        done = True
                    else:
                        last_data = now
                if not self._ever_assigned and not unassigned_warned and now - t0 > UNASSIGNED_WARN_S:
                    # Nothing to train until the group hands this member a
                    # partition: a stuck coordinator, or more members than
                    # partitions. Say so rather than wait in silence.
                    unassigned_warned = True
                    log.warning("trainer: group %r has assigned this member no partition of %r in %.0f s "
                                "(more trainers than partitions, or a group coordinator that does not "
                                "complete the rebalance; MONOLITH_KAFKA_CONFIG with debug=cgrp shows it)",
                                self.group, self.topics["examples"], now - t0)
                if self.dp is None:
                    if done:
                        break
                    filled = self._fill(now + 1.0)
                    if filled is not None:
                        self._train(*filled)
                        if filled[0].taken > filled[0].events:  # partition EOF events are not data
                            last_data = self._t_last = time.monotonic()
                elif not self._lockstep(done):
                    together = True
                    break
                else:
                    last_data = max(last_data, self._t_last)
                self.producer.poll(0)
                if self.snapshots is not None and self.dp is None:
                    # A stream gone quiet still gets its last batches into a
                    # snapshot when one is due, so their offsets commit.
                    if self.trainer.step_count != self.snapshots.last_step and \
                            self.snapshots.due(self.trainer.step_count):
                        self._snapshot()
                    self._commit_snapshots()
                now = time.monotonic()
                if report_every_s and now - last_report >= report_every_s:
                    rate = (self.examples - seen_at_report) / (now - last_report)
                    self._report(rate)
                    last_report, seen_at_report = now, self.examples
        except BaseException:
            failed = True
            raise
        finally:
            self._carry = []  # fetched, not taken: the next run re-reads them
            stopped = time.monotonic()
            if not failed:    # the steps in flight, applied and their offsets marked (a failed run re-reads them)
                self._drain()
            if self._t_first is not None:
                import jax

                # The rate counts finished steps only: the span runs from the
                # last step's dispatch on by what finishing the steps still
                # in flight took now (not by the idle wait that ended the run).
                jax.block_until_ready(self.trainer.params)
                self._t_last = max(self._t_last, self._t_first) + time.monotonic() - stopped
            if not failed:  # a clean stop: the last scores; the last apply, which a ShardedTable holds back
                self._log_scores()
                for t in self.remote.values():
                    if hasattr(t, "flush"):
                        t.flush()
            if self.snapshots is not None and (self.dp is None or together):
                # A snapshot on a clean stop (SIGTERM, end of stream), then its
                # offsets. (A group member that failed cannot: the others would
                # wait for it; they resume from the last group snapshot.)
                if self.trainer.step_count != self.snapshots.last_step:
                    self._snapshot()
                self._commit_snapshots(wait=True)
            elif self._committed:
                self._commit(list(self._committed.values()), asynchronous=False)
            self.consumer.close()
            self.producer.flush(10)
            if self.pusher is not None:
                self.pusher.stop(final_push=True)
        seconds = time.monotonic() - t0
        active = max(self._t_last - (self._t_first or t0), 1e-9)
        sync = dict(self.pusher.stats) if self.pusher is not None else None
        history = [dict(zip(("time", "full", "rows", "bytes", "table_rows"), h)) for h in self.pusher.history] \
            if self.pusher is not None else []
        return {"examples": self.examples, "batches": self.batches, "seconds": seconds, "sync": sync,
                "resumed_from": self.resumed_from,
                "snapshots": None if self.snapshots is None else
                {"saved": self.snapshots.saved, "save_seconds": round(self.snapshots.save_seconds, 3),
                 "steps": self.snapshots.steps()},
                "sync_history": history,
                "table_rows": {name: len(t) for name, t in self.trainer.tables.items()},
                "examples_per_s": (self.examples - start_examples) / active,
                "dead_letters": self.dead.count, "dead_letter_reasons": dict(self.dead.by_reason),
                "duplicates": self.duplicates,
                "dead_letters_failed": self.dead.failed, **self.gaps.counts(),
                "running_auc": self.log.running_auc(), "stream_auc": self._stream_auc(),
                **({"heads": self.head_logs.summary()} if self.head_logs is not None else {})}

    def _lockstep(self, done: bool) -> bool:
        """One step of a data-parallel group: every member fills a batch
        (at most max_wait_s), then all agree on the step's size, whether to
        snapshot first, and whether to go on (until every member is done).
        False when the group stops."""
        filled = None if done else self._fill(time.monotonic() + self.max_wait_s)
        rows = filled[0].rows if filled is not None else 0
        due = self.snapshots is not None and self.snapshots.due(self.trainer.step_count)
        completed = 0
        if self.chief and self.snapshots is not None:
            meta = self.snapshots.completed()
            completed = meta["step"] if meta is not None else 0
        rows_max, going, snap, completed = (int(v) for v in self.dp.agree([rows, int(not done), int(due), completed]))
        if completed:  # the chief finished writing a snapshot: commit what it holds
            self._commit_group(completed, asynchronous=True)
        if snap:
            # Between steps: every member's updates of the last step are in
            # the shards; none of the next step's lookups have run.
            if self.trainer.step_count != self.snapshots.last_step:
                self._snapshot()
            self.dp.barrier(f"snapshot-{self.trainer.step_count}")
        if filled is not None or rows_max:
            self._train(*(filled if filled is not None else (None, [])), agreed_rows=rows_max)
            if rows:
                self._t_last = time.monotonic()
        return bool(going) or rows_max > 0

    def _stream_auc(self) -> float:
        self._log_scores()
        y, s, _ = self.log.arrays()
        return auc(y, s) if y.size else float("nan")

    def _report(self, rate: float) -> None:
        self._log_scores()
        record = {"examples": self.examples, "examples_per_s": round(rate, 1),
                  "running_auc": round(self.log.running_auc(), 4), "dead_letters": self.dead.count,
                  "duplicates": self.duplicates, **self.gaps.counts()}
        if self.head_logs is not None:
            record["heads"] = self.head_logs.running()
        self.trainer._log({"event": "online", **record})
        self.out("trainer " + json.dumps(record), **({"flush": True} if self.out is print else {}))
