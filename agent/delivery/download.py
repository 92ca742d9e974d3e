"""The device side of the pull protocol: fetch a signed manifest, then its retained chunks, into the store.

Every chunk of a published model is a retained message of its own topic
(`…/chunk/<i>`), so subscribing to a chunk topic is a request for that chunk that
the broker answers by itself: no server process answers devices, however many
pull at once. The downloader keeps a window of chunk subscriptions open; each
arriving chunk is length- and hash-checked against the signed manifest, written
at its offset in the partial file, unsubscribed, and the next missing chunk
subscribed. Memory stays at about one chunk (plus the window the broker has
in flight), whatever the model's size.

Progress needs no bookkeeping of its own: after a restart the partial file is
re-read and every chunk whose bytes hash to the manifest's value counts as
present, so a torn write or a lost page cache (power cut) costs only that chunk.
After a reconnect the link re-subscribes the window and the broker re-sends it; a
window that stays silent is re-subscribed, and after `max_stalls` such rounds the
download fails as `not_found`.

Where retained messages do not reach the device (RabbitMQ keeps them on the node they were published
through), a seeder answers instead (`lepton-fleet serve-models`, docs/delivery.md §1): a manifest not
there after `ask_after` seconds is asked for on `…/<name>/<version>/want`, and from then on every chunk
subscription of that download is followed by a request for it; a stalled window is always asked for.
The request goes out after the SUBSCRIBE on the same connection, so the broker routes the answer to it.
The whole-file sha256 is computed as the file
grows (chunks in order are hashed from memory; a gap is filled from disk once
its chunks are there) and checked before the file enters the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.delivery import failpoints
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.signed_manifest import DevicePolicy, SignedManifest, check_manifest
from agent.delivery.signing import TrustedKeys
from agent.delivery.store import ModelStore, PartFile, StoredModel
from agent.delivery.transport import Link
from agent.mqtt.topics import FleetTopics
from agent.version import Version

logger = logging.getLogger(__name__)

_WAIT_SLICE = 0.1
"""Longest uninterruptible wait: stop requests are noticed within this."""


@dataclass(frozen=True)
class DownloadSettings:
    window: int = 8
    """Chunk subscriptions open at once: bounds what is in flight (window x chunk size)."""
    manifest_timeout: float = 30.0
    """Seconds to wait for the retained manifest before `not_found`."""
    stall_timeout: float = 10.0
    """Seconds without a chunk before the open window is re-subscribed."""
    max_stalls: int = 6
    """Silent rounds in a row before `not_found`."""
    ask_after: float = 1.0
    """Seconds without the retained manifest before asking a seeder for it (and for every chunk after it)."""


@dataclass
class DownloadStats:
    """What one `download()` call did; the crash tests read it to prove the resume."""

    chunks_on_disk: int = 0
    """Chunks found complete and correct in the partial file when the download (re)started."""
    first_requested: int | None = None
    """Index of the first chunk subscribed to (None: nothing was missing)."""
    chunks_received: int = 0
    bytes_received: int = 0
    duplicates: int = 0
    resubscribes: int = 0


def _wait(event: threading.Event, stop: threading.Event, timeout: float) -> bool:
    """Wait for `event` up to `timeout`, returning early (False) when `stop` is set."""
    deadline = time.monotonic() + timeout
    while not event.is_set():
        if stop.is_set():
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        event.wait(min(_WAIT_SLICE, remaining))
    return True


class Downloader:
    """Pulls one model version at a time into a `ModelStore`; call from a worker thread, not the link's."""

    def __init__(
        self,
        link: Link,
        store: ModelStore,
        trusted: TrustedKeys,
        policy: DevicePolicy,
        *,
        topics: FleetTopics | None = None,
        settings: DownloadSettings | None = None,
    ) -> None:
        self.link = link
        self.store = store
        self.trusted = trusted
        self.policy = policy
        self.topics = topics or FleetTopics()
        self.settings = settings or DownloadSettings()
        self.asking: set[tuple[str, str]] = set()
        """(name, version) whose manifest came from a seeder: their chunks are asked for as they are subscribed."""

    # -- manifest ---------------------------------------------------------------

    def fetch_manifest(
        self,
        name: str,
        version: Version,
        stop: threading.Event,
        *,
        active: Version | None = None,
        rollback: bool = False,
    ) -> SignedManifest:
        """The retained manifest of name@version, after every check (`check_manifest`)."""
        topic = self.topics.manifest(name, version)
        arrived = threading.Event()
        payload: list[bytes] = []

        def on_manifest(_topic: str, data: bytes) -> None:
            if data and not arrived.is_set():
                payload.append(bytes(data))
                arrived.set()

        self.link.subscribe(topic, on_manifest)
        deadline = time.monotonic() + self.settings.manifest_timeout
        wait = min(self.settings.ask_after, self.settings.manifest_timeout)
        try:
            while not _wait(arrived, stop, wait):
                left = deadline - time.monotonic()
                if stop.is_set():
                    raise DeliveryError(Reason.STOPPED, "stopped while waiting for the manifest")
                if left <= 0:
                    raise DeliveryError(Reason.NOT_FOUND,
                                        f"no manifest on {topic} after {self.settings.manifest_timeout:g} s")
                # Not retained here: ask the seeder (again every stall_timeout: it may start later).
                self.ask_manifest(name, version)
                wait = min(left, self.settings.stall_timeout)
        finally:
            self.link.unsubscribe(topic)
        return check_manifest(payload[0], self.trusted, self.policy, active=active, rollback=rollback,
                              expect_name=name, expect_version=version)

    def ask_manifest(self, name: str, version: Version) -> None:
        """Ask a seeder for a manifest the broker did not have retained; the chunks of that version are then
        asked for as they are subscribed (the retained ones are not here either)."""
        self.asking.add((name, str(version)))
        self.want(name, version, {"manifest": True})

    def want(self, name: str, version: Version, request: dict[str, Any]) -> None:
        """Ask a seeder for the manifest or chunks of name@version (QoS 0: a lost request is asked again)."""
        body = json.dumps({**request, "ts": round(time.time(), 3), "v": 1}, separators=(",", ":")).encode()
        self.link.publish(self.topics.want(name, version), body, qos=0)

    # -- payload ----------------------------------------------------------------

    def download(
        self,
        signed: SignedManifest,
        stop: threading.Event,
        progress: Callable[[float], None] | None = None,
    ) -> tuple[StoredModel, DownloadStats]:
        """Bring the model of a checked manifest into the store (resuming); the stored entry and what it took."""
        if self.store.has_object(signed.sha256):
            if self.store.verify_object(signed.sha256):
                return self.store.adopt(signed), DownloadStats(chunks_on_disk=len(signed.chunks))
            logger.warning("%s: stored file is damaged; fetching it again", self.store.path(signed.sha256))
            self.store.path(signed.sha256).unlink()
        try:
            part = self.store.open_part(signed)
        except OSError as exc:
            raise DeliveryError(Reason.STORAGE, f"{self.store.root}: {exc.strerror or exc}") from None
        session = _Session(self, signed, part, stop, progress)
        try:
            session.run()
        except BaseException:
            part.close()
            raise
        failpoints.reach("after_verify", sha256=signed.sha256)
        return self.store.commit(signed, part), session.stats


class ChunkedFile(Protocol):
    """What a chunked pull needs to know of the file: a signed model manifest here, a captured sample's
    manifest in `agent.fleet.samples` (the same protocol in the other direction)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> Any: ...

    @property
    def sha256(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def chunks(self) -> tuple[str, ...]: ...

    def chunk_span(self, index: int) -> tuple[int, int]: ...


class ChunkTopics(Protocol):
    def chunk(self, name: str, version: Any, index: int) -> str: ...


class PartStore(Protocol):
    def discard_part(self, sha256: str) -> None: ...


class Puller(Protocol):
    """The side that pulls: its link, settings, chunk topics and where a failed partial file goes."""

    link: Link
    settings: DownloadSettings
    asking: set[tuple[str, str]]
    """(name, version) pulls that ask a seeder for their chunks (`want`)."""

    @property
    def topics(self) -> ChunkTopics: ...

    def want(self, name: str, version: Any, request: dict[str, Any]) -> None: ...

    @property
    def store(self) -> PartStore: ...


class _Session:
    """One download: the window of chunk subscriptions and the state the link thread updates."""

    def __init__(self, downloader: Puller, signed: ChunkedFile, part: PartFile, stop: threading.Event,
                 progress: Callable[[float], None] | None) -> None:
        self.d = downloader
        self.signed = signed
        self.part = part
        self.stop = stop
        self.progress = progress
        self.stats = DownloadStats()
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.error: DeliveryError | None = None
        n = len(signed.chunks)
        self.have = [False] * n
        self.done_bytes = 0
        self.digest = hashlib.sha256()
        self.hashed = 0
        """Chunks [0, hashed) are in `digest`."""
        self.open: dict[int, str] = {}
        """Chunk index → topic, for the subscriptions of the window."""
        self.cursor = 0
        """Next index to consider subscribing to."""
        self.asking = (signed.name, str(signed.version)) in downloader.asking

    # -- start ------------------------------------------------------------------

    def _scan(self) -> None:
        """Re-check what an earlier run left in the partial file: a chunk counts only if its hash matches."""
        size = self.part.size()
        for i, want in enumerate(self.signed.chunks):
            offset, length = self.signed.chunk_span(i)
            if offset + length > size:
                break
            data = self.part.read_at(offset, length)
            if len(data) == length and hashlib.sha256(data).hexdigest() == want:
                self.have[i] = True
                self.done_bytes += length
                if i == self.hashed:
                    self.digest.update(data)
                    self.hashed += 1
        self.stats.chunks_on_disk = sum(self.have)

    def run(self) -> None:
        self._scan()
        if self.stats.chunks_on_disk and self.progress:
            self.progress(self.done_bytes / self.signed.size)
        with self.lock:
            self._fill_window()
        stalls, last_seen = 0, self.stats.chunks_received
        try:
            while True:
                with self.lock:
                    if self.error is not None:
                        raise self.error
                    if all(self.have):
                        break
                    self.changed.clear()
                if not _wait(self.changed, self.stop, self.d.settings.stall_timeout):
                    if self.stop.is_set():
                        raise DeliveryError(Reason.STOPPED, "stopped; the download resumes at the next start")
                    if self.stats.chunks_received == last_seen:
                        stalls += 1
                        if stalls > self.d.settings.max_stalls:
                            missing = self.have.index(False)
                            raise DeliveryError(Reason.NOT_FOUND, f"chunk {missing} of {self.signed.name}@"
                                                f"{self.signed.version} did not arrive")
                        self._resubscribe()
                    else:
                        stalls = 0
                    last_seen = self.stats.chunks_received
                else:
                    stalls = 0
        finally:
            with self.lock:
                topics = list(self.open.values())
                self.open.clear()
            for topic in topics:
                self.d.link.unsubscribe(topic)
        self._finish_hash()

    def _fill_window(self) -> None:
        """Subscribe to missing chunks until the window is full (lock held)."""
        n = len(self.have)
        new: list[int] = []
        while len(self.open) < self.d.settings.window and self.cursor < n:
            i = self.cursor
            self.cursor += 1
            if self.have[i] or i in self.open:
                continue
            if self.stats.first_requested is None:
                self.stats.first_requested = i
            topic = self.d.topics.chunk(self.signed.name, self.signed.version, i)
            self.open[i] = topic
            self.d.link.subscribe(topic, self._make_handler(i))
            new.append(i)
        if self.asking and new:
            self.d.want(self.signed.name, self.signed.version, {"chunks": new})

    def _make_handler(self, index: int) -> Callable[[str, bytes], None]:
        def on_chunk(_topic: str, data: bytes) -> None:
            self._on_chunk(index, data)

        return on_chunk

    def _resubscribe(self) -> None:
        with self.lock:
            pending = list(self.open.items())
        logger.info("%s@%s: no chunk for %g s; asking again for %d chunks", self.signed.name,
                    self.signed.version, self.d.settings.stall_timeout, len(pending))
        self.stats.resubscribes += 1
        for i, topic in pending:
            # Subscribing again makes the broker send the retained message again.
            self.d.link.unsubscribe(topic)
            self.d.link.subscribe(topic, self._make_handler(i))
        if pending:
            # Retained chunks may not be on this broker node: a seeder answers if there is one.
            self.asking = True
            self.d.want(self.signed.name, self.signed.version, {"chunks": [i for i, _ in pending]})

    # -- the link thread ----------------------------------------------------------

    def _on_chunk(self, index: int, data: bytes) -> None:
        with self.lock:
            if self.error is not None or index not in self.open:
                self.stats.duplicates += 1
                return
            if not data:
                return  # an emptied retained topic (the publisher retired this version)
            try:
                self._accept(index, data)
            except DeliveryError as exc:
                self.error = exc
            except OSError as exc:
                self.error = DeliveryError(Reason.STORAGE, f"{self.part.path}: {exc.strerror or exc}")
            topic = self.open.pop(index)
            if self.error is None:
                self._fill_window()
                if self.progress is not None:
                    # Under the lock that `run` checks completion with: the last chunk's progress is reported
                    # before `run` can see every chunk in and report `verifying` (after it, a late `downloading`
                    # went out once the deployment had moved on).
                    self.progress(self.done_bytes / self.signed.size)
        self.d.link.unsubscribe(topic)
        self.changed.set()

    def _accept(self, index: int, data: bytes) -> None:
        offset, length = self.signed.chunk_span(index)
        if len(data) != length:
            more = "more" if len(data) > length else "fewer"
            raise DeliveryError(Reason.SIZE_MISMATCH,
                                f"chunk {index} has {len(data)} bytes, {more} than the {length} the manifest declares")
        if hashlib.sha256(data).hexdigest() != self.signed.chunks[index]:
            raise DeliveryError(Reason.HASH_MISMATCH, f"chunk {index} does not match its sha256 in the manifest")
        self.part.write_at(offset, data)
        self.have[index] = True
        self.done_bytes += length
        self.stats.chunks_received += 1
        self.stats.bytes_received += length
        if index == self.hashed:
            self.digest.update(data)
            self.hashed += 1
            self._hash_ahead()

    def _hash_ahead(self) -> None:
        """Fold chunks that arrived early into the running hash, reading them back from the file."""
        n = len(self.have)
        while self.hashed < n and self.have[self.hashed]:
            offset, length = self.signed.chunk_span(self.hashed)
            self.digest.update(self.part.read_at(offset, length))
            self.hashed += 1

    def _finish_hash(self) -> None:
        self._hash_ahead()
        if self.hashed != len(self.have) or self.digest.hexdigest() != self.signed.sha256:
            self.d.store.discard_part(self.signed.sha256)
            raise DeliveryError(Reason.HASH_MISMATCH, "the assembled file does not match the manifest's sha256")
        if self.part.size() != self.signed.size:
            raise DeliveryError(Reason.SIZE_MISMATCH,
                                f"the file has {self.part.size()} bytes, the manifest declares {self.signed.size}")


ChunkSession = _Session
"""One chunked pull into a `PartFile`, resumable, each chunk and the whole hash-checked (`run()`)."""
