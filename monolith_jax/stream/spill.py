"""The joiner's on-disk store for features that wait long for their actions.

SQLite (the standard library's), one file per joiner process, keyed by
request id, indexed by deadline. It is a cache of what the joiner has read
but not yet finalized: on a crash the joiner re-reads those messages from
the offsets it committed (the oldest pending one per partition), so the
file is written without fsync and deleted on close.

SQLite integers are 64-bit: deadlines and times are clamped to that range
(an event time near 2^63 plus the window would not fit), and `pop_due`
takes any Python int.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _int64(v) -> int:
    return min(max(int(v), INT64_MIN), INT64_MAX)


class SpillStore:
    def __init__(self, folder: str | None = None):
        self._dir = None
        if folder is None:
            self._dir = tempfile.TemporaryDirectory(prefix="monolith-joiner-")
            folder = self._dir.name
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"joiner-spill-{os.getpid()}-{id(self):x}.sqlite")
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE pending (rid TEXT PRIMARY KEY, deadline INTEGER, event_ms INTEGER, "
                         "payload BLOB, topic TEXT, part INTEGER, off INTEGER, state TEXT)")
        self._db.execute("CREATE INDEX by_deadline ON pending (deadline)")
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def put_many(self, rows) -> None:
        """rows: (rid, deadline, event_ms, payload, topic, partition, offset[, state]);
        `state` (text: a multi-label join's per-label state) comes back as
        the row's eighth field, None if not given."""
        rows = [(r[0], _int64(r[1]), _int64(r[2]), r[3], r[4], _int64(r[5]), _int64(r[6]),
                 r[7] if len(r) > 7 else None) for r in rows]
        if rows:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO pending VALUES (?,?,?,?,?,?,?,?)", rows)
            self._db.execute("COMMIT")
            self._n = self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]

    def take(self, rid: str):
        """The row of `rid`, removed; None if absent."""
        if not self._n:
            return None
        row = self._db.execute("DELETE FROM pending WHERE rid = ? RETURNING *", (rid,)).fetchone()
        if row is not None:
            self._n -= 1
        return row

    def pop_due(self, deadline: int) -> list:
        """Rows whose deadline is < `deadline`, removed, oldest first."""
        if not self._n:
            return []
        if deadline > INT64_MAX:  # above every stored deadline: all of them
            rows = self._db.execute("DELETE FROM pending RETURNING *").fetchall()
        else:
            rows = self._db.execute("DELETE FROM pending WHERE deadline < ? RETURNING *",
                                    (_int64(deadline),)).fetchall()
        self._n -= len(rows)
        rows.sort(key=lambda r: r[1])
        return rows

    def pop_all(self) -> list:
        return self.pop_due(INT64_MAX + 1)

    def min_offsets(self) -> dict:
        """{(topic, partition): smallest offset held}."""
        if not self._n:
            return {}
        return {(t, p): o for t, p, o in
                self._db.execute("SELECT topic, part, MIN(off) FROM pending GROUP BY topic, part")}

    def drop_partitions(self, tps) -> int:
        n = 0
        for topic, part in tps:
            n += self._db.execute("DELETE FROM pending WHERE topic = ? AND part = ?", (topic, part)).rowcount
        self._n -= n
        return n

    def close(self) -> None:
        self._db.close()
        try:
            os.remove(self.path)
        except OSError:
            pass
        if self._dir is not None:
            self._dir.cleanup()
