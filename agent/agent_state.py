"""Small persistent state of the agent: the birth/death sequence number and the record of commands.

The command record makes commands idempotent: an id seen before is answered with the reply
it got then, and never executed twice, also across restarts. It keeps the newest
`keep` ids.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from agent.statefiles import SQLITE_SIDE_FILES, Episode, disk_full, open_or_quarantine, sqlite_check, write_transaction

MEMORY_KEEP = 1000
"""Command ids kept in memory while the disk is full."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    reply TEXT
);
CREATE INDEX IF NOT EXISTS commands_ts ON commands (ts);
"""


class AgentState:
    """`<state_dir>/agent.sqlite3`: counters and the command record."""

    def __init__(self, path: Path, keep: int = 10_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.keep = keep
        self._lock = threading.Lock()
        self._db = open_or_quarantine(
            path, self._open, what="command record", side_files=SQLITE_SIDE_FILES,
            lost="lost: the ids of commands answered before (a command re-sent with an old id runs again) and "
                 "the birth/death counter")
        self._since_trim = 0
        self._bdseq = -1
        self._unwritten: dict[str, tuple[float, str | None]] = {}
        """Command ids (and replies) a full disk could not take, oldest first; written when it can."""
        self._full = Episode(f"command record {path}")

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            sqlite_check(db)
        except BaseException:
            db.close()
            raise
        return db

    def next_bdseq(self) -> int:
        """The next birth/death sequence number (one per connection attempt, increasing for good)."""
        with self._lock:
            try:
                # No RETURNING: Raspberry Pi OS bullseye ships SQLite 3.34. MAX: after a full disk the
                # numbers handed out from memory were never written.
                self._db.execute(
                    "INSERT INTO counters (name, value) VALUES ('bdseq', ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = MAX(value + 1, excluded.value)",
                    (self._bdseq + 1,),
                )
                row = self._db.execute("SELECT value FROM counters WHERE name = 'bdseq'").fetchone()
            except sqlite3.OperationalError as exc:
                if not disk_full(exc):
                    raise
                self._full.failed(exc, "the record is kept in memory")
                self._bdseq += 1
                return self._bdseq
            self._bdseq = int(row[0])
        return self._bdseq

    def claim_command(self, command_id: str) -> tuple[bool, str | None]:
        """(True, None) when the id is new (now recorded as running); else (False, its stored reply or None).

        On a full disk the claim is kept in memory (the newest `MEMORY_KEEP`) and written once the disk has
        room: the command still runs and is answered, and a repeat of its id is still recognised."""
        with self._lock:
            if command_id in self._unwritten:
                return False, self._unwritten[command_id][1]
            self._flush()
            row = self._db.execute("SELECT reply FROM commands WHERE id = ?", (command_id,)).fetchone()
            if row is not None:
                return False, row[0]
            try:
                self._db.execute("INSERT INTO commands (id, ts, reply) VALUES (?, ?, NULL)",
                                 (command_id, time.time()))
                self._since_trim += 1
                if self._since_trim >= 500:
                    self._since_trim = 0
                    self._db.execute(
                        "DELETE FROM commands WHERE id IN (SELECT id FROM commands ORDER BY ts DESC LIMIT -1 OFFSET ?)",
                        (self.keep,),
                    )
            except sqlite3.OperationalError as exc:
                if not disk_full(exc):
                    raise
                self._remember(command_id, None, exc)
        return True, None

    def record_reply(self, command_id: str, reply: str) -> None:
        with self._lock:
            if command_id in self._unwritten:
                self._unwritten[command_id] = (self._unwritten[command_id][0], reply)
                self._flush()
                return
            try:
                self._db.execute("UPDATE commands SET reply = ? WHERE id = ?", (reply, command_id))
            except sqlite3.OperationalError as exc:
                if not disk_full(exc):
                    raise
                self._remember(command_id, reply, exc)

    def _remember(self, command_id: str, reply: str | None, exc: sqlite3.Error) -> None:
        self._full.failed(exc, "command ids are recorded in memory")
        self._unwritten[command_id] = (time.time(), reply)
        while len(self._unwritten) > MEMORY_KEEP:
            self._unwritten.pop(next(iter(self._unwritten)))

    def _flush(self) -> None:
        """Write what a full disk kept in memory (under the lock)."""
        if not self._unwritten:
            return
        try:
            with write_transaction(self._db):
                self._db.executemany("INSERT OR REPLACE INTO commands (id, ts, reply) VALUES (?, ?, ?)",
                                     [(cid, ts, reply) for cid, (ts, reply) in self._unwritten.items()])
        except sqlite3.OperationalError as exc:
            if not disk_full(exc):
                raise
            return
        self._unwritten.clear()
        self._full.ok()

    def unanswered(self) -> list[str]:
        """Ids claimed and never answered: a previous process died while running them."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM commands WHERE reply IS NULL ORDER BY ts").fetchall()
        return [str(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
