"""Issue 12, fault 4: pending deployments are keyed by deployment, bounded and de-duplicated, and a
deploy whose manifest never comes does not hold up the ones behind it. Through a real mosquitto,
with real signed models."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from delivery_kit import FIXTURES, Keys, StateWatch, publish, service

from agent.delivery.download import DownloadSettings
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.service import DeliverySettings
from agent.mqtt.client import PahoLink
from agent.mqtt.topics import FleetTopics

COLORS = FIXTURES / "colors_int8.json"


def _stopped() -> threading.Event:
    stop = threading.Event()
    stop.set()  # no worker runs: the deploys stay pending, as when the agent stops right after accepting
    return stop


def test_two_deploys_of_one_model_both_survive_a_restart(link: PahoLink, topics: FleetTopics, keys: Keys,
                                                         tmp_path: Path, backend: str) -> None:
    """The second deploy of a model neither overwrites the first nor is wiped by its clean-up."""
    first = service(link, tmp_path / "store", keys, topics, backend)
    first.stop = _stopped()
    first.submit_deploy({"model": "colors", "version": 1, "id": "d1"})
    first.submit_deploy({"model": "colors", "version": 2, "id": "d2"})
    assert sorted(first.store.pending()) == ["d1", "d2"]
    publish(link, topics, COLORS, "colors", 1, keys)
    publish(link, topics, COLORS, "colors", 2, keys)
    watch = StateWatch(link, topics, "dev1")
    again = service(link, tmp_path / "store", keys, topics, backend).start()
    try:
        assert watch.wait_for("active", 1)["id"] == "d1"
        assert watch.wait_for("active", 2)["id"] == "d2"
    finally:
        again.stop.set()
        again.join(5)
    assert again.store.active("colors").version == 2  # type: ignore[union-attr]
    assert again.store.pending() == {}


def test_a_repeated_deploy_joins_the_pending_one(link: PahoLink, topics: FleetTopics, keys: Keys, tmp_path: Path,
                                                 backend: str) -> None:
    svc = service(link, tmp_path / "store", keys, topics, backend)
    svc.stop = _stopped()
    assert "joined" not in svc.submit_deploy({"model": "colors", "version": 1, "id": "a"})
    reply = svc.submit_deploy({"model": "colors", "version": 1, "id": "b"})
    assert reply["joined"] is True and reply["deployment"] == "a"
    assert list(svc.store.pending()) == ["a"] and svc.store.pending()["a"]["ids"] == ["a", "b"]
    publish(link, topics, COLORS, "colors", 1, keys)
    watch = StateWatch(link, topics, "dev1")
    again = service(link, tmp_path / "store", keys, topics, backend).start()
    try:
        final = watch.wait_for("active", 1)
    finally:
        again.stop.set()
        again.join(5)
    assert final["id"] == "a" and final["ids"] == ["a", "b"]  # both commands' followers see it
    assert sum(1 for s in watch.states if s["state"] == "downloading" and s["progress"] == 0) == 1


def test_a_flood_of_unpublished_deploys_is_bounded_and_does_not_block_a_real_one(
        link: PahoLink, topics: FleetTopics, keys: Keys, tmp_path: Path, backend: str) -> None:
    # Manifests that never come are waited for this long: were they awaited one after another, the real deploy
    # behind them would wait hours; awaited together, it runs as soon as its own manifest is in.
    settings = DeliverySettings(download=DownloadSettings(manifest_timeout=3600), max_pending=9)
    publish(link, topics, COLORS, "colors", 1, keys)
    watch = StateWatch(link, topics, "dev1")
    svc = service(link, tmp_path / "store", keys, topics, backend, settings=settings).start()
    try:
        for i in range(8):
            svc.submit_deploy({"model": f"ghost{i}", "version": 1, "id": f"g{i}"})
        svc.submit_deploy({"model": "colors", "version": 1, "id": "real"})
        refused = []
        for i in range(8, 20):
            with pytest.raises(DeliveryError) as exc:
                svc.submit_deploy({"model": f"ghost{i}", "version": 1, "id": f"g{i}"})
            refused.append(exc.value.reason)
        assert refused == [Reason.QUEUE_FULL] * 12 and len(svc.store.pending()) <= 9
        assert watch.wait_for("active", 1)["id"] == "real"
        assert sorted(svc.store.pending()) == [f"g{i}" for i in range(8)]  # still waiting, side by side
        assert not any(s["state"] == "failed" for s in watch.states)
    finally:
        svc.stop.set()
        svc.join(5)
