"""The agent's own state files: one found corrupt at start is moved aside; a full disk is survived.

Corrupt at start: the file is moved aside, said in one line, and the agent starts afresh.

The agent's state files (the result spool, the command record, the model store's index) are
written only by the agent, so a file that does not read back was damaged from outside (a
failing SD card, a power cut on a filesystem without barriers, a hand edit). Refusing to
start would take the device off the fleet for good, so the file is renamed to
`<name>.corrupt-<YYYYmmddTHHMMSS>` (kept for a post-mortem, never read again) and a new one is
made. The warning says which file, where it went, and what its loss costs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger("agent.state")

T = TypeVar("T")

SQLITE_SIDE_FILES = ("-wal", "-shm")
"""A WAL left beside a replaced database would be replayed into the new one: it goes with it."""


class Corrupt(Exception):
    """A state file that does not read back as what the agent wrote."""


def move_aside(path: Path, side_files: tuple[str, ...] = ()) -> Path:
    """Rename `path` (and `path + suffix` for each side file) to `<name>.corrupt-<ts>`; the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    path.replace(target)
    for suffix in side_files:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(target.with_name(path.name + suffix + target.name[len(path.name):]))
    return target


def open_or_quarantine(path: Path, opener: Callable[[], T], *, what: str, lost: str,
                       side_files: tuple[str, ...] = ()) -> T:
    """`opener()`; if it finds the file corrupt (`Corrupt`, or SQLite's DatabaseError), move the file aside,
    log one warning line, and open a new one. A second failure is not corruption: it propagates."""
    try:
        return opener()
    except (Corrupt, sqlite3.DatabaseError) as exc:
        if isinstance(exc, sqlite3.OperationalError) and not _means_corrupt(exc):
            raise  # locked, read-only, disk full, cannot open: not the file's fault
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
    moved = move_aside(path, side_files)
    logger.warning("%s %s is corrupt (%s): moved it to %s and started a new one; %s", what, path, why,
                   moved.name, lost)
    return opener()


def _means_corrupt(exc: sqlite3.OperationalError) -> bool:
    # OperationalError also covers "database is locked", "unable to open", "disk I/O error"; only these
    # messages say the file's content is not a database the agent wrote.
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text


def disk_full(exc: sqlite3.Error) -> bool:
    """SQLite could not write: the disk (or the filesystem's quota) is full, or the write failed (I/O)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)
    text = str(exc).lower()
    return "full" in text or "i/o" in text


class Episode:
    """Says once when a state file stops being writable and once when it is again, not at every failure."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0

    def failed(self, exc: BaseException, cost: str) -> None:
        self.failures += 1
        if self.failures == 1:
            logger.error("%s: cannot write (%s); %s until the disk has room again", self.what,
                         " ".join(str(exc).split())[:120], cost)

    def ok(self) -> None:
        if self.failures:
            logger.warning("%s: writable again after %d failed writes", self.what, self.failures)
            self.failures = 0


def sqlite_check(db: sqlite3.Connection) -> None:
    """Raise Corrupt unless SQLite's `quick_check` finds the file consistent (O(size), done once at open)."""
    rows = db.execute("PRAGMA quick_check").fetchall()
    if [r[0] for r in rows] != ["ok"]:
        raise Corrupt("; ".join(str(r[0]) for r in rows[:3]))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable: fsync the directory itself."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction taken at once (BEGIN IMMEDIATE): committed whole, or rolled back when anything in it
    raises (SQLite may have rolled back already, e.g. on SQLITE_FULL)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
