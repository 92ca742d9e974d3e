"""Store-and-forward: every result is written to an SQLite spool before it is published.

A row leaves the spool only when the broker has acknowledged it (PUBACK), so results
survive a broker outage, an agent restart and a SIGKILL of the agent. Rows are sent in
insertion order; `seq` is assigned per pipeline in the same transaction as the row, so it
keeps counting across restarts. The spool is bounded by the payload bytes it holds: past
the cap the oldest rows are dropped, and the drop count (persisted) is reported.

Durability: WAL with `synchronous=NORMAL`: a committed row survives the process being
killed (the write has reached the kernel); after a power cut the last moments of rows may
be missing, but the file stays consistent.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.statefiles import SQLITE_SIDE_FILES, Episode, disk_full, open_or_quarantine, sqlite_check, write_transaction

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SpooledResult:
    """One row waiting for the broker's acknowledgement."""

    id: int
    """Position in the spool (increasing; the send order)."""
    pipeline: str
    seq: int
    topic: str
    payload: str
    """The result as JSON, without `historical`."""

    def body(self, historical: bool) -> bytes:
        text = self.payload
        if historical:
            text = text[:-1] + ',"historical":true}'
        return text.encode()


@dataclass(frozen=True)
class SpoolStats:
    queued: int
    """Rows waiting for an acknowledgement."""
    bytes: int
    """Payload bytes held."""
    dropped: int
    """Rows dropped because the spool was full (since the spool file was made)."""
    peak_bytes: int
    """Largest `bytes` seen since this process opened the spool."""
    file_bytes: int
    """The SQLite file and its WAL on disk."""


class Spool:
    """An ordered, size-bounded, crash-safe queue of result payloads."""

    def __init__(self, path: Path, cap_bytes: int, on_append: Callable[[], None] | None = None) -> None:
        self.path = path
        self.cap_bytes = cap_bytes
        self.on_append = on_append
        """Called after each append (outside the lock): the link wakes up to send."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # One connection shared by the pipelines (append), the link (read, ack) and status; the lock
        # serialises them, which also keeps seq assignment and insertion one atomic step.
        self._seqs: dict[str, int] = {}
        self._dropped = self._queued = self._bytes = 0
        self._unsaved_drops = False
        self._unacked: list[int] = []
        self._full = Episode(f"result spool {path}")
        # Acknowledged results left the spool on their PUBACK, so a corrupt spool costs only the unsent ones.
        self._db = open_or_quarantine(
            path, self._open, what="result spool", side_files=SQLITE_SIDE_FILES,
            lost="lost: the results the broker had not acknowledged yet (acknowledged ones were never in "
                 "danger); seq starts again at 1")
        self._peak = self._bytes
        if self._queued:
            logger.info("spool %s: %d results (%d bytes) waiting from before", path, self._queued, self._bytes)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            sqlite_check(db)
            seqs = {name[4:]: int(value)
                    for name, value in db.execute("SELECT name, value FROM counters WHERE name LIKE 'seq:%'")}
            row = db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
            count, total = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM results").fetchone()
        except BaseException:
            db.close()
            raise
        self._seqs, self._dropped = seqs, int(row[0]) if row else 0
        self._queued, self._bytes = int(count), int(total)
        return db

    def append(self, pipeline: str, topic: str, result: dict[str, Any]) -> int:
        """Assign the pipeline's next `seq`, store the result; returns the seq.

        On a full disk the result is dropped and counted (`dropped`; its seq is a gap the consumer sees),
        said once per episode, and the pipeline goes on: nothing can be kept without space, and a result
        that cannot be stored must not stop the ones after it once there is room again."""
        with self._lock:
            seq = self._seqs.get(pipeline, 0) + 1
            payload = json.dumps({"seq": seq, **result}, separators=(",", ":"), allow_nan=False)
            size = len(payload)
            figures = self._dropped, self._queued, self._bytes
            try:
                try:
                    with write_transaction(self._db):
                        if self._bytes + size > self.cap_bytes:
                            self._make_room(size)
                        self._db.execute(
                            "INSERT INTO results (pipeline, seq, topic, payload) VALUES (?, ?, ?, ?)",
                            (pipeline, seq, topic, payload),
                        )
                        self._db.execute(
                            "INSERT INTO counters (name, value) VALUES (?, ?) "
                            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                            (f"seq:{pipeline}", seq),
                        )
                        if self._unsaved_drops:
                            self._save_dropped()
                except BaseException:
                    self._dropped, self._queued, self._bytes = figures
                    raise
            except sqlite3.OperationalError as exc:
                if not disk_full(exc):
                    raise
                self._seqs[pipeline] = seq
                self._dropped += 1
                self._unsaved_drops = True
                self._full.failed(exc, "results are dropped and counted")
                return seq
            self._unsaved_drops = False
            self._full.ok()
            self._seqs[pipeline] = seq
            self._queued += 1
            self._bytes += size
            self._peak = max(self._peak, self._bytes)
        if self.on_append is not None:
            self.on_append()
        return seq

    def _save_dropped(self) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES ('dropped', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (self._dropped,),
        )

    def _make_room(self, size: int) -> None:
        # Inside the caller's transaction: drop the oldest rows until the new one fits.
        need = self._bytes + size - self.cap_bytes
        freed = dropped = 0
        last_id = None
        for row_id, length in self._db.execute("SELECT id, LENGTH(payload) FROM results ORDER BY id"):
            if freed >= need:
                break
            freed += int(length)
            dropped += 1
            last_id = row_id
        if last_id is not None:
            self._db.execute("DELETE FROM results WHERE id <= ?", (last_id,))
        self._dropped += dropped
        self._save_dropped()
        self._queued -= dropped
        self._bytes -= freed
        if dropped:
            logger.warning("spool full (%d bytes): dropped the %d oldest results", self.cap_bytes, dropped)

    def pending(self, after_id: int, limit: int) -> list[SpooledResult]:
        """Up to `limit` rows after `after_id`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, pipeline, seq, topic, payload FROM results WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [SpooledResult(int(r[0]), str(r[1]), int(r[2]), str(r[3]), str(r[4])) for r in rows]

    def last_id(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM results").fetchone()
        return int(row[0] or 0)

    def ack(self, ids: Iterable[int]) -> int:
        """Remove acknowledged rows (ids already dropped are ignored); returns how many were removed.

        A delete needs room too (the WAL): on a full disk the ids are kept and removed with the next ack
        that can be written. Until then they stay in the spool (a restart would send them again: at least
        once, never lost)."""
        with self._lock:
            ids = self._unacked + list(ids)
            if not ids:
                return 0
            removed = freed = 0
            try:
                with write_transaction(self._db):
                    for start in range(0, len(ids), 500):
                        chunk = ids[start : start + 500]
                        marks = ",".join("?" * len(chunk))
                        n, size = self._db.execute(
                            f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM results WHERE id IN ({marks})",  # noqa: S608
                            chunk,
                        ).fetchone()
                        self._db.execute(f"DELETE FROM results WHERE id IN ({marks})", chunk)  # noqa: S608
                        removed += int(n)
                        freed += int(size)
            except sqlite3.OperationalError as exc:
                if not disk_full(exc):
                    raise
                self._unacked = ids[-100_000:]  # bounded: beyond it, a restart re-sends (at least once)
                self._full.failed(exc, "acknowledged results stay in the spool")
                return 0
            self._unacked = []
            self._queued -= removed
            self._bytes -= freed
        return removed

    def stats(self) -> SpoolStats:
        with self._lock:
            queued, size, dropped, peak = self._queued, self._bytes, self._dropped, self._peak
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        on_disk = sum(p.stat().st_size for p in files if p.exists())
        return SpoolStats(queued=queued, bytes=size, dropped=dropped, peak_bytes=peak, file_bytes=on_disk)

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                logger.warning("spool %s: checkpoint at close failed: %s", self.path, exc)
            self._db.close()
