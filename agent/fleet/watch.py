"""Following devices' retained deploy states and replies: what `deploy`, `rollback` and `status` show."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from agent.delivery.deploy_state import TERMINAL
from agent.mqtt.client import PahoLink
from agent.mqtt.topics import FleetTopics

logger = logging.getLogger(__name__)

_TERMINAL = {s.value for s in TERMINAL}

STALE_GRACE_S = 5.0
"""Clock skew and a slow link: a status is stale once older than 2 heartbeats plus this."""


def is_stale(status: dict[str, Any], now: float | None = None) -> bool:
    """An `online` status whose heartbeat stopped: its device (or its broker node) is gone without a will.
    A status without `heartbeat_s` (an older agent) is never called stale."""
    heartbeat, ts = status.get("heartbeat_s"), status.get("ts")
    if status.get("state") != "online" or not isinstance(heartbeat, int | float) or not isinstance(ts, int | float):
        return False
    return (now if now is not None else time.time()) - ts > 2 * heartbeat + STALE_GRACE_S


@dataclass
class DeviceView:
    device: str
    state: dict[str, Any] | None = None
    """The latest deploy state (of our request, when following one)."""
    reply: dict[str, Any] | None = None
    online: bool | None = None
    first_seen: float = field(default_factory=time.monotonic)
    status: dict[str, Any] | None = None
    """The latest status (birth, heartbeat or will) heard."""
    birth: dict[str, Any] | None = None
    """The latest `online` status: groups, class, pipelines and models stay known after the will (which has none)."""
    telemetry: dict[str, Any] | None = None
    """The latest telemetry payload (views made with `telemetry=True` only)."""

    @property
    def last_seen(self) -> float | None:
        """Unix time of the newest status or telemetry payload from the device itself (not its will)."""
        times = [m.get("ts") for m in (self.birth, self.telemetry) if m is not None]
        numbers = [float(t) for t in times if isinstance(t, int | float) and not isinstance(t, bool)]
        return max(numbers, default=None)

    @property
    def stale(self) -> bool:
        return self.status is not None and is_stale(self.status)

    @property
    def presence(self) -> str:
        """yes, no, stale (online, heartbeat stopped) or ? (no status heard)."""
        if self.online is None:
            return "?"
        return "stale" if self.stale else "yes" if self.online else "no"

    @property
    def waiting_for_model(self) -> dict[str, str]:
        """Pipeline → the delivered model name it waits for (`waiting_for_model`), as the online status says."""
        pipelines = (self.status or {}).get("pipelines") if self.online else None
        return {p["name"]: p["delivered"] for p in pipelines or [] if isinstance(p, dict)
                and p.get("state") == "waiting_for_model" and isinstance(p.get("delivered"), str)
                and isinstance(p.get("name"), str)}

    @property
    def done(self) -> bool:
        if self.reply is not None and not self.reply.get("ok", False):
            return True  # the command itself was refused
        return self.state is not None and self.state.get("state") in _TERMINAL

    @property
    def succeeded(self) -> bool:
        """Active, or rolled back on request (an explicit rollback has no reason)."""
        if self.state is None:
            return False
        return self.state.get("state") == "active" or (
            self.state.get("state") == "rolled_back" and self.state.get("reason") is None)


def json_object(payload: bytes) -> dict[str, Any] | None:
    """A device's JSON object payload, or None for anything else (the fleet side skips what it cannot read)."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _device_of(topic: str, topics: FleetTopics) -> str | None:
    parts = topic[len(topics.prefix) + 1:].split("/")
    return topics.device_of(topic) if len(parts) == 2 else None


class FleetView:
    """Devices' deploy states, replies and online status, as they arrive."""

    def __init__(self, link: PahoLink, topics: FleetTopics, request: str | None = None,
                 model: str | None = None, telemetry: bool = False) -> None:
        self.link, self.topics, self.request, self.model = link, topics, request, model
        self.devices: dict[str, DeviceView] = {}
        self.cond = threading.Condition()
        every = topics.device("+")
        link.subscribe(every.deploy, self._on_deploy)
        link.subscribe(every.reply, self._on_reply)
        link.subscribe(every.status, self._on_status)
        if telemetry:  # opt-in: a deploy or a status table has no use for a payload per device every 15-60 s
            link.subscribe(every.telemetry, self._on_telemetry)

    def _view(self, device: str) -> DeviceView:
        if device not in self.devices:
            self.devices[device] = DeviceView(device)
        return self.devices[device]

    def _on_deploy(self, topic: str, payload: bytes) -> None:
        device, data = _device_of(topic, self.topics), json_object(payload)
        if device is None or data is None:
            return
        ids = data["ids"] if isinstance(data.get("ids"), list) else []
        if self.request is not None and data.get("id") != self.request and self.request not in ids:
            return  # a retained state of an earlier deployment (`ids`: deploys joined into one deployment)
        if self.model is not None and data.get("model") != self.model:
            return
        with self.cond:
            self._view(device).state = data
            self.cond.notify_all()

    def _on_reply(self, topic: str, payload: bytes) -> None:
        device, data = _device_of(topic, self.topics), json_object(payload)
        if device is None or data is None or self.request is None or data.get("id") != self.request:
            return
        with self.cond:
            self._view(device).reply = data
            self.cond.notify_all()

    def _on_status(self, topic: str, payload: bytes) -> None:
        device, data = _device_of(topic, self.topics), json_object(payload)
        if device is None or data is None:
            return
        with self.cond:
            if self.request is None or device in self.devices:
                view = self._view(device)
                view.online, view.status = data.get("state") == "online", data
                if view.online:
                    view.birth = data
            self.cond.notify_all()

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        device, data = _device_of(topic, self.topics), json_object(payload)
        if device is None or data is None:
            return
        with self.cond:
            if self.request is None or device in self.devices:
                self._view(device).telemetry = data
            self.cond.notify_all()

    def sync(self, timeout: float = 10.0) -> bool:
        """Wait until the retained messages of our subscriptions are in: our own message comes back after them."""
        marker = self.topics.sync(uuid.uuid4().hex)
        back = threading.Event()
        self.link.subscribe(marker, lambda t, p: back.set(), qos=1)
        self.link.publish(marker, b"{}", qos=1)
        ok = back.wait(timeout)
        self.link.unsubscribe(marker)
        return ok

    def ask_presence(self) -> None:
        """Every device publishes its status and deploy states again: live messages reach wildcard subscriptions
        on every broker, where retained ones may not (RabbitMQ sends them only to exact topic filters)."""
        self.link.publish(self.topics.device("all").presence, b'{"v": 1}', qos=1)

    def snapshot(self) -> list[DeviceView]:
        """The devices seen; for one model only those with a state of it, or a pipeline waiting for it."""
        with self.cond:
            return [dataclasses.replace(d) for d in sorted(self.devices.values(), key=lambda v: v.device)
                    if self.model is None or d.state is not None or self.model in d.waiting_for_model.values()]

    def wait(self, expected: set[str] | None, settle_s: float, deadline: float, stop: threading.Event,
             tick: float = 0.2) -> bool:
        """Until every expected (or every seen, after `settle_s` with no new device) device is done."""
        while not stop.is_set():
            with self.cond:
                seen = set(self.devices)
                done = all(v.done for v in self.devices.values())
                newest = max((v.first_seen for v in self.devices.values()), default=None)
                now = time.monotonic()
                if expected is not None:
                    if expected <= seen and all(self.devices[d].done for d in expected):
                        return True
                elif seen and done and newest is not None and now - newest >= settle_s:
                    return True
                if now >= deadline:
                    return False
                self.cond.wait(min(tick, deadline - now))
        return False
