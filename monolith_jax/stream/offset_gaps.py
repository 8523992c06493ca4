"""Offsets a consumer passed over: messages lost to the cluster's retention.

A consumer that falls further behind than a topic keeps (retention by size
or time) asks for an offset the cluster has deleted. Kafka answers
OFFSET_OUT_OF_RANGE, and the consumer resets to the earliest offset still
kept (`auto.offset.reset`), without telling the application: the messages
in between are gone, and nothing fails. `OffsetGaps` catches that from
the offsets themselves. It knows, per partition, the next offset it
expects: where the group's committed offset (or a snapshot) says reading
starts, then one past each message read. A message further on than that
is a gap, and the partition's low watermark (the oldest offset the
cluster still holds) says what it was:

- offsets below the low watermark were deleted before they were read:
  **lost**, counted and logged as an error;
- the rest are offsets the log holds no message of for this consumer
  (transaction markers, aborted transactions under `read_committed`,
  compaction): **skipped**, counted, logged once.

Offsets going backwards (a re-read after a rebalance, a seek) are not gaps.
A partition whose start is unknown (no committed offset: the group's first
read) is checked from its first message on.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("monolith_jax.stream")


class OffsetGaps:
    def __init__(self, who: str):
        self.who = who                  # which process reads, for the log ("joiner", "trainer")
        self.expect: dict = {}          # (topic, partition) -> next offset expected
        self.lost = 0                   # messages deleted by retention before they were read
        self.skipped = 0                # offsets passed over that retention does not explain
        self.gaps = 0                   # gaps seen (each a jump over one or more offsets)
        self._skip_logged = False

    def counts(self) -> dict:
        return {"offsets_lost": self.lost, "offsets_skipped": self.skipped}

    def restore(self, counts: dict) -> None:
        """Counts carried by a snapshot (`counts()`); missing ones are 0."""
        self.lost = int(counts.get("offsets_lost", 0))
        self.skipped = int(counts.get("offsets_skipped", 0))

    # ---------------------------------------------------------- starts
    def assigned(self, consumer, partitions, known: dict | None = None) -> None:
        """Newly assigned partitions start where `known[(topic, partition)]`
        says (a snapshot's offsets), else at the group's committed offset;
        where neither is known, at the first message read. A failure to
        ask for the committed offsets leaves those starts unknown (logged)."""
        keys = {(p.topic, p.partition) for p in partitions}
        for key in keys:
            self.expect.pop(key, None)
        known = {k: int(o) for k, o in (known or {}).items() if k in keys and int(o) >= 0}
        ask = [p for p in partitions if (p.topic, p.partition) not in known]
        if ask:
            try:
                for tp in consumer.committed(ask, timeout=10):
                    if tp.error is None and tp.offset >= 0:
                        known[(tp.topic, tp.partition)] = int(tp.offset)
            except Exception as err:  # the check starts at the first message instead
                log.warning("%s: committed offsets unknown (%s): gaps are checked from the first message read",
                            self.who, err)
        self.expect.update(known)

    def revoked(self, keys) -> None:
        for key in keys:
            self.expect.pop(key, None)

    # ---------------------------------------------------------- checks
    def message(self, consumer, key: tuple, offset: int) -> None:
        """One message read, at `offset` of partition `key`."""
        expected = self.expect.get(key)
        if expected is not None and offset > expected:
            self.gap(consumer, key, expected, offset)
        self.expect[key] = offset + 1

    def batch(self, consumer, topic: str, partitions: np.ndarray, offsets: np.ndarray) -> None:
        """The messages a batch took, in the order read: their partitions and
        offsets (arrays of one length)."""
        partitions, offsets = np.asarray(partitions, np.int64), np.asarray(offsets, np.int64)
        for p in np.unique(partitions):
            offs = offsets[partitions == p]
            key = (topic, int(p))
            expected = self.expect.get(key)
            if expected is not None and offs[0] > expected:
                self.gap(consumer, key, expected, int(offs[0]))
            for i in np.flatnonzero(np.diff(offs) > 1):
                self.gap(consumer, key, int(offs[i]) + 1, int(offs[i + 1]))
            self.expect[key] = int(offs[-1]) + 1

    def gap(self, consumer, key: tuple, expected: int, got: int) -> None:
        """Offsets [expected, got) were passed over in partition `key`: lost
        (below the low watermark) or skipped. The low watermark is the
        consumer's own from its fetches, or asked for when that is unknown
        or does not explain a gap of more than one offset."""
        from confluent_kafka import TopicPartition

        tp = TopicPartition(*key)
        low = -1
        try:
            low = consumer.get_watermark_offsets(tp, cached=True)[0]
            if low < 0 or (low <= expected and got - expected > 1):
                low = consumer.get_watermark_offsets(tp, timeout=2)[0]
        except Exception as err:
            log.warning("%s: no low watermark for %s[%d] (%s)", self.who, key[0], key[1], err)
        lost = max(0, min(low, got) - expected)
        self.gaps += 1
        self.lost += lost
        self.skipped += got - expected - lost
        if lost:
            log.error("%s: %s[%d]: %d messages (offsets %d..%d) were deleted by the cluster's retention before "
                      "they were read: lost (%d in all). The stream runs further behind than the topic keeps: "
                      "raise its retention, or the consumers' rate", self.who, key[0], key[1], lost, expected,
                      expected + lost - 1, self.lost)
        if got - expected - lost and not self._skip_logged:
            self._skip_logged = True
            log.info("%s: %s[%d]: offsets %d..%d hold no message for this consumer (transaction markers or "
                     "compaction); such gaps are counted as offsets_skipped", self.who, key[0], key[1],
                     expected + lost, got - 1)
