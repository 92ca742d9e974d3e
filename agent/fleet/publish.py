"""`lepton-fleet publish`: build and sign a delivery manifest, upload the model as retained chunks.

Chunks go first and the manifest last, each retained at QoS 1 and acknowledged by
the broker, so a device never sees a manifest whose chunks are not there yet. At
most `window` publishes are unacknowledged at a time: the publisher holds about
that many chunks in memory, never the whole model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.delivery.signed_manifest import NAME_RE
from agent.delivery.signing import sign
from agent.errors import BadInput, LeptonError
from agent.manifest import Manifest, load_spec
from agent.mqtt.client import PahoLink
from agent.mqtt.topics import FleetTopics
from agent.version import Version, version_key

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 64 * 1024
"""Small enough for every broker we know of (AWS IoT allows 128 KB), big enough to keep overhead low."""
_PACKET_OVERHEAD = 64
"""Fixed header, packet id and properties around a PUBLISH's topic and payload (generous)."""


@dataclass(frozen=True)
class Publication:
    manifest: dict[str, Any]
    raw: bytes
    """The manifest as published."""
    path: Path

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> Version:
        v = self.manifest["version"]
        assert isinstance(v, int | str)
        return v


def _base_manifest(model: Path) -> tuple[Path, dict[str, Any]]:
    """The model file and the manifest fields to carry over from MODEL (a .tflite or a manifest .json)."""
    spec = load_spec(model)
    if spec.manifest is not None:
        fields = spec.manifest.model_dump(mode="json", exclude_none=True,
                                          exclude={"signature", "key_id", "delivery", "sha256", "size"})
        fields["labels"] = list(spec.labels)
        return spec.path, fields
    if spec.micro is not None:
        return spec.path, {
            "task": "wakeword", "labels": list(spec.labels),
            "postprocess": {"decoder": "wakeword", "threshold": spec.postprocess.threshold,
                            "params": spec.micro.model_dump(mode="json", exclude_none=True)},
        }
    return spec.path, {}


def _recognised_task(path: Path) -> str:
    from agent.runtime import Model
    from agent.tasks import recognise

    return recognise(Model(path)).runnable_as


def build(
    model: Path,
    *,
    name: str,
    version: Version,
    key: Ed25519PrivateKey,
    chunk_size: int = DEFAULT_CHUNK,
    task: str | None = None,
    expires_in: float | None = None,
    backends: tuple[str, ...] = (),
    boards: tuple[str, ...] = (),
    now: float | None = None,
) -> Publication:
    """Hash the model chunk by chunk and sign the manifest that describes it."""
    if not NAME_RE.match(name):
        raise BadInput(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it becomes a topic level)")
    try:
        version_key(version)
    except ValueError as exc:
        raise BadInput(f"--version: {exc}") from None
    if chunk_size < 64:
        raise BadInput(f"--chunk-size {chunk_size}: at least 64 bytes")
    path, fields = _base_manifest(model)
    size = path.stat().st_size
    whole, chunks = hashlib.sha256(), []
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            whole.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
    if size == 0:
        raise BadInput(f"{path}: empty model file")
    published = time.time() if now is None else now
    runtime = dict(fields.get("runtime", {}))
    if backends:
        runtime["backends"] = list(backends)
    if boards:
        runtime["boards"] = list(boards)
    manifest: dict[str, Any] = {
        **fields,
        "name": name, "version": version,
        "task": task or fields.get("task") or _recognised_task(path),
        "file": path.name,
        "sha256": whole.hexdigest(), "size": size,
        "delivery": {"chunk_size": chunk_size, "chunks": chunks, "published": published,
                     **({"expires": published + expires_in} if expires_in is not None else {})},
    }
    if runtime:
        manifest["runtime"] = runtime
    try:
        Manifest.model_validate(manifest)
    except ValueError as exc:
        raise BadInput(f"{model}: cannot build a valid manifest ({' '.join(str(exc).split())[:200]})") from None
    signed = sign(manifest, key)
    return Publication(signed, json.dumps(signed, indent=1).encode(), path)


def chunk_limit(link: PahoLink, topics: FleetTopics, pub: Publication) -> int | None:
    """The largest chunk the connected broker accepts (MQTT 5 Maximum Packet Size), if it says."""
    if link.max_packet_size is None:
        return None
    topic = topics.chunk(pub.name, pub.version, len(pub.manifest["delivery"]["chunks"]))
    return link.max_packet_size - len(topic.encode()) - _PACKET_OVERHEAD


def upload(link: PahoLink, pub: Publication, topics: FleetTopics, window: int = 16, timeout: float = 60.0) -> int:
    """Publish every chunk then the manifest, retained, QoS 1; returns the bytes sent."""
    limit = chunk_limit(link, topics, pub)
    chunk_size = int(pub.manifest["delivery"]["chunk_size"])
    if limit is not None and chunk_size > limit:
        raise BadInput(f"--chunk-size {chunk_size}: the broker takes packets up to {link.max_packet_size} bytes; "
                       f"use --chunk-size {limit} or less")
    manifest_topic = topics.manifest(pub.name, pub.version)
    if link.max_packet_size is not None and (
            len(pub.raw) + len(manifest_topic) + _PACKET_OVERHEAD > link.max_packet_size):
        raise BadInput(f"the manifest ({len(pub.raw)} bytes) is over the broker's packet limit; "
                       f"use a larger --chunk-size")
    failures: list[str] = []

    def on_publish(client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if reason is not None and getattr(reason, "is_failure", False):
            failures.append(str(reason))

    link.client.on_publish = on_publish
    in_flight: deque[mqtt.MQTTMessageInfo] = deque()
    sent = 0

    def drain(keep: int) -> None:
        while len(in_flight) > keep:
            info = in_flight.popleft()
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise LeptonError(f"broker {link.broker}: a chunk was not acknowledged in {timeout:g} s")

    with pub.path.open("rb") as fh:
        for i in range(math.ceil(pub.manifest["size"] / chunk_size)):
            block = fh.read(chunk_size)
            in_flight.append(link.client.publish(topics.chunk(pub.name, pub.version, i), block, qos=1, retain=True))
            sent += len(block)
            drain(window)
    drain(0)
    link.publish_wait(manifest_topic, pub.raw, qos=1, retain=True, timeout=timeout)
    if failures:
        raise LeptonError(f"broker {link.broker} refused {len(failures)} publish(es): {failures[0]}")
    return sent + len(pub.raw)


def retire(link: PahoLink, name: str, version: Version, chunks: int, topics: FleetTopics,
           timeout: float = 60.0) -> None:
    """Remove a published version from the broker (empty retained messages), manifest first."""
    link.publish_wait(topics.manifest(name, version), b"", qos=1, retain=True, timeout=timeout)
    for i in range(chunks):
        link.publish_wait(topics.chunk(name, version, i), b"", qos=1, retain=True, timeout=timeout)
