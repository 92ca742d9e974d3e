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
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._since_trim = 0

    def next_bdseq(self) -> int:
        """The next birth/death sequence number (one per connection attempt, increasing for good)."""
        with self._lock:
            # No RETURNING: Raspberry Pi OS bullseye ships SQLite 3.34.
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('bdseq', 0) "
                "ON CONFLICT(name) DO UPDATE SET value = value + 1"
            )
            row = self._db.execute("SELECT value FROM counters WHERE name = 'bdseq'").fetchone()
        return int(row[0])

    def claim_command(self, command_id: str) -> tuple[bool, str | None]:
        """(True, None) when the id is new (now recorded as running); else (False, its stored reply or None)."""
        with self._lock:
            row = self._db.execute("SELECT reply FROM commands WHERE id = ?", (command_id,)).fetchone()
            if row is not None:
                return False, row[0]
            self._db.execute("INSERT INTO commands (id, ts, reply) VALUES (?, ?, NULL)", (command_id, time.time()))
            self._since_trim += 1
            if self._since_trim >= 500:
                self._since_trim = 0
                self._db.execute(
                    "DELETE FROM commands WHERE id IN (SELECT id FROM commands ORDER BY ts DESC LIMIT -1 OFFSET ?)",
                    (self.keep,),
                )
        return True, None

    def record_reply(self, command_id: str, reply: str) -> None:
        with self._lock:
            self._db.execute("UPDATE commands SET reply = ? WHERE id = ?", (reply, command_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()
