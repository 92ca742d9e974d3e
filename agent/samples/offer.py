"""The device's half of a sample pull: model delivery's chunking in the other direction.

A model reaches a device as retained chunks the fleet published (docs/delivery.md); a sample
reaches the operator the same way: on `samples` `offer` the device publishes each named sample
as retained chunks `lepton/<dev>/samples/<id>/chunk/<i>` and then a retained manifest
`…/samples/<id>/manifest` (`{id, file, size, sha256, chunk_size, chunks: [sha256 per chunk],
sidecar}`), and the operator pulls them with the delivery downloader's session (a window of
subscriptions, each chunk and the whole file hash-checked, resumable from its partial file).
When the operator acknowledges (`delete`), the device deletes the sample and empties those
retained topics; nothing is left on the broker.

Where retained messages do not reach the operator (a RabbitMQ cluster keeps them on the node they
were published through), the operator asks on `…/samples/<id>/want` (`{manifest?, chunks}`, the
seeder's request of model delivery) and the device answers itself (`WantServer`): what was asked
is published again, not retained, on the very topics the operator subscribed to first, which a
live publish reaches on every node. Only samples on offer are served, at most `WANT_CHUNKS` a
request and `WANT_BYTES_PER_S` in all (a flood costs the device no more than that; what is not
served is asked for again by a stalled window).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

from agent.mqtt import wire
from agent.mqtt.topics import segment, unsegment
from agent.samples.sample_store import SampleStore

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
"""Bytes per chunk: the delivery protocol's default, well under any broker's packet limit."""
OFFER_MAX_BYTES = 16 * 1024 * 1024
"""Bytes offered and not yet acknowledged, at most: the daemon's link keeps what it published retained in
memory (to publish it again after a reconnect) until a delete empties it."""

WANT_LIMIT = 4096
"""Bytes of a want request at most (a window of chunk indices is a few dozen bytes)."""
WANT_CHUNKS = 64
"""Chunks one want request may ask for."""
WANT_BYTES_PER_S = 2 * 1024 * 1024
"""What want requests may make the device publish, at most, per second (a burst of as much again)."""

Publish = Callable[[str, bytes, bool], None]
"""(topic, payload, retain): the daemon link's queue, never blocking."""


def sample_topic(base: str, sid: str) -> str:
    """`lepton/<dev>/samples/<id>` (`base` is the device's topic base; an id holds its pipeline's name, so it
    goes through `segment` like every name in a topic)."""
    return f"{base}/samples/{segment(sid)}"


def offer(store: SampleStore, publish: Publish, base: str, ids: list[str],
          budget: int = OFFER_MAX_BYTES) -> dict[str, Any]:
    """Publish the named samples as retained chunks plus a manifest, up to `budget` bytes (the first always:
    a pull must be able to progress); unknown ids are listed in `missing`, the rest wait for the next offer."""
    offered: list[dict[str, Any]] = []
    missing: list[str] = []
    for sid in ids:
        path, meta = store.data_path(sid), store.sidecar(sid)
        if path is None or meta is None:
            missing.append(sid)
            continue
        try:
            data = path.read_bytes()
        except OSError:
            missing.append(sid)
            continue
        if offered and len(data) > budget:
            break  # the rest in the next offer: the operator asks again
        budget -= len(data)
        topic = sample_topic(base, sid)
        for i in range(_chunk_count(len(data))):
            publish(f"{topic}/chunk/{i}", _chunk(data, i), True)
        publish(f"{topic}/manifest", _manifest(sid, path, data, meta), True)
        offered.append({"id": sid, "topic": topic, "size": len(data)})
    return {"offered": offered, "missing": missing}


def _chunk_count(size: int) -> int:
    return max(1, math.ceil(size / CHUNK_BYTES))


def _chunk(data: bytes, index: int) -> bytes:
    return data[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES]


def _manifest(sid: str, path: Path, data: bytes, meta: dict[str, Any]) -> bytes:
    chunks = [hashlib.sha256(_chunk(data, i)).hexdigest() for i in range(_chunk_count(len(data)))]
    manifest = {"v": 1, "id": sid, "file": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "chunk_size": CHUNK_BYTES, "chunks": chunks, "sidecar": meta}
    return json.dumps(manifest, separators=(",", ":")).encode()


class WantServer:
    """Answers an operator's `want` for an offered sample's manifest and chunks, not retained (in the link's
    thread: a request reads one small file and queues at most `WANT_CHUNKS` publishes)."""

    def __init__(self, store: SampleStore, publish: Publish, base: str, offered: Container[str],
                 bytes_per_s: float = WANT_BYTES_PER_S) -> None:
        self.store, self.publish, self.base, self.offered = store, publish, base, offered
        self.rate = bytes_per_s
        self.served = 0
        """Manifests and chunks published again."""
        self.ignored = 0
        """Requests for no sample on offer, or not a valid request."""
        self.limited = 0
        """Requests cut short by the byte rate."""
        self._tokens = bytes_per_s
        self._t = time.monotonic()
        self._lock = threading.Lock()

    def on_want(self, topic: str, payload: bytes) -> None:
        sid = unsegment(topic.split("/")[-2])
        found = self._read(sid, payload)
        if found is None:
            with self._lock:
                self.ignored += 1
            return
        request, path, data, meta = found
        out = sample_topic(self.base, sid)
        wanted: list[tuple[str, bytes]] = []
        if request.get("manifest") is True:
            wanted.append((f"{out}/manifest", _manifest(sid, path, data, meta)))
        wanted.extend((f"{out}/chunk/{i}", _chunk(data, i)) for i in dict.fromkeys(request.get("chunks", [])))
        for t, body in wanted:
            if not self._take(len(body)):
                with self._lock:
                    self.limited += 1
                return
            self.publish(t, body, False)
            with self._lock:
                self.served += 1

    def _read(self, sid: str, payload: bytes) -> tuple[dict[str, Any], Path, bytes, dict[str, Any]] | None:
        """(request, file, its bytes, sidecar) of a valid request for a sample on offer; None otherwise."""
        if sid not in self.offered:
            return None
        try:
            request = wire.decode(payload, WANT_LIMIT, "request")
        except wire.WireError:
            return None
        path, meta = self.store.data_path(sid), self.store.sidecar(sid)
        if path is None or meta is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        chunks, n = request.get("chunks", []), _chunk_count(len(data))
        if not isinstance(chunks, list) or len(chunks) > WANT_CHUNKS or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in chunks):
            return None
        return request, path, data, meta

    def _take(self, size: int) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(2 * self.rate, self._tokens + (now - self._t) * self.rate)
            self._t = now
            if self._tokens < size:
                return False
            self._tokens -= size
            return True


def retract(store: SampleStore, publish: Publish, base: str, sid: str) -> None:
    """Empty the retained topics an offer of `sid` may have left (call before deleting the sample)."""
    path = store.data_path(sid)
    if path is None:
        return
    try:
        size = path.stat().st_size
    except OSError:
        return
    topic = sample_topic(base, sid)
    publish(f"{topic}/manifest", b"", True)
    for i in range(max(1, math.ceil(size / CHUNK_BYTES))):
        publish(f"{topic}/chunk/{i}", b"", True)
