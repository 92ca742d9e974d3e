"""`lepton-fleet serve-models`: the delivery path for brokers that do not share retained messages.

RabbitMQ keeps a retained message on the node it was published through, so a device on another node never
sees a model's manifest or chunks (docs/delivery.md §1). One seeder for the whole fleet, connected to any
node, serves what `publish --seed-dir DIR` left in DIR: devices that find no retained manifest ask on
`…/models/<name>/<version>/want`, and the seeder publishes what they asked for, not retained, on the very
topic they subscribe to. A live publish reaches every subscriber on every node, so each requested chunk goes
out once for all the devices waiting for it: requests that arrive while the seeder is busy are merged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt

from agent.errors import BadInput
from agent.mqtt import wire
from agent.mqtt.client import PahoLink
from agent.mqtt.topics import FleetTopics, unsegment
from agent.version import Version, parse_version

logger = logging.getLogger(__name__)

WANT_LIMIT = 64 * 1024
"""A request lists at most a window of chunk indices: a few hundred bytes."""
MANIFEST = -1

REPEAT_S = 1.0
"""A chunk asked for again within this long of its last publish waits for the rest of it: one publish then serves
every device that asked meanwhile. Without it each request that came after the last publish made another, and
every one went to every device subscribed: at 200 devices on RabbitMQ the cluster queued 140,000 copies of a
38-chunk model (each device ~700) and the deploy stalled."""
"""The index a request for the manifest is queued under."""
SUFFIX = ".manifest.json"


@dataclass(frozen=True)
class Served:
    """One published version the seeder holds: its signed manifest as published and the model file."""

    name: str
    version: Version
    raw: bytes
    path: Path
    chunk_size: int
    chunks: int
    size: int

    def chunk(self, index: int) -> bytes:
        with self.path.open("rb") as fh:
            fh.seek(index * self.chunk_size)
            return fh.read(self.chunk_size)


def seed_files(folder: Path, name: str, version: Version) -> tuple[Path, Path]:
    """Where `publish --seed-dir` keeps a version: (signed manifest, model file)."""
    stem = f"{name}@{version}"
    return folder / f"{stem}{SUFFIX}", folder / f"{stem}.model"


def save_seed(folder: Path, name: str, version: Version, raw: bytes, model: Path) -> None:
    """What `serve-models` needs of a published version, written beside the others in `folder`."""
    manifest_path, model_path = seed_files(folder, name, version)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        model_path.write_bytes(model.read_bytes())
        manifest_path.write_bytes(raw)
    except OSError as exc:
        raise BadInput(f"--seed-dir {folder}: cannot write ({exc.strerror or exc})") from None


def load_seeds(folder: Path) -> dict[tuple[str, str], Served]:
    """Every version in `folder`, its file checked against its manifest (the seeder never serves other bytes)."""
    if not folder.is_dir():
        raise BadInput(f"--dir {folder}: not a folder")
    served: dict[tuple[str, str], Served] = {}
    for manifest_path in sorted(folder.glob(f"*{SUFFIX}")):
        raw = manifest_path.read_bytes()
        try:
            m = wire.decode(raw, 4 * 1024 * 1024, "manifest")
            name, version = str(m["name"]), parse_version(str(m["version"]))
            chunk_size, chunks, size = int(m["delivery"]["chunk_size"]), len(m["delivery"]["chunks"]), int(m["size"])
            sha256 = str(m["sha256"])
        except (wire.WireError, KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"{manifest_path}: not a signed manifest ({exc})") from None
        model_path = seed_files(folder, name, version)[1]
        try:
            digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
        except OSError as exc:
            raise BadInput(f"{model_path}: cannot read ({exc.strerror or exc})") from None
        if digest != sha256:
            raise BadInput(f"{model_path}: does not match the sha256 of {manifest_path.name}")
        served[(name, str(version))] = Served(name, version, raw, model_path, chunk_size, chunks, size)
    if not served:
        raise BadInput(f"--dir {folder}: no *{SUFFIX} (write them with `publish --seed-dir`)")
    return served


@dataclass
class SeederStats:
    requests: int = 0
    """Requests read (one may ask for many chunks)."""
    asked: int = 0
    """Manifests and chunks asked for, over all requests."""
    published: int = 0
    """Manifests and chunks published: fewer than `asked` when devices wanted the same one at once."""
    bytes: int = 0
    ignored: int = 0
    """Requests that were not for a version held, or not well formed."""


class Seeder:
    """Answers `want` requests through one connection; `run()` publishes until `stop` is set."""

    def __init__(self, link: PahoLink, topics: FleetTopics, served: dict[tuple[str, str], Served],
                 window: int = 32, repeat_s: float = REPEAT_S) -> None:
        self.link, self.topics, self.served, self.window = link, topics, served, window
        self.repeat_s = repeat_s
        self.stats = SeederStats()
        self._pending: dict[tuple[tuple[str, str], int], None] = {}
        """(version key, chunk index or MANIFEST), in the order first asked; a repeat adds nothing."""
        self._sent: dict[tuple[tuple[str, str], int], float] = {}
        """When each was last published (monotonic)."""
        self._cond = threading.Condition()

    def subscribe(self) -> None:
        self.link.subscribe(self.topics.wants, self._on_want, qos=0)

    def _on_want(self, topic: str, payload: bytes) -> None:
        levels = topic.split("/")
        key = (unsegment(levels[-3]), unsegment(levels[-2]))
        served = self.served.get(key)
        try:
            request = wire.decode(payload, WANT_LIMIT, "request")
        except wire.WireError:
            request = None
        chunks = request.get("chunks", []) if request is not None else None
        if served is None or not isinstance(chunks, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < served.chunks for i in chunks):
            with self._cond:
                self.stats.ignored += 1
            return
        assert request is not None
        wanted = [MANIFEST] if request.get("manifest") is True else []
        with self._cond:
            self.stats.requests += 1
            self.stats.asked += len(wanted) + len(chunks)
            for index in [*wanted, *chunks]:
                self._pending[(key, index)] = None
            self._cond.notify_all()

    def _next_due(self) -> tuple[tuple[tuple[str, str], int] | None, float]:
        """The first pending one not published in the last `repeat_s`, else None and the seconds until one is."""
        now, wait = time.monotonic(), 0.5
        for item in self._pending:
            due = self._sent.get(item, -math.inf) + self.repeat_s
            if due <= now:
                return item, 0.0
            wait = min(wait, due - now)
        return None, wait

    def run(self, stop: threading.Event) -> None:
        in_flight: deque[mqtt.MQTTMessageInfo] = deque()
        while not stop.is_set():
            with self._cond:
                item, wait = self._next_due()
                if item is None:
                    self._cond.wait(wait)
                    continue
                key, index = item
                del self._pending[item]
                self._sent[item] = time.monotonic()
            served = self.served[key]
            if index == MANIFEST:
                topic, body = self.topics.manifest(served.name, served.version), served.raw
            else:
                topic, body = self.topics.chunk(served.name, served.version, index), served.chunk(index)
            in_flight.append(self.link.client.publish(topic, body, qos=1))
            self.stats.published += 1
            self.stats.bytes += len(body)
            while len(in_flight) > self.window and not stop.is_set():
                _acked_or_stopped(in_flight.popleft(), stop)


def _acked_or_stopped(info: mqtt.MQTTMessageInfo, stop: threading.Event, limit_s: float = 30.0) -> None:
    """Wait for the broker's PUBACK (the window's back-pressure), but never past `stop`: a seeder that is told to
    end owes nothing to publishes still in flight, and must not keep Ctrl-C waiting for them."""
    deadline = time.monotonic() + limit_s
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            info.wait_for_publish(0.5)
        except (RuntimeError, ValueError):
            return  # not sent (no connection, queue full): the device that wants it asks again
        if info.is_published():
            return


def serve(args: argparse.Namespace, out: TextIO, topics: FleetTopics) -> int:
    from agent.fleet.live import open_link

    served = load_seeds(args.dir)
    link = open_link(args, timeout=min(args.timeout, 30.0))
    stop = threading.Event()
    seeder = Seeder(link, topics, served)
    started = time.monotonic()
    try:
        seeder.subscribe()
        link.wait_subscribed(10.0)
        out.write(f"serving {len(served)} model version(s) on {link.broker} (Ctrl-C to stop)\n")
        out.flush()
        worker = threading.Thread(target=seeder.run, args=(stop,), name="seeder", daemon=True)
        worker.start()
        # Ctrl-C or SIGTERM (a service manager) is how a seeder is meant to end. Handlers set here, not Python's
        # default: a process started in the background by a non-interactive shell inherits SIGINT ignored.
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stop.wait(args.seconds)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        stop.set()
        worker.join(5.0)
    finally:
        link.close()
    report: dict[str, Any] = {**seeder.stats.__dict__, "seconds": round(time.monotonic() - started, 1)}
    out.write(json.dumps(report) + "\n")
    if seeder.stats.ignored:
        print(f"lepton-fleet: {seeder.stats.ignored} request(s) ignored (not held, or not well formed)",
              file=sys.stderr)
    return 0

