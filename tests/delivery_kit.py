"""Helpers for the delivery tests: keys, publishing through a real broker, a device wired to commands; and
their fixtures (tests/conftest.py loads this module as a plugin): `delivery_broker`, a mosquitto per test
module; `link`, a client of it per test; `topics`, a topic tree of the test's own; `keys`, per module."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from broker import Broker
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.delivery.deploy_state import TERMINAL, State
from agent.delivery.service import DeliveryService, DeliverySettings
from agent.delivery.signed_manifest import DevicePolicy
from agent.delivery.signing import TrustedKeys, key_id, public_text
from agent.delivery.store import ModelStore
from agent.errors import LeptonError
from agent.fleet.publish import Publication, build, upload
from agent.mqtt.client import BrokerAddress, PahoLink
from agent.mqtt.topics import FleetTopics
from agent.version import Version

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


@dataclass
class Keys:
    private: Ed25519PrivateKey

    @property
    def kid(self) -> str:
        return key_id(self.private.public_key())

    @property
    def table(self) -> dict[str, str]:
        return {self.kid: public_text(self.private.public_key())}

    @property
    def trusted(self) -> TrustedKeys:
        return TrustedKeys.from_config(self.table)


def new_keys() -> Keys:
    return Keys(Ed25519PrivateKey.generate())


def connect(port: int, client_id: str | None = None) -> PahoLink:
    return PahoLink(BrokerAddress("127.0.0.1", port, False), client_id=client_id).start()


def unique_prefix() -> str:
    """Each test gets its own topic tree on the shared broker, so retained messages never leak across."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def delivery_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A mosquitto of the test module's own (the session's `broker` is shared with the daemon tests)."""
    with Broker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture
def link(delivery_broker: Broker) -> Iterator[PahoLink]:
    with connect(delivery_broker.port) as lk:
        yield lk


@pytest.fixture
def topics() -> FleetTopics:
    return FleetTopics(unique_prefix())


@pytest.fixture(scope="module")
def keys() -> Keys:
    return new_keys()


def publish(link: PahoLink, topics: FleetTopics, model: Path, name: str, version: Version, keys: Keys,
            chunk_size: int = 4096, **kw: Any) -> Publication:
    pub = build(model, name=name, version=version, key=keys.private, chunk_size=chunk_size, **kw)
    upload(link, pub, topics)
    return pub


def policy(backend: str, **kw: Any) -> DevicePolicy:
    return DevicePolicy(backend=backend, board="generic-x86_64", **kw)


def service(link: PahoLink, store_dir: Path, keys: Keys, topics: FleetTopics, backend: str, device: str = "dev1",
            settings: DeliverySettings | None = None, hooks: Any = None, **policy_kw: Any) -> DeliveryService:
    return DeliveryService(link, ModelStore(store_dir), keys.trusted, policy(backend, **policy_kw), device_id=device,
                           topics=topics, settings=settings or DeliverySettings(),
                           hooks=hooks or (lambda name: None))


class StateWatch:
    """Collects the retained deploy states of one device as they arrive on the broker."""

    def __init__(self, link: PahoLink, topics: FleetTopics, device: str) -> None:
        self.states: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        link.subscribe(topics.deploy(device), self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.states.append(json.loads(payload))
            self._cond.notify_all()

    def wait_for(self, state: str, version: Version, timeout: float = 60.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for s in reversed(self.states):
                if s["state"] == state and s["version"] == version:
                    return s
            return None

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {state} for {version} in {timeout} s: {self.states[-5:]}")
            hit = found()
            assert hit is not None
            return hit

    def wait_terminal(self, version: Version, timeout: float = 60.0) -> dict[str, Any]:
        terminal = {s.value for s in TERMINAL}

        def found() -> dict[str, Any] | None:
            for s in reversed(self.states):
                if s["state"] in terminal and s["version"] == version:
                    return s
            return None

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no final state for {version} in {timeout} s: {self.states[-5:]}")
            hit = found()
            assert hit is not None
            return hit


class CommandDevice:
    """Stands in for the daemon's command handling: cmd topics → DeliveryService.handle → reply."""

    def __init__(self, link: PahoLink, svc: DeliveryService, topics: FleetTopics, device: str,
                 groups: tuple[str, ...] = ()) -> None:
        self.link, self.svc, self.topics, self.device = link, svc, topics, device
        for target in (device, "all", *(f"group:{g}" for g in groups)):
            link.subscribe(topics.cmd(target), self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        cmd = json.loads(payload)
        reply: dict[str, Any] = {"id": cmd.get("id"), "v": 1}
        try:
            reply.update(ok=True, result=self.svc.handle(cmd["action"], cmd))
        except LeptonError as exc:
            reply.update(ok=False, error={"code": getattr(getattr(exc, "reason", None), "value", "bad_request"),
                                          "message": str(exc)})
        self.link.publish(self.topics.reply(self.device), json.dumps(reply).encode())


def store_files_are_whole(store: ModelStore) -> None:
    """Every file in objects/ hashes to its name: no partial or foreign file ever entered the store."""
    import hashlib

    for path in store.objects.iterdir():
        assert not path.name.startswith("."), path
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.name.split(".", 1)[0] == digest, path


def terminal(state: str) -> bool:
    return state in {s.value for s in TERMINAL}


__all__ = ["FIXTURES", "State"]
