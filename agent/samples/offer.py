"""The device's half of a sample pull: model delivery's chunking in the other direction.

A model reaches a device as retained chunks the fleet published (docs/delivery.md); a sample
reaches the operator the same way: on `samples` `offer` the device publishes each named sample
as retained chunks `lepton/<dev>/samples/<id>/chunk/<i>` and then a retained manifest
`…/samples/<id>/manifest` (`{id, file, size, sha256, chunk_size, chunks: [sha256 per chunk],
sidecar}`), and the operator pulls them with the delivery downloader's session (a window of
subscriptions, each chunk and the whole file hash-checked, resumable from its partial file).
When the operator acknowledges (`delete`), the device deletes the sample and empties those
retained topics; nothing is left on the broker.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from agent.mqtt.topics import segment
from agent.samples.sample_store import SampleStore

CHUNK_BYTES = 64 * 1024
"""Bytes per chunk: the delivery protocol's default, well under any broker's packet limit."""
OFFER_MAX_BYTES = 16 * 1024 * 1024
"""Bytes offered and not yet acknowledged, at most: the daemon's link keeps what it published retained in
memory (to publish it again after a reconnect) until a delete empties it."""

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
        chunks = []
        for i in range(0, max(1, math.ceil(len(data) / CHUNK_BYTES))):
            block = data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]
            chunks.append(hashlib.sha256(block).hexdigest())
            publish(f"{topic}/chunk/{i}", block, True)
        manifest = {"v": 1, "id": sid, "file": path.name, "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "chunk_size": CHUNK_BYTES, "chunks": chunks,
                    "sidecar": meta}
        publish(f"{topic}/manifest", json.dumps(manifest, separators=(",", ":")).encode(), True)
        offered.append({"id": sid, "topic": topic, "size": len(data)})
    return {"offered": offered, "missing": missing}


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
