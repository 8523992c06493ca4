"""The joiner process: features + actions topics -> examples topic.

    monolith join --bootstrap HOST:PORT [--job MODULE:NAME] [--window 300] [--negative-rate 0.5] ...

It scales the way Kafka applications scale: producers key both topics by
request id, so a request's features and actions land in the same partition
number of each; joiners share one consumer group with the range assignor,
which hands partition i of both topics to the same member. Start as many
joiner processes as there are partitions.

Delivery: an input offset is committed only once every message before it
is fully handled (its example delivered to Kafka, or decided to be
dropped), so a joiner that dies loses nothing: its successor re-reads from
the oldest message still pending. Commits wait for nothing: every 0.1 s
the joiner takes a commit point (the offsets, and a mark of the sends made
so far) and commits the newest earlier point whose sends are all reported
delivered (`delivery.DeliveryMarks`); only a rebalance and the end of a run
flush the producer first. Upstream gates (the replayer's) see the commits
that often. Within one joiner's life each request
emits at most one example; after a crash or a rebalance that moves a
partition, examples of requests re-read from it may be emitted twice
(at-least-once, as Kafka applications without transactions are); the
online trainer drops the second example of a request by its id
(`monolith_jax.online.dedup`), so each is trained once.

No message stops it. A message that cannot be used goes to the dead-letter
topic with the reason, and is counted: unreadable (of any shape or size),
a dense value that is not finite where the job (`--job`) declares no fill,
an event time out of bounds (negative, or more than `--max-future-s` ahead:
see `join_state`), or a features record too large for any message of the
examples topic. So, per input message: it is joined (one example, or a
negative sampled out), counted (actions: positives, repeats, late, orphans,
others), or dead-lettered.

The hot path runs in C++ (`--codec native`, the default): each consumed
batch is read and joined in one call (`native_join.NativeJoinState`, the
rules of `join_state`, decided the same way), and only what the C++ reader
leaves (JSON, unusable or oversized records, Kafka events) is read by the
protobuf reference here, message by message. `--codec python` runs the
reference alone (`JoinState`, `parse_features`); both write the same
examples, counts and dead letters.

Labels: a single-label job's `LabelRule` (or --positive, --window, ...)
gives each example one binary label. A job with heads gives one named
label per head (`Job.labels`, a rule per head), as do repeated `--label
NAME:RULE` flags (`monolith_jax.stream.labels`; they replace the job's):
each example then carries one `Label` per rule (version 2, `join_labels`;
the C++ join decides them the same way).

Examples leave in groups (ExampleBatch) bound for one partition, of at most
`--group-size` examples and at most the producer's `message.max.bytes`
less `kafka.PROTOCOL_HEADROOM` bytes. A group the broker still refuses
as too large is sent again in halves; a single example it refuses, or one
that cannot be delivered after retries, is dead-lettered.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import signal
import sys
import threading
import time
import zlib

from monolith_jax.stream import kafka as K
from monolith_jax.stream.dead_letters import DeadLetters
from monolith_jax.stream.delivery import DeliveryMarks
from monolith_jax.stream.join_state import JoinConfig, JoinState
from monolith_jax.stream.offset_gaps import OffsetGaps
from monolith_jax.stream.messages import (BATCH_OVERHEAD, EXAMPLE_OVERHEAD, MessageError, batch_entry_size,
                                         encode_example_batch, features_to_binary, labels_overhead, parse_action,
                                         parse_features, split_example_batch)

log = logging.getLogger("monolith_jax.stream.joiner")
CODECS = ("native", "python")


class ExampleGrouper:
    """Groups the examples bound for one partition of the examples topic
    into ExampleBatch values of up to `group_size` examples and `max_bytes`
    bytes less `kafka.PROTOCOL_HEADROOM` (sent when full or `linger_s`
    old), so that trainers pay Kafka's per-message cost once per group. The
    partition is crc32(request id) mod the topic's partitions. group_size 1
    sends plain Examples.

    Delivery is checked: a group the broker refuses as too large is sent
    again in halves; an example that cannot be sent or delivered (too large
    alone, or refused after `retries` sends) goes to `dead` (a DeadLetters)
    with the reason, and is counted in `failed`."""

    def __init__(self, producer, topic: str, group_size: int = 64, linger_s: float = 0.02,
                 max_bytes: int = K.DEFAULT_MESSAGE_MAX_BYTES, dead: DeadLetters | None = None, retries: int = 3,
                 encode_batch=encode_example_batch):
        md = producer.list_topics(topic, timeout=10).topics[topic]
        self._encode_batch = encode_batch  # messages.encode_example_batch, or the same in C++
        self.partitions = max(len(md.partitions), 1)
        self.producer, self.topic = producer, topic
        self.group_size, self.linger_s = max(int(group_size), 1), linger_s
        self.limit = max(int(max_bytes) - K.PROTOCOL_HEADROOM, 1024)  # bytes of one value
        self.dead, self.retries = dead, retries
        self._groups: dict = {}   # partition -> [examples]
        self._bytes: dict = {}    # partition -> size of its ExampleBatch so far
        self._since: dict = {}    # partition -> monotonic time of its first example
        self.sent = 0             # messages produced
        self.failed = 0           # examples that could not be delivered (dead-lettered)
        self.resent = 0           # groups sent again in halves, or retried
        self._native = None       # a NativeJoinState that groups the examples in C++ (`group_in`)
        self.marks = None         # a DeliveryMarks: each group's sends and dead letters hold one token

    def group_in(self, state) -> None:
        """Lets `state` (a NativeJoinState) group the examples in C++, by the
        rules of `add`; this grouper then sends the groups it hands over
        (`drain`, `poll`, `flush`) and keeps their delivery (halves, retries,
        dead letters)."""
        state.group_examples(self.partitions, self.group_size, self.limit)
        self._native = state

    def drain(self) -> None:
        """Sends the groups `state` (see `group_in`) has filled."""
        if self._native is not None:
            self._send_groups(self._native.take_groups(math.inf))

    def _send_groups(self, groups) -> None:
        for partition, value, _ in groups:
            self._send(partition, None, value=value)

    def fits(self, example_size: int) -> bool:
        """Whether an Example of this size fits in a message of the topic."""
        return BATCH_OVERHEAD + batch_entry_size(example_size) <= self.limit

    def add(self, rid: str, example: bytes) -> None:
        p = zlib.crc32(rid.encode()) % self.partitions
        if self.group_size == 1:
            self._send(p, [example])
            return
        size = batch_entry_size(len(example))
        group = self._groups.get(p)
        if group and self._bytes[p] + size > self.limit:
            self._send(p, self._take(p))
            group = None
        if not group:
            group = self._groups[p] = []
            self._bytes[p] = BATCH_OVERHEAD
            self._since[p] = time.monotonic()
        group.append(example)
        self._bytes[p] += size
        if len(group) >= self.group_size or self._bytes[p] >= self.limit:
            self._send(p, self._take(p))

    def _take(self, p: int) -> list:
        self._bytes.pop(p, None)
        return self._groups.pop(p)

    def poll(self) -> None:
        """Sends groups older than linger_s."""
        now = time.monotonic()
        for p in [p for p, t in self._since.items() if p in self._groups and now - t >= self.linger_s]:
            self._send(p, self._take(p))
        if self._native is not None:
            self._send_groups(self._native.take_groups(self.linger_s))

    def flush(self) -> None:
        for p in list(self._groups):
            self._send(p, self._take(p))
        if self._native is not None:
            self._send_groups(self._native.take_groups(-1.0))

    def _send(self, partition: int, examples: list | None, attempt: int = 0, value: bytes | None = None,
              token: int | None = None) -> None:
        """Produces `examples`, or `value` already written (a group built in
        C++, whose examples are read back from it only if it fails).
        `token`: the group's in `marks` (None: a group sent the first time)."""
        from confluent_kafka import KafkaError, KafkaException

        if value is None:
            plain = len(examples) == 1 and self.group_size == 1
            value = examples[0] if plain else self._encode_batch(examples)
        if self.marks is not None:
            token = self.marks.take(token)
        try:
            K.produce(self.producer, self.topic, value, partition=partition,
                      on_delivery=lambda err, msg: self._delivered(err, partition, examples, attempt, value, token))
            self.sent += 1
        except KafkaException as err:  # refused by the client (e.g. MSG_SIZE_TOO_LARGE)
            code = err.args[0].code() if err.args else None
            try:
                self._failed(partition, examples, attempt, err.args[0] if err.args else err,
                             too_large=code == KafkaError.MSG_SIZE_TOO_LARGE, value=value, token=token)
            finally:
                self._settle(token)
        except BaseException:
            self._settle(token)
            raise

    def _settle(self, token: int | None) -> None:
        if self.marks is not None and token is not None:
            self.marks.settle(token)

    def _delivered(self, err, partition: int, examples: list | None, attempt: int, value: bytes,
                   token: int | None = None) -> None:
        if err is None:
            self._settle(token)
            return
        from confluent_kafka import KafkaError

        try:
            self._failed(partition, examples, attempt, err, too_large=err.code() == KafkaError.MSG_SIZE_TOO_LARGE,
                         value=value, token=token)
        finally:
            self._settle(token)

    def _failed(self, partition: int, examples: list | None, attempt: int, err, too_large: bool,
                value: bytes | None = None, token: int | None = None) -> None:
        why = err.str() if hasattr(err, "str") else str(err)
        if examples is None:  # a group written in C++: its examples, byte for byte
            examples = [value] if self.group_size == 1 else split_example_batch(value)
        if too_large and len(examples) > 1:
            # The broker's limit is below ours: halve this group, and later ones.
            self.resent += 1
            self.limit = max(min(self.limit, sum(len(e) for e in examples) // 2), 1024)
            if self._native is not None:
                self._native.set_group_limit(self.limit)
            half = len(examples) // 2
            log.warning("a group of %d examples was refused as too large (%s); sending it in halves, "
                        "groups now at most %d bytes", len(examples), why, self.limit)
            self._send(partition, examples[:half], attempt, token=token)
            self._send(partition, examples[half:], attempt, token=token)
            return
        if not too_large and attempt < self.retries:
            self.resent += 1
            log.warning("examples not delivered (%s); sending them again", why)
            self._send(partition, examples, attempt + 1, token=token)
            return
        for example in examples:
            self.failed += 1
            if self.dead is not None:  # its dead letter holds the group's token (when the marks are shared)
                self.dead.send_value(example, None, f"example not delivered to {self.topic}: {why}",
                                     (self.topic, partition, -1),
                                     token=token if self.dead.marks is self.marks else None)
            else:
                log.error("example for %s[%d] lost: %s", self.topic, partition, why)


class Joiner:
    def __init__(self, bootstrap: str, config: JoinConfig, topics: dict | None = None,
                 group: str = "monolith-joiner", spill_dir: str | None = None, commit_every_s: float = 0.1,
                 consumer_extra: dict | None = None, producer_extra: dict | None = None,
                 gate_group: str | None = None, max_lag: int = 40_000, group_size: int = 64, dense=(), sparse=(),
                 codec: str | None = None):
        """`dense`: the job's DenseFeatures; a non-finite value of one that
        declares a fill passes (the trainer fills it), else it is refused.
        `codec`: "native" reads and joins each consumed batch in C++
        (`native_join`; a message it cannot read goes to the protobuf
        reference), "python" does it all with the reference (`JoinState`,
        `parse_features`); both give the same examples, counts and dead
        letters. None (the default): "native"."""
        from confluent_kafka import Consumer, Producer

        codec = pick_codec(config, codec)
        self.topics = {**K.TOPICS, **(topics or {})}
        self.dense = tuple(dense or ())
        self.sparse = tuple(sparse or ())  # the job's: records lacking one are dead-lettered here
        producer_conf = K.producer_config(bootstrap, **(producer_extra or {}))
        max_bytes = K.max_message_bytes(producer_conf)
        self.producer = Producer(producer_conf)
        self.consumer = Consumer(K.consumer_config(bootstrap, group, **{
            "enable.auto.commit": False, "enable.partition.eof": True, **(consumer_extra or {})}))
        self.dead = DeadLetters(self.producer, self.topics["dead_letters"], max_bytes)
        self.codec = codec
        encode_batch = encode_example_batch
        if codec == "native":
            from monolith_jax.stream import fast_codec
            from monolith_jax.stream.native_join import NativeJoinState

            self.state = NativeJoinState(config, self._emit, spill_dir, reject=self.dead.send,
                                         features_topic=self.topics["features"], dense=self.dense, sparse=self.sparse)
            encode_batch = fast_codec.encoders()[1]
        else:
            self.state = JoinState(config, self._emit, spill_dir, reject=self.dead.send)
        # What an Example adds around a features record: its fields, and the labels at their largest.
        self.example_overhead = EXAMPLE_OVERHEAD + labels_overhead(
            [(name, 0.0, 1.0, True) for name, _ in config.labels])
        self.grouper = ExampleGrouper(self.producer, self.topics["examples"], group_size, max_bytes=max_bytes,
                                      dead=self.dead, encode_batch=encode_batch)
        if codec == "native":  # examples grouped in C++ too: one Python object per group, not per example
            self.grouper.group_in(self.state)
        # Commits that wait for nothing (`commit(wait=False)`): a commit point
        # is committed once every send before it is reported delivered.
        self.marks = self.grouper.marks = self.dead.marks = DeliveryMarks()
        self._points: collections.deque = collections.deque()  # (mark, {tp: offset}), oldest first
        self._committed_at: dict = {}  # what the last commit sent
        self.commit_every_s = commit_every_s
        self._next: dict = {}          # (topic, partition) -> next offset to read
        self.gaps = OffsetGaps("joiner")  # messages the cluster deleted before they were read
        self._assigned: set = set()
        self._idle_at: dict = {}       # (topic, partition) -> its end when it was reported read to it
        self._last_commit = time.monotonic()
        # Backpressure: never run more than max_lag examples ahead of the trainers
        # (the gate counts messages, each a group of up to group_size examples).
        self.gate = K.LagGate(bootstrap, gate_group, [self.topics["examples"]],
                              max(max_lag // max(group_size, 1), 50), check_every=50) if gate_group else None

    def _emit(self, rid: str, example: bytes) -> None:
        self._stepping(self.grouper.add, rid, example)

    def _stepping(self, send, *args) -> None:
        """send(*args), then the gate counts the messages it produced."""
        sent = self.grouper.sent
        send(*args)
        if self.gate is not None and self.grouper.sent > sent:
            self.gate.step(self.grouper.sent - sent, self.producer)

    # ------------------------------------------------------------ commits
    def commit(self, only=None, wait: bool = True) -> dict:
        """Commits, per partition, the oldest offset still needed once the
        examples and dead letters produced for the messages before it are
        delivered. `wait`: waits for them now (the producer flushed), and
        commits; else waits for nothing: commits the newest earlier commit
        point whose sends are all reported delivered (`DeliveryMarks`), and
        takes a new point. Returns what it committed."""
        self.grouper.flush()
        if not wait:
            ready = None
            while self._points and self.marks.settled(self._points[0][0]):
                ready = self._points.popleft()[1]
            if len(self._points) >= 32:  # deliveries stalled: keep the oldest points, replace the newest
                self._points.pop()
            self._points.append((self.marks.mark(), self._offsets(None)))
            self._last_commit = time.monotonic()
            return self._commit_offsets(ready) if ready else {}
        if self.producer.flush(30) > 0:
            log.error("examples not delivered within 30 s; offsets not committed")
            return {}
        offsets = self._offsets(only)
        for _, point in self._points:  # superseded: these partitions commit now
            for tp in offsets:
                point.pop(tp, None)
        self._last_commit = time.monotonic()
        return self._commit_offsets(offsets)

    def _offsets(self, only) -> dict:
        low = self.state.low_offsets()
        return {tp: min(nxt, low.get(tp, nxt)) for tp, nxt in self._next.items() if only is None or tp in only}

    def _commit_offsets(self, offsets: dict) -> dict:
        from confluent_kafka import TopicPartition

        offsets = {tp: o for tp, o in offsets.items() if tp in self._next}  # still this joiner's partitions
        if offsets and any(self._committed_at.get(tp) != o for tp, o in offsets.items()):
            try:
                self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                     asynchronous=False)
                self._committed_at.update(offsets)
            except Exception as err:  # a rebalance in progress: the next commit covers it
                log.warning("commit failed: %s", err)
        return offsets

    def _on_assign(self, consumer, partitions) -> None:
        self._assigned = {(p.topic, p.partition) for p in partitions}
        self.gaps.assigned(consumer, partitions)
        self.state.set_partitions(self._assigned)
        log.info("joiner assigned %s", sorted(self._assigned))

    def _on_revoke(self, consumer, partitions) -> None:
        tps = {(p.topic, p.partition) for p in partitions}
        self.commit(only=tps)
        dropped = self.state.drop_partitions(tps)
        self.gaps.revoked(tps)
        for tp in tps:
            self._next.pop(tp, None)
            self._committed_at.pop(tp, None)
            self._idle_at.pop(tp, None)
            for _, point in self._points:
                point.pop(tp, None)
        self._assigned -= tps
        if dropped:
            log.info("rebalance: %d waiting requests of revoked partitions left to their new owner", dropped)

    # ---------------------------------------------------------------- run
    def handle(self, msg) -> None:
        """One input message: into the join, or to the dead letters with why."""
        topic, value = msg.topic(), msg.value()
        key, offset = (topic, msg.partition()), msg.offset()
        self._next[key] = offset + 1
        if self.codec != "native":  # (the native reader checks what it reads, and what it leaves here)
            self.gaps.message(self.consumer, key, offset)
        origin = (topic, msg.partition(), msg.offset())
        features = topic == self.topics["features"]
        try:
            if features:
                rec = parse_features(value, self.dense, self.sparse)
                payload = features_to_binary(value, rec)
                if not self.grouper.fits(len(payload) + self.example_overhead):
                    raise MessageError(f"features record too large: {len(payload)} bytes; a message of the "
                                       f"examples topic holds at most {self.grouper.limit} bytes")
            else:
                act = parse_action(value)
        except MessageError as err:
            self.dead.send(msg, err.reason)
            return
        except Exception as err:  # any other failure to read it: a reason, never a stop
            self.dead.send(msg, f"unreadable {'features' if features else 'actions'} message: "
                                f"{type(err).__name__}: {str(err)[:200]}")
            return
        if features:
            self.state.add_features(rec.request_id, rec.event_time_ms, payload, origin, ref=msg)
        else:
            self.state.add_action(act.request_id, act.event_time_ms, act.type, act.value, origin, ref=msg)

    def process(self, msgs: list) -> None:
        """A consumed batch: each message into the join or the dead letters,
        each end of partition reported to the join state."""
        if self.codec == "native":  # read and joined in C++; what it leaves comes back to _slow in order
            for key, expected, got in self.state.process(msgs, self.grouper.limit, self._next, self._slow,
                                                         self.gaps.expect):
                self.gaps.gap(self.consumer, key, expected, got)
            self._stepping(self.grouper.drain)
            return
        for msg in msgs:
            self._slow(msg)

    def _slow(self, msg) -> None:
        """One message by the reference: a Kafka event, or a message to parse
        in Python (into the join, or to the dead letters with why)."""
        if msg.error() is not None:
            self._event(msg)
        else:
            self.handle(msg)

    def _recheck_idle(self) -> None:
        """A partition reported read to its end stops holding the watermark
        back once silent for `idle_partition_s` of wall clock; but a joiner
        that was itself held up (its gate, a full core) sees silence where
        messages are fetched and not yet handed over, and the watermark
        would pass requests whose actions wait in that partition. Whatever
        the fetches say lies past what was read (the consumer's cached high
        watermark, no round trip) makes the partition hold it again."""
        if not self._idle_at:
            return
        from confluent_kafka import TopicPartition

        for tp, end in list(self._idle_at.items()):
            try:
                high = self.consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)[1]
            except Exception:  # not fetched yet: nothing known beyond its end
                continue
            if high > max(self._next.get(tp, end), end):
                self.state.partition_busy(tp)
                del self._idle_at[tp]

    def _event(self, msg) -> None:
        from confluent_kafka import KafkaError

        err = msg.error()
        if err.code() == KafkaError._PARTITION_EOF:
            tp = (msg.topic(), msg.partition())
            self.state.partition_idle(tp)
            self._idle_at[tp] = msg.offset()
        else:
            log.warning("consumer error: %s", err)

    def run(self, idle_flush_s: float | None = None, exit_when_idle: bool = False,
            max_seconds: float | None = None, stop: threading.Event | None = None,
            report_every_s: float = 10.0, out=print, upstream_done: threading.Event | None = None) -> dict:
        """Joins until `stop` is set or `max_seconds` pass. With
        `idle_flush_s`, a stream silent that long is taken to have ended:
        every waiting request is decided (and with `exit_when_idle` the
        joiner then returns). `upstream_done`, once set, says the stream
        has ended (every message of it is in Kafka): the same happens as
        soon as every assigned partition is read to its end, without
        waiting out `idle_flush_s`."""
        self.consumer.subscribe([self.topics["features"], self.topics["actions"]],
                                on_assign=self._on_assign, on_revoke=self._on_revoke)
        t0 = last_msg = last_report = time.monotonic()
        last_check = 0.0
        announced = False
        try:
            while not (stop is not None and stop.is_set()):
                now = time.monotonic()
                if max_seconds is not None and now - t0 > max_seconds:
                    break
                msgs = self.consumer.consume(num_messages=5000, timeout=0.01)  # see OnlineTrainer._collect
                if self._assigned and not announced:  # its partitions are in hand: a launcher starts upstream now
                    announced = True
                    out(f"joiner assigned {len(self._assigned)} partitions", flush=True)
                self.process(msgs)
                now = time.monotonic()
                if msgs:
                    last_msg = now
                    self._recheck_idle()
                    self.state.advance()
                    self._stepping(self.grouper.drain)
                elif upstream_done is not None and upstream_done.is_set() and now - last_check > 0.05:
                    last_check = now
                    if self._read_to_end():
                        self.state.flush()
                        self.commit()
                        if exit_when_idle:
                            break
                        upstream_done = None  # decided: from here on only idle_flush_s applies
                elif idle_flush_s is not None and now - last_msg > idle_flush_s and self.state.waiting:
                    self.state.flush()
                    self.commit()
                    if exit_when_idle:
                        break
                elif exit_when_idle and idle_flush_s is not None and now - last_msg > idle_flush_s \
                        and self.state.counts["features"]:
                    break
                self._stepping(self.grouper.poll)
                self.producer.poll(0)
                if now - self._last_commit > self.commit_every_s:
                    self.commit(wait=False)
                if report_every_s and now - last_report > report_every_s:
                    last_report = now
                    out("joiner " + json.dumps(self.stats()), flush=True)
        finally:
            self.commit()
            self.consumer.close()
        return self.stats()

    def _read_to_end(self) -> bool:
        """Whether every partition assigned here has been consumed up to its
        high watermark as the cluster reports it now (a partition never
        written counts as read)."""
        parts = self.consumer.assignment()
        if not parts:
            return False
        for tp in self.consumer.position(parts):
            low, high = self.consumer.get_watermark_offsets(tp, timeout=5)
            if high > low and tp.offset < high:  # a negative offset: nothing consumed yet
                return False
        return True

    def stats(self) -> dict:
        return {**self.state.counts, "waiting": self.state.waiting, "in_memory": self.state.in_memory,
                "dead_letters": self.dead.count, "dead_letter_reasons": dict(self.dead.by_reason),
                "dead_letters_failed": self.dead.failed, "examples_failed": self.grouper.failed,
                **self.gaps.counts(),
                "backpressure_s": round(self.gate.waited_s, 2) if self.gate is not None else 0.0}

    def close(self) -> None:
        self.grouper.flush()
        self.producer.flush(30)
        self.state.close()
        if self.gate is not None:
            self.gate.close()


def _stdin_closed() -> threading.Event:
    """An event set once stdin reaches its end (what is read is dropped)."""
    done = threading.Event()

    def watch():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            done.set()

    threading.Thread(target=watch, name="stdin-end", daemon=True).start()
    return done


def quiet_gc() -> None:
    """The joiner process's setting of Python's cyclic collector (its `main`
    calls this; a library import never does). Each consumed batch makes
    thousands of Kafka Message objects that the collector tracks and that
    all die with the batch, so with the default thresholds it ran every 700
    of them and walked what startup made as well (~15% of the joiner
    thread's time, by perf). What exists now is frozen out of its walks,
    and young objects are collected every 50,000 allocations."""
    import gc

    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def pick_codec(config: JoinConfig, codec: str | None) -> str:
    """The codec a config runs with: `codec` if given, else "native" (both
    join named labels, `JoinConfig.labels`, the same way)."""
    if codec is not None and codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    return codec or "native"


def config_from_args(args, job=None) -> JoinConfig:
    """The join's rules: `--label`s given win; else each flag given wins,
    then the job's `LabelRule` (`job`, else `--job` loaded), then the
    defaults of `LabelRule`. A job with heads gives one named label per
    head (`Job.label_rules`); the single-label flags (--positive,
    --min-value, --window, --negative-rate) then do not apply."""
    from monolith_jax.job import LabelRule, load_job
    from monolith_jax.stream.labels import rules_from_args

    if job is None and getattr(args, "job", None):
        job = load_job(args.job)
    common = dict(lateness_s=args.lateness, max_in_memory=args.max_in_memory, seed=args.seed,
                  emit_positives=args.emit_positives,
                  max_future_s=getattr(args, "max_future_s", None) or JoinConfig.max_future_s)
    single = {"--positive": args.positive, "--min-value": args.min_value, "--window": args.window,
              "--negative-rate": args.negative_rate}
    given = [flag for flag, value in single.items() if value is not None]
    given_say = f"{', '.join(given)} {'describes' if len(given) == 1 else 'describe'} a single label"
    labels = getattr(args, "label", None)
    if labels:
        rules = rules_from_args(labels)
        if given:
            raise ValueError(f"{given_say}; with --label each label gives its own "
                             "(e.g. --label click:positive=click,window=60,rate=0.5)")
        if job is not None and job.heads:
            heads = [h.name for h in job.heads]
            lacking = [h for h in heads if h not in rules]
            if lacking:
                log.warning("--label gives no rule for the job's heads %s: their examples lack those labels",
                            lacking)
        return JoinConfig(labels=rules, **common)
    if job is not None and job.heads:
        rules = job.label_rules()
        if rules is None:
            raise ValueError(f"job {job.name!r} has heads {[h.name for h in job.heads]} but no label rules: give "
                             "it labels={head: LabelRule, ...}, or the joiner --label NAME:... per head")
        if given:
            raise ValueError(f"{given_say}; job {job.name!r} labels its heads "
                             f"{sorted(rules)} by its own rules (override them with --label)")
        return JoinConfig(labels=rules, **common)
    rule = job.labels if job is not None else LabelRule()
    pick = lambda flag, value: value if flag is None else flag  # noqa: E731
    return JoinConfig(window_s=pick(args.window, rule.window_s),
                      positive_types=tuple(args.positive.split(",")) if args.positive else rule.positive,
                      min_value=pick(args.min_value, rule.min_value),
                      negative_rate=pick(args.negative_rate, rule.negative_rate), **common)


def add_join_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", default=None,
                   help="MODULE:NAME of the job whose LabelRule gives the defaults of --positive, --min-value, "
                        "--window and --negative-rate (a job with heads: one named label per head, by its "
                        "labels), and whose dense features say which may be non-finite (those with a fill)")
    p.add_argument("--label", action="append", default=None, metavar="NAME:RULE",
                   help="a named label (repeat for several; replaces the job's labels, and the examples then "
                        "carry one Label per --label): NAME:positive=TYPE[+TYPE...][,min=V][,window=S][,rate=R]"
                        "[,given=LABEL] (binary: 1 if such an action, value >= min, came within window seconds; "
                        "0s kept with probability rate) or NAME:value=TYPE[,default=V][,window=S][,given=LABEL] "
                        "(the earliest such action's value; without one, default, else undefined). given: "
                        "defined only where that binary label is 1. Defaults: window 300, rate 1, min none, "
                        "no default")
    p.add_argument("--window", type=float, default=None,
                   help="seconds of event time to wait for an action (default: the job's, else 300)")
    p.add_argument("--lateness", type=float, default=10.0, help="seconds messages may arrive out of order")
    p.add_argument("--positive", default=None,
                   help="comma-separated action types that make a positive (default: the job's, else click)")
    p.add_argument("--min-value", type=float, default=None,
                   help="least action value for a positive (default: the job's, else none)")
    p.add_argument("--negative-rate", type=float, default=None,
                   help="share of negatives kept (default: the job's, else 1)")
    p.add_argument("--max-in-memory", type=int, default=1_000_000, help="waiting requests held in memory")
    p.add_argument("--seed", type=int, default=0, help="seeds the negative sampling")
    p.add_argument("--emit-positives", choices=("on_action", "at_window_end"), default="on_action",
                   help="emit a positive when its action arrives, or when its window closes")
    p.add_argument("--max-future-s", type=float, default=JoinConfig.max_future_s,
                   help="an event time more than this far ahead of the joiner's clock, or of the stream, is "
                        "dead-lettered (negative ones too)")


def warn_if_unlabelled(stats: dict, config: JoinConfig, out=None) -> str | None:
    """A line saying the stream's actions made no positive (the joiner's
    rule and the producer's action types disagree), or None; for a
    multi-label config, one line per label that no action set."""
    if config.labels:
        lines = []
        if stats.get("actions", 0):
            for name, rule in config.labels:
                got = stats.get(f"{name}:positives" if rule.binary else f"{name}:values", 0)
                if not got:
                    what = (f"positive={'+'.join(rule.positive)} with value >= {rule.min_value}" if rule.binary
                            else f"value={rule.value_of}")
                    lines.append(f"joiner: {stats['actions']:,} actions but label {name!r} was never set: none "
                                 f"matched {what} ({stats.get('other_actions', 0):,} actions no label reads). "
                                 "Check that its rule (the job's labels or --label) names the producer's action "
                                 "types")
        for line in lines:
            log.warning(line)
        return "\n".join(lines) or None
    if stats.get("actions", 0) and not stats.get("positives", 0):
        line = (f"joiner: {stats['actions']:,} actions but no positive: none matched "
                f"--positive {','.join(config.positive_types)} with value >= {config.min_value} "
                f"({stats.get('other_actions', 0):,} actions of other types). Every example is a negative; "
                "check that the joiner's --positive (or the job's LabelRule) names the producer's action types")
        log.warning(line)
        return line
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="monolith join", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap.servers")
    p.add_argument("--group", default="monolith-joiner", help="consumer group the joiners share")
    p.add_argument("--spill-dir", default=None, help="folder for requests spilled to disk (default: a temp folder)")
    p.add_argument("--idle-flush", type=float, default=None,
                   help="seconds of silence after which the stream is taken to have ended")
    p.add_argument("--exit-when-idle", action="store_true", help="exit once the stream has ended and is flushed")
    p.add_argument("--upstream-ends-with-stdin", action="store_true",
                   help="the stream has ended once stdin closes (a launcher that replays a stream closes it once "
                        "the replay's last message is in Kafka): decide every waiting request as soon as every "
                        "assigned partition is read to its end, without waiting out --idle-flush")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--report-every", type=float, default=10.0, help="seconds between progress lines (0: none)")
    p.add_argument("--gate-group", default=None, help="consumer group (the trainers') not to outrun")
    p.add_argument("--max-lag", type=int, default=40_000, help="examples the gate group may fall behind")
    p.add_argument("--group-size", type=int, default=64, help="examples per Kafka value (1: plain Examples)")
    p.add_argument("--codec", choices=CODECS, default=None,
                   help="read messages and write examples in C++, or with the protobuf reference alone "
                        "(default: native)")
    for name, default in K.TOPICS.items():
        p.add_argument(f"--topic-{name.replace('_', '-')}", default=default, help=f"the {name} topic")
    add_join_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    topics = {name: getattr(args, f"topic_{name}") for name in K.TOPICS}
    from monolith_jax.job import load_job

    job = load_job(args.job) if args.job else None
    try:
        config = config_from_args(args, job)
        codec = pick_codec(config, args.codec)
    except ValueError as err:
        p.error(str(err))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    quiet_gc()
    joiner = Joiner(args.bootstrap, config, topics, args.group, args.spill_dir,
                    gate_group=args.gate_group, max_lag=args.max_lag, group_size=args.group_size,
                    dense=job.dense if job is not None else (), sparse=job.sparse if job is not None else (),
                    codec=codec)
    try:
        stats = joiner.run(args.idle_flush, args.exit_when_idle, args.max_seconds, stop, args.report_every,
                           upstream_done=_stdin_closed() if args.upstream_ends_with_stdin else None)
    finally:
        joiner.close()
    warn_if_unlabelled(stats, config)
    print("joiner done " + json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
