"""The sample store: captured frames (JPEG) and clips (WAV) with their JSON sidecars, under a byte cap.

Layout: `<state_dir>/samples/<id>.<jpg|wav>` and `<id>.json`. The id sorts by capture time
(`<ms since epoch>-<pipeline>-<n>`), so the oldest sample is the first name. Each file is written to a
`.partial` temporary, fsync'd and renamed; the sidecar goes last and is what makes a sample exist: a
data file without its sidecar (a crash between the two renames) or a temporary is removed at open.
A reader therefore never sees half a sample, and a sample listed once stays whole until deleted.

The store holds `cap_bytes` at most: beyond it the oldest samples are deleted and counted in
`dropped`. It also keeps `reserve_bytes` free on the filesystem: a sample that would eat into that
is refused and counted in `refused`, so capture never fills the disk the agent needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.statefiles import fsync_dir

logger = logging.getLogger(__name__)

SAMPLE_ID = re.compile(r"^[0-9]{13}-[A-Za-z0-9_.-]{1,64}-[0-9]{1,9}$")
"""What a sample id looks like; anything else (a path, `..`) is refused by every lookup."""
DATA_SUFFIXES = (".jpg", ".wav")
RESERVE_BYTES = 64 * 1024 * 1024
"""Free space the store leaves on the filesystem."""


@dataclass
class StoreStats:
    stored: int = 0
    dropped: int = 0
    """Deleted to stay under the cap (the oldest first)."""
    refused: int = 0
    """Not written: the filesystem was short of space, or the write failed."""

    def as_dict(self) -> dict[str, int]:
        return {"stored": self.stored, "dropped": self.dropped, "refused": self.refused}


class SampleStore:
    """Captured samples on disk; thread-safe (the writer adds, commands list and delete)."""

    def __init__(self, folder: Path, cap_bytes: int, reserve_bytes: int = RESERVE_BYTES) -> None:
        self.folder = folder
        self.cap_bytes = cap_bytes
        self.reserve_bytes = reserve_bytes
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, tuple[str, int]] = OrderedDict()  # id → (data suffix, bytes of both files)
        self._bytes = 0
        folder.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        found: dict[str, tuple[str, int]] = {}
        for path in self.folder.iterdir():
            if path.name.endswith(".partial"):
                path.unlink(missing_ok=True)  # a write cut short: never visible as a sample
        for path in sorted(self.folder.glob("*.json")):
            sid = path.stem
            data = next((path.with_suffix(s) for s in DATA_SUFFIXES if path.with_suffix(s).exists()), None)
            if not SAMPLE_ID.match(sid) or data is None:
                continue
            found[sid] = (data.suffix, data.stat().st_size + path.stat().st_size)
        for path in self.folder.iterdir():
            if path.suffix in DATA_SUFFIXES and path.stem not in found:
                path.unlink(missing_ok=True)  # its sidecar was never renamed into place
        for sid in sorted(found):
            self._sizes[sid] = found[sid]
            self._bytes += found[sid][1]

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def add(self, sid: str, suffix: str, data: bytes, sidecar: dict[str, Any]) -> bool:
        """Store one sample (data file, then sidecar); False when refused (no space, write failed)."""
        if not SAMPLE_ID.match(sid) or suffix not in DATA_SUFFIXES:
            raise ValueError(f"bad sample id or kind: {sid!r} {suffix!r}")
        meta = json.dumps(sidecar, separators=(",", ":"), sort_keys=True).encode()
        size = len(data) + len(meta)
        if size > self.cap_bytes:
            self.stats.refused += 1
            return False
        with self._lock:
            while self._sizes and self._bytes + size > self.cap_bytes:
                self._delete_locked(next(iter(self._sizes)))
                self.stats.dropped += 1
        try:
            if shutil.disk_usage(self.folder).free - size < self.reserve_bytes:
                self.stats.refused += 1
                return False
            _write(self.folder / f"{sid}{suffix}", data)
            _write(self.folder / f"{sid}.json", meta)
            fsync_dir(self.folder)
        except OSError as exc:
            logger.warning("capture: cannot store sample %s (%s)", sid, exc.strerror or exc)
            with contextlib.suppress(OSError):
                (self.folder / f"{sid}{suffix}").unlink(missing_ok=True)
            self.stats.refused += 1
            return False
        with self._lock:
            self._sizes[sid] = (suffix, size)
            self._bytes += size
            self.stats.stored += 1
        return True

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._sizes)

    def sidecar(self, sid: str) -> dict[str, Any] | None:
        with self._lock:
            if sid not in self._sizes:
                return None
        try:
            meta: dict[str, Any] = json.loads((self.folder / f"{sid}.json").read_bytes())
        except (OSError, ValueError):
            return None
        return meta

    def data_path(self, sid: str) -> Path | None:
        with self._lock:
            entry = self._sizes.get(sid)
        return None if entry is None else self.folder / f"{sid}{entry[0]}"

    def delete(self, sids: list[str]) -> int:
        """Delete these samples (unknown ids are ignored); how many went."""
        n = 0
        with self._lock:
            for sid in sids:
                if sid in self._sizes:
                    self._delete_locked(sid)
                    n += 1
        return n

    def _delete_locked(self, sid: str) -> None:
        suffix, size = self._sizes.pop(sid)
        self._bytes -= size
        # The sidecar first: a crash in between leaves a data file the next open removes.
        (self.folder / f"{sid}.json").unlink(missing_ok=True)
        (self.folder / f"{sid}{suffix}").unlink(missing_ok=True)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
