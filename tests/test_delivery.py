"""Model delivery end to end through a real mosquitto: publish → manifest checks → download → store → activate."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import Broker
from delivery_kit import (
    FIXTURES,
    Keys,
    StateWatch,
    connect,
    new_keys,
    publish,
    service,
    store_files_are_whole,
    unique_prefix,
)

from agent.delivery.activation import PipelineHealth
from agent.delivery.download import DownloadSettings
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.selftest import Fit
from agent.delivery.service import DeliverySettings, DeployRequest, PipelineHooks
from agent.delivery.signed_manifest import DevicePolicy, check_manifest
from agent.delivery.signing import sign
from agent.delivery.store import ModelStore
from agent.fleet.publish import build, upload
from agent.mqtt.client import PahoLink
from agent.mqtt.topics import FleetTopics
from agent.runtime import Model

COLORS = FIXTURES / "colors_int8.json"
SHAPES = FIXTURES / "shapes_int8.json"


def test_publish_download_verify_store(link: PahoLink, topics: FleetTopics, keys: Keys, tmp_path: Path,
                                       backend: str) -> None:
    pub = publish(link, topics, COLORS, "colors", 1, keys, chunk_size=1000)
    watch = StateWatch(link, topics, "dev1")
    svc = service(link, tmp_path / "store", keys, topics, backend)
    final = svc.deploy(DeployRequest("colors", 1, request="r1"))
    assert final.state.value == "active", final
    store = svc.store
    active = store.active("colors")
    assert active is not None and active.version == 1
    data = (FIXTURES / "colors_int8.tflite").read_bytes()
    assert active.sha256 == hashlib.sha256(data).hexdigest() == pub.manifest["sha256"]
    assert store.path(active.sha256).read_bytes() == data
    assert store.manifest_bytes(active) == pub.raw
    assert not any(store.partial.iterdir())
    store_files_are_whole(store)
    # The states went out retained, in order, with the request id and progress to 1.
    last = watch.wait_for("active", 1)
    assert last["id"] == "r1" and last["progress"] == 1.0 and last["v"] == 1 and isinstance(last["ts"], float)
    seen = [s["state"] for s in watch.states]
    assert seen.index("downloading") < seen.index("verifying") < seen.index("active")
    progress = [s["progress"] for s in watch.states if s["state"] == "downloading"]
    assert progress == sorted(progress) and progress[-1] == 1.0
    # A late subscriber (the fleet's status) gets the final state retained.
    with connect(link.broker.port) as late:
        late_watch = StateWatch(late, topics, "dev1")
        assert late_watch.wait_for("active", 1)["model"] == "colors"


def test_newer_version_keeps_last_known_good(link: PahoLink, topics: FleetTopics, keys: Keys, tmp_path: Path,
                                             backend: str) -> None:
    publish(link, topics, COLORS, "colors", 1, keys)
    publish(link, topics, FIXTURES / "colors_float.json", "colors", 2, keys)
    publish(link, topics, COLORS, "colors", 3, keys)
    svc = service(link, tmp_path / "store", keys, topics, backend)
    for v in (1, 2, 3):
        assert svc.deploy(DeployRequest("colors", v)).state.value == "active"
    slot = svc.store.slot("colors")
    assert slot.active is not None and slot.active.version == 3
    assert slot.previous is not None and slot.previous.version == 2
    # v1 and v3 are the same bytes: one object; v2 kept as last known good; nothing else.
    names = sorted(p.name for p in svc.store.objects.glob("*.tflite"))
    assert names == sorted({f"{slot.active.sha256}.tflite", f"{slot.previous.sha256}.tflite"})
    # An explicit rollback goes back to the kept version, older or not.
    result = svc.rollback({"model": "colors"})
    assert result == {"model": "colors", "active": 2, "from": 3}
    with pytest.raises(DeliveryError) as exc:
        svc.rollback({"model": "colors", "version": 1})
    assert exc.value.reason is Reason.NOT_KEPT


def test_replayed_older_manifest_is_rejected_also_after_restart(link: PahoLink, topics: FleetTopics, keys: Keys,
                                                                tmp_path: Path, backend: str) -> None:
    publish(link, topics, COLORS, "colors", 1, keys)
    publish(link, topics, COLORS, "colors", 2, keys)
    svc = service(link, tmp_path / "store", keys, topics, backend)
    assert svc.deploy(DeployRequest("colors", 2)).state.value == "active"
    replay = svc.deploy(DeployRequest("colors", 1))
    assert (replay.state.value, replay.reason) == ("failed", Reason.NOT_NEWER)
    # A new agent process on the same state directory remembers.
    restarted = service(link, tmp_path / "store", keys, topics, backend)
    replay = restarted.deploy(DeployRequest("colors", 1))
    assert (replay.state.value, replay.reason) == ("failed", Reason.NOT_NEWER)
    assert restarted.store.active("colors").version == 2  # type: ignore[union-attr]


# -- the eight bad artifacts -----------------------------------------------------------


def _retain(link: PahoLink, topic: str, payload: bytes) -> None:
    link.publish_wait(topic, payload, qos=1, retain=True)


def _flip(data: bytes, at: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[at] ^= 1 << bit
    return bytes(b)


def _bad_payload_bit_flip(link: PahoLink, topics: FleetTopics, keys: Keys, other: Keys) -> None:
    pub = publish(link, topics, COLORS, "m", 2, keys, chunk_size=1024)
    chunk = (FIXTURES / "colors_int8.tflite").read_bytes()[1024:2048]
    _retain(link, topics.chunk("m", 2, 1), _flip(chunk, 100, 3))
    assert pub


def _bad_manifest_bit_flip(link: PahoLink, topics: FleetTopics, keys: Keys, other: Keys) -> None:
    pub = publish(link, topics, COLORS, "m", 2, keys)
    at = pub.raw.index(b'"sha256": "') + len(b'"sha256": "') + 5  # a hex digit, still valid JSON
    _retain(link, topics.manifest("m", 2), _flip(pub.raw, at, 0))


def _bad_untrusted_key(link: PahoLink, topics: FleetTopics, keys: Keys, other: Keys) -> None:
    publish(link, topics, COLORS, "m", 2, other)


def _bad_signature_of_another_manifest(link: PahoLink, topics: FleetTopics, keys: Keys, other: Keys) -> None:
    pub = publish(link, topics, COLORS, "m", 2, keys)
    another = build(SHAPES, name="m", version=2, key=keys.private, chunk_size=4096)
    forged = {**pub.manifest, "signature": another.manifest["signature"]}
    _retain(link, topics.manifest("m", 2), json.dumps(forged).encode())


def _bad_no_signature(link: PahoLink, topics: FleetTopics, keys: Keys, other: Keys) -> None:
    pub = publish(link, topics, COLORS, "m", 2, keys)
    unsigned = {k: v for k, v in pub.manifest.items() if k != "signature"}
    _retain(link, topics.manifest("m", 2), json.dumps(unsigned).encode())


def _bad_more_bytes_than_declared(link: PahoLink, topics: FleetTopics, keys: Keys, other: Keys) -> None:
    pub = publish(link, topics, COLORS, "m", 2, keys, chunk_size=1024)
    n = len(pub.manifest["delivery"]["chunks"])
    last = (FIXTURES / "colors_int8.tflite").read_bytes()[(n - 1) * 1024:]
    _retain(link, topics.chunk("m", 2, n - 1), last + b"\0" * 64)


def _bad_over_size_cap(link: PahoLink, topics: FleetTopics, keys: Keys, other: Keys) -> None:
    publish(link, topics, SHAPES, "m", 2, keys)  # 36560 bytes; the policy below caps at 20000


def _bad_wrong_runtime(link: PahoLink, topics: FleetTopics, keys: Keys, other: Keys) -> None:
    publish(link, topics, COLORS, "m", 2, keys, backends=("edgetpu-only",))


BAD_ARTIFACTS = {
    "payload_bit_flip": (_bad_payload_bit_flip, Reason.HASH_MISMATCH),
    "manifest_bit_flip": (_bad_manifest_bit_flip, Reason.BAD_SIGNATURE),
    "untrusted_key": (_bad_untrusted_key, Reason.UNTRUSTED_KEY),
    "signature_of_another_manifest": (_bad_signature_of_another_manifest, Reason.BAD_SIGNATURE),
    "no_signature": (_bad_no_signature, Reason.UNSIGNED),
    "more_bytes_than_declared": (_bad_more_bytes_than_declared, Reason.SIZE_MISMATCH),
    "over_size_cap": (_bad_over_size_cap, Reason.TOO_LARGE),
    "wrong_runtime": (_bad_wrong_runtime, Reason.INCOMPATIBLE),
}


@pytest.mark.parametrize("case", list(BAD_ARTIFACTS))
def test_bad_artifact_is_rejected_and_nothing_loaded(case: str, link: PahoLink, topics: FleetTopics, keys: Keys,
                                                     tmp_path: Path, backend: str) -> None:
    make, reason = BAD_ARTIFACTS[case]
    publish(link, topics, FIXTURES / "colors_float.json", "m", 1, keys)  # other bytes than every v2 below
    svc = service(link, tmp_path / "store", keys, topics, backend, max_model_bytes=20000)
    assert svc.deploy(DeployRequest("m", 1)).state.value == "active"
    before = sorted(p.name for p in svc.store.objects.iterdir())
    make(link, topics, keys, new_keys())
    watch = StateWatch(link, topics, "dev1")
    final = svc.deploy(DeployRequest("m", 2))
    assert (final.state.value, final.reason) == ("failed", reason), final
    assert watch.wait_for("failed", 2)["reason"] == reason.value
    assert svc.store.active("m").version == 1  # type: ignore[union-attr]
    assert sorted(p.name for p in svc.store.objects.iterdir()) == before
    store_files_are_whole(svc.store)
    assert not list(svc.store.partial.glob("*.part")) or reason in (Reason.HASH_MISMATCH, Reason.SIZE_MISMATCH)
    # Nothing downloaded when the manifest itself is refused.
    if reason not in (Reason.HASH_MISMATCH, Reason.SIZE_MISMATCH):
        assert not list(svc.store.partial.iterdir())


@pytest.mark.parametrize("raw", [
    b"\xff\xfe", b"[]", b"[" * 100_000 + b"]" * 100_000, b'{"a": NaN}', b'{"a": 1, "a": 2}', b"1" * 5000, b"{" * 10,
    b'{"x": ' + b"9" * 5000 + b"}", b" " * (2 << 20),
], ids=["not-utf8", "not-an-object", "deep", "nan", "duplicate-key", "huge-int", "unclosed", "huge-int-value",
        "too-large"])
def test_hostile_manifests_get_bad_manifest(keys: Keys, backend: str, raw: bytes) -> None:
    with pytest.raises(DeliveryError) as exc:
        check_manifest(raw, keys.trusted, DevicePolicy(backend=backend))
    assert exc.value.reason is Reason.BAD_MANIFEST


def test_expired_and_wrong_board_and_agent(keys: Keys, backend: str) -> None:
    pub = build(COLORS, name="m", version=1, key=keys.private, expires_in=60, now=1000.0)
    at = DevicePolicy(backend=backend, clock=lambda: 1100.0)
    with pytest.raises(DeliveryError) as exc:
        check_manifest(pub.raw, keys.trusted, at)
    assert exc.value.reason is Reason.EXPIRED
    assert check_manifest(pub.raw, keys.trusted, DevicePolicy(backend=backend, clock=lambda: 1059.0)).version == 1
    pub = build(COLORS, name="m", version=1, key=keys.private, boards=("pi-5",))
    with pytest.raises(DeliveryError) as exc:
        check_manifest(pub.raw, keys.trusted, DevicePolicy(backend=backend, board="pi-zero-2w"))
    assert exc.value.reason is Reason.INCOMPATIBLE
    unsigned = {k: v for k, v in pub.manifest.items() if k not in ("signature", "key_id")}
    newer_agent = sign({**unsigned, "runtime": {"min_agent": "99.0.0"}}, keys.private)
    with pytest.raises(DeliveryError) as exc:
        check_manifest(json.dumps(newer_agent).encode(), keys.trusted, DevicePolicy(backend=backend))
    assert exc.value.reason is Reason.INCOMPATIBLE


# -- self-test ------------------------------------------------------------------------------


def _hooks_like(model_path: Path, swapped: list[Any]) -> PipelineHooks:
    current = Model(model_path)

    def swap(prepared: Any) -> Any:
        swapped.append(prepared)
        return lambda: swapped.append("undo")

    return PipelineHooks(swap=swap, health=lambda: PipelineHealth(items=len(swapped)), fit=lambda: Fit.like(current))


@pytest.mark.parametrize(("model", "reason"), [
    ("shapes_int8.tflite", Reason.INPUT_SHAPE),
    ("invoke_fails.tflite", Reason.INVOKE_FAILED),
])
def test_signed_model_that_fails_the_self_test_is_rolled_back(model: str, reason: Reason, link: PahoLink,
                                                              topics: FleetTopics, keys: Keys, tmp_path: Path,
                                                              backend: str) -> None:
    publish(link, topics, COLORS, "colors", 1, keys)
    bad = tmp_path / "bad.json"
    manifest = json.loads(COLORS.read_text())
    manifest.update(file=model, sha256=None, size=None)
    bad.write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    (tmp_path / model).write_bytes((FIXTURES / model).read_bytes())
    publish(link, topics, bad, "colors", 2, keys)
    swapped: list[Any] = []
    svc = service(link, tmp_path / "store", keys, topics, backend)
    assert svc.deploy(DeployRequest("colors", 1)).state.value == "active"  # no pipeline yet: just stored
    svc.hooks = lambda name: _hooks_like(FIXTURES / "colors_int8.tflite", swapped)
    final = svc.deploy(DeployRequest("colors", 2))
    assert (final.state.value, final.reason) == ("rolled_back", reason), final
    assert final.active == 1
    assert swapped == []  # never swapped in: nothing was loaded into the pipeline
    slot = svc.store.slot("colors")
    assert slot.active is not None and slot.active.version == 1 and slot.trial is None


def test_deploy_service_queue_and_resume_pending(link: PahoLink, topics: FleetTopics, keys: Keys, tmp_path: Path,
                                                 backend: str) -> None:
    """A deploy command queued before a stop is resumed by the next start, from the persisted request."""
    stop = threading.Event()
    stop.set()  # the worker will not pick it up
    svc = service(link, tmp_path / "store", keys, topics, backend)
    svc.stop = stop
    reply = svc.submit_deploy({"model": "colors", "version": 1, "id": "c1"})
    assert reply == {"queued": True, "model": "colors", "version": 1, "deployment": "c1"}
    assert svc.store.pending()["c1"]["version"] == 1
    publish(link, topics, COLORS, "colors", 1, keys)
    watch = StateWatch(link, topics, "dev1")
    again = service(link, tmp_path / "store", keys, topics, backend).start()
    try:
        assert watch.wait_for("active", 1)["id"] == "c1"
    finally:
        again.stop.set()
        again.join(5)
    assert again.store.pending() == {}


# -- broker limits and reconnects --------------------------------------------------------


def test_works_under_a_broker_packet_size_limit(tmp_path: Path, keys: Keys, backend: str) -> None:
    from paho.mqtt.enums import MQTTProtocolVersion

    from agent.errors import BadInput
    from agent.fleet.publish import chunk_limit
    from agent.mqtt.client import BrokerAddress

    limit = 6000
    with Broker(tmp_path / "mosquitto", extra=f"max_packet_size {limit}") as small:
        topics = FleetTopics(unique_prefix())
        with PahoLink(BrokerAddress("127.0.0.1", small.port, False), protocol=MQTTProtocolVersion.MQTTv5) as op:
            assert op.max_packet_size == limit  # announced in CONNACK
            too_big = build(SHAPES, name="shapes", version=1, key=keys.private, chunk_size=16384)
            with pytest.raises(BadInput, match="--chunk-size"):
                upload(op, too_big, topics)
            fits = chunk_limit(op, topics, too_big)
            assert fits is not None and 1000 < fits < limit
            pub = build(SHAPES, name="shapes", version=1, key=keys.private, chunk_size=fits)
            upload(op, pub, topics)
            assert len(pub.manifest["delivery"]["chunks"]) > 5
        with connect(small.port) as device_link:
            svc = service(device_link, tmp_path / "store", keys, topics, backend)
            final = svc.deploy(DeployRequest("shapes", 1))
        assert final.state.value == "active", final
        assert svc.store.path(pub.manifest["sha256"]).read_bytes() == (FIXTURES / "shapes_int8.tflite").read_bytes()


def test_download_resumes_across_a_broker_restart(tmp_path: Path, keys: Keys, backend: str) -> None:
    """The broker goes away mid-download and comes back (retained messages persisted); the device carries on."""
    from agent.delivery import failpoints

    persist = tmp_path / "mosquitto"
    broker = Broker(persist, persistence=True).start()
    topics = FleetTopics(unique_prefix())
    try:
        with connect(broker.port) as op:
            pub = publish(op, topics, SHAPES, "shapes", 1, keys, chunk_size=2048)
        n_chunks = len(pub.manifest["delivery"]["chunks"])
        reached, release = threading.Event(), threading.Event()

        def hold_halfway(point: str, ctx: dict[str, Any]) -> None:
            if point == "part.write" and ctx["offset"] == (n_chunks // 2) * 2048 and not release.is_set():
                reached.set()
                release.wait(30)  # holds the link's thread, so the download is stuck exactly here

        link = connect(broker.port)
        quick = DeliverySettings(download=DownloadSettings(stall_timeout=2.0, max_stalls=10))
        svc = service(link, tmp_path / "store", keys, topics, backend, settings=quick)
        result: list[Any] = []
        failpoints.handler = hold_halfway
        worker = threading.Thread(target=lambda: result.append(svc.deploy(DeployRequest("shapes", 1))))
        worker.start()
        try:
            assert reached.wait(30)
            broker.stop()
            broker.start()
            release.set()
            worker.join(60)
        finally:
            release.set()
            failpoints.handler = None
            link.close()
        assert result and result[0].state.value == "active", result
        stats = result[0].extra["download"]
        assert stats["bytes_received"] == pub.manifest["size"]  # every chunk accepted once, none fetched twice
        assert link.connects >= 2
        assert svc.store.verify_object(pub.manifest["sha256"])
    finally:
        broker.stop()


def test_download_memory_is_bounded_by_the_window(link: PahoLink, topics: FleetTopics, keys: Keys, tmp_path: Path,
                                                  backend: str) -> None:
    """A 2 MiB model through a window of 4 chunks of 16 KiB: Python never holds more than a few chunks."""
    import tracemalloc

    from agent.delivery.download import Downloader

    blob = tmp_path / "blob.tflite"  # the payload path does not look inside the file
    blob.write_bytes(np.random.default_rng(1).integers(0, 256, 2 * 1024 * 1024, dtype=np.uint8).tobytes())
    pub = build(blob, name="blob", version=1, key=keys.private, chunk_size=16 * 1024, task="classify")
    upload(link, pub, topics)
    store = ModelStore(tmp_path / "store")
    d = Downloader(link, store, keys.trusted, DevicePolicy(backend=backend), topics=topics,
                   settings=DownloadSettings(window=4))
    stop = threading.Event()
    signed = d.fetch_manifest("blob", 1, stop)
    tracemalloc.start()
    try:
        stored, stats = d.download(signed, stop)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.chunks_received == 128 and store.verify_object(stored.sha256)
    assert peak < 512 * 1024, f"peak {peak} bytes of Python memory for a 2 MiB download"
