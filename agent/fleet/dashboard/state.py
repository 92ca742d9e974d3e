"""The dashboard's picture of the fleet, fed by its one MQTT connection (paho's network thread) and read by the
web server (asyncio): `FleetView`'s status, deploy states and stale detection, plus what only the page needs —
telemetry history, the latest results, the models published, command replies and the dashboard's own requests.

Writers mark a device dirty; the server's push loop takes the dirty set a few times a second and sends only
those rows (`take_dirty`), so a thousand devices sending telemetry cost the browser one batch per tick.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from agent.fleet.watch import FleetView, is_stale, json_object
from agent.mqtt.client import PahoLink
from agent.mqtt.topics import FleetTopics, unsegment

HISTORY_S = 15 * 60.0
"""How much telemetry the device view's charts keep per device (the points are small: a few numbers each)."""
HISTORY_POINTS = 900
RESULTS_KEPT = 10
DEPLOYS_KEPT = 30
REPLIES_KEPT = 200
_DEPLOYING = {"queued", "downloading", "verifying", "activating", "shadow"}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass
class DeviceExtra:
    """What the dashboard keeps of a device beyond FleetView's `DeviceView`."""

    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    results: dict[str, deque[dict[str, Any]]] = field(default_factory=dict)
    """pipeline → its latest results: a chatty pipeline never pushes a quiet one's last result out."""
    deploys: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=DEPLOYS_KEPT))
    deploy: dict[str, dict[str, Any]] = field(default_factory=dict)
    """model name → its latest deploy state (a device may hold states of several models)."""
    last_heard: float | None = None

    def latest(self, since: float = 0.0) -> list[dict[str, Any]]:
        found = [r for kept in self.results.values() for r in kept if (_num(r.get("ts")) or 0.0) > since]
        return sorted(found, key=lambda r: _num(r.get("ts")) or 0.0)


def _point(t: dict[str, Any]) -> dict[str, Any]:
    """One chart point of a telemetry payload: machine figures and, per pipeline, fps and latency stages."""
    pipelines: dict[str, Any] = {}
    for name, p in (t.get("pipelines") or {}).items():
        if not isinstance(p, dict):
            continue
        lat, pre, inv, post = (p.get(k) or {} for k in ("latency_ms", "pre_ms", "invoke_ms", "post_ms"))
        pipelines[name] = {"fps": _num(p.get("fps")), "p50": _num(lat.get("p50")), "p95": _num(lat.get("p95")),
                           "pre": _num(pre.get("p95")), "invoke": _num(inv.get("p95")), "post": _num(post.get("p95"))}
    return {"ts": _num(t.get("ts")) or time.time(), "cpu": _num(t.get("cpu_percent")),
            "temp": _num(t.get("temp_c")), "pipelines": pipelines}


class DashboardView(FleetView):
    """FleetView for the whole fleet (no request, no model filter) with the page's extras."""

    def __init__(self, link: PahoLink, topics: FleetTopics) -> None:
        self.extra: dict[str, DeviceExtra] = {}
        self.dirty: set[str] = set()
        self.models: dict[tuple[str, str], dict[str, Any]] = {}
        self.models_dirty = False
        self.replies: deque[dict[str, Any]] = deque(maxlen=REPLIES_KEPT)
        self.requests: dict[str, dict[str, Any]] = {}
        """Commands sent from the page, by id: {action, target, fields, who, ts, devices: {device: state}}."""
        self.events: deque[dict[str, Any]] = deque(maxlen=REPLIES_KEPT)
        """Replies and request progress not yet pushed to the pages."""
        super().__init__(link, topics)
        every = topics.device("+")
        link.subscribe(every.telemetry, self._on_telemetry, qos=0)
        link.subscribe(every.results("#"), self._on_result, qos=0)
        link.subscribe(f"{topics.prefix}/models/+/+/manifest", self._on_manifest)

    def _extra(self, device: str) -> DeviceExtra:
        if device not in self.extra:
            self.extra[device] = DeviceExtra()
        return self.extra[device]

    def _heard(self, device: str) -> None:
        """Under `cond`: a message about the device."""
        self._view(device)
        self.dirty.add(device)

    # -- FleetView's subscriptions, extended --------------------------------------------------------------

    def _on_status(self, topic: str, payload: bytes) -> None:
        super()._on_status(topic, payload)
        device = self.topics.device_of(topic)
        if device is not None and json_object(payload) is not None:
            with self.cond:
                self._heard(device)

    def _on_deploy(self, topic: str, payload: bytes) -> None:
        super()._on_deploy(topic, payload)
        device, data = self.topics.device_of(topic), json_object(payload)
        if device is None or data is None or not payload:
            return
        with self.cond:
            extra = self._extra(device)
            extra.deploy[str(data.get("model"))] = data
            extra.deploys.append(data)
            self._view(device)
            self.dirty.add(device)
            ids = {data.get("id"), *(data.get("ids") or [])}
            for request_id in ids & set(self.requests):
                self.requests[request_id]["devices"][device] = data
                self.events.append({"type": "progress", "id": request_id, "device": device, "state": data})

    def _on_reply(self, topic: str, payload: bytes) -> None:
        device, data = self.topics.device_of(topic), json_object(payload)
        if device is None or data is None:
            return
        with self.cond:
            reply = {"device": device, **data, "received": time.time()}
            self.replies.append(reply)
            request = self.requests.get(str(data.get("id")))
            if request is not None:
                request.setdefault("replies", {})[device] = data
                self.events.append({"type": "reply", **reply})
            self.cond.notify_all()

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        super()._on_telemetry(topic, payload)  # the DeviceView's latest payload: the row's and /metrics'
        device, data = self.topics.device_of(topic), json_object(payload)
        if device is None or data is None:
            return
        with self.cond:
            self._extra(device).history.append(_point(data))
            self._heard(device)

    def _on_result(self, topic: str, payload: bytes) -> None:
        device, data = self.topics.device_of(topic), json_object(payload)
        if device is None or data is None:
            return
        data.setdefault("pipeline", unsegment(topic.rsplit("/", 1)[-1]))
        with self.cond:
            extra = self._extra(device)
            extra.results.setdefault(str(data["pipeline"]), deque(maxlen=RESULTS_KEPT)).append(data)
            # "Last seen" is the device's own clock (birth, telemetry, results), never when a retained message came.
            extra.last_heard = max(extra.last_heard or 0.0, _num(data.get("ts")) or 0.0) or None
            self._heard(device)

    def _on_manifest(self, topic: str, payload: bytes) -> None:
        parts = topic[len(self.topics.prefix) + 1:].split("/")
        key = (unsegment(parts[1]), unsegment(parts[2]))
        data = json_object(payload) if payload else None
        with self.cond:
            if data is None:
                self.models.pop(key, None)  # emptied: the version was withdrawn
            else:
                self.models[key] = {"name": key[0], "version": key[1], "size": data.get("size"),
                                    "sha256": data.get("sha256"), "key_id": data.get("key_id"),
                                    "task": data.get("task")}
            self.models_dirty = True

    # -- what the server reads ----------------------------------------------------------------------------

    def track(self, request_id: str, record: dict[str, Any]) -> None:
        with self.cond:
            self.requests[request_id] = {**record, "devices": {}, "replies": {}}

    def take_dirty(self) -> tuple[set[str], list[dict[str, Any]], bool]:
        """The devices changed since the last call, the events (replies, progress) and whether the model list
        changed; all three emptied."""
        with self.cond:
            dirty, self.dirty = self.dirty, set()
            events = list(self.events)
            self.events.clear()
            models, self.models_dirty = self.models_dirty, False
        return dirty, events, models

    def presence(self, device: str, now: float | None = None) -> str:
        """online, stale (online, heartbeat stopped), offline, stopped or unknown (only telemetry heard)."""
        view = self.devices.get(device)
        status = view.status if view is not None else None
        if not status:
            return "unknown"
        state = str(status.get("state") or "unknown")
        if state == "online" and is_stale(status, now):
            return "stale"
        return state

    def row(self, device: str, now: float | None = None) -> dict[str, Any]:
        """One fleet table row: everything the hot list shows of a device (JSON-ready)."""
        with self.cond:
            view = self.devices.get(device)
            extra = self.extra.get(device) or DeviceExtra()
            status = (view.status if view is not None else None) or {}
            # The will carries no groups, class or pipelines: the last birth still says what the device is.
            info = (view.birth if view is not None else None) or status
            t = (view.telemetry if view is not None else None) or {}
            deploys = dict(extra.deploy)
            waiting = view.waiting_for_model if view is not None else {}
        presence = self.presence(device, now)
        pipelines = []
        models = info.get("models") or {}
        for p in info.get("pipelines") or []:
            if not isinstance(p, dict):
                continue
            name = str(p.get("name"))
            tp = (t.get("pipelines") or {}).get(name) or {}
            model = p.get("model") or {}
            pipelines.append({
                "name": name, "state": tp.get("state") or p.get("state"), "delivered": p.get("delivered"),
                "model": model.get("name"), "version": model.get("version"), "variant": tp.get("variant"),
                "fps": _num(tp.get("fps")), "p95": _num((tp.get("latency_ms") or {}).get("p95")),
                "p50": _num((tp.get("latency_ms") or {}).get("p50")),
            })
        throttled = t.get("throttled") or {}
        flags = sorted(k for k, v in throttled.items() if v is True and not k.endswith("_since_boot")) \
            if isinstance(throttled, dict) else []
        governor = t.get("governor") or {}
        spool = t.get("spool") or {}
        deploy = max(deploys.values(), key=lambda d: _num(d.get("ts")) or 0.0, default=None)
        problems = []
        if presence in ("offline", "stale"):
            problems.append(presence)
        if flags:
            problems.append("throttled")
        if governor.get("paused") or (governor.get("level") or 0) > 0:
            problems.append("governor")
        if any(p["state"] in ("failed", "restarting") for p in pipelines):
            problems.append("pipeline")
        if deploy is not None and (deploy.get("state") == "failed" or (
                deploy.get("state") == "rolled_back" and deploy.get("reason"))):
            problems.append("deploy")
        if (_num(spool.get("queued")) or 0) > 100:
            problems.append("backlog")
        last_seen = max((x for x in (view.last_seen if view else None, extra.last_heard) if x is not None),
                        default=None)
        return {
            "device": device, "presence": presence, "last_seen": last_seen,
            "groups": info.get("groups") or [], "profile": info.get("profile") or t.get("profile"),
            "backend": info.get("backend"), "agent": info.get("agent"), "pipelines": pipelines,
            "models": models, "cpu": _num(t.get("cpu_percent")), "rss_mb": _num(t.get("rss_mb")),
            "temp_c": _num(t.get("temp_c")), "throttled": flags, "spool": _num(spool.get("queued")),
            "governor": governor.get("level"), "governor_paused": bool(governor.get("paused")),
            "deploy": None if deploy is None else {k: deploy.get(k) for k in
                                                   ("model", "version", "state", "progress", "reason", "active")},
            "deploying": deploy is not None and deploy.get("state") in _DEPLOYING,
            "problems": problems,
            # Neither healthy nor failing: a deployment of the name starts the pipeline (a state of its own).
            "waiting": waiting,
        }

    def rows(self, now: float | None = None) -> list[dict[str, Any]]:
        with self.cond:
            names = sorted(self.devices)
        return [self.row(d, now) for d in names]

    def device_detail(self, device: str) -> dict[str, Any] | None:
        with self.cond:
            if device not in self.devices:
                return None
            extra = self.extra.get(device) or DeviceExtra()
            view = self.devices[device]
            detail = {"status": view.status, "telemetry": view.telemetry, "history": list(extra.history),
                      "results": extra.latest(), "deploys": list(extra.deploys),
                      "replies": [r for r in self.replies if r["device"] == device]}
        return {"row": self.row(device), **detail}

    def model_list(self) -> list[dict[str, Any]]:
        """Published models with, per version, the devices running it (from their status) and, per name, the
        devices with a pipeline waiting for it (`waiting`: device → pipelines; a deploy of the name starts them)."""
        with self.cond:
            models = sorted(self.models.values(), key=lambda m: (m["name"], m["version"]))
            running: dict[tuple[str, str], list[str]] = {}
            waiting: dict[str, dict[str, list[str]]] = {}
            for device, view in self.devices.items():
                for pipeline, name in sorted(view.waiting_for_model.items()):
                    waiting.setdefault(name, {}).setdefault(device, []).append(pipeline)
                versions = {str(name): str(m.get("version")) for name, m in
                            ((view.birth or view.status or {}).get("models") or {}).items() if isinstance(m, dict)}
                # A deploy state's `active` is newer than the birth, which is re-sent only on a state change.
                for name, state in (self.extra[device].deploy if device in self.extra else {}).items():
                    if state.get("active") is not None:
                        versions[name] = str(state["active"])
                for name, version in versions.items():
                    running.setdefault((name, version), []).append(device)
        listed = [{**m, "devices": sorted(running.pop((m["name"], m["version"]), [])),
                   "waiting": waiting.get(m["name"], {})} for m in models]
        # Models devices run that this broker does not hold (installed by hand, or published elsewhere).
        listed += [{"name": n, "version": v, "unpublished": True, "devices": sorted(d), "waiting": {}}
                   for (n, v), d in sorted(running.items())]
        # Names devices wait for that no version is published under: nothing to deploy yet, said as such.
        published = {m["name"] for m in models}
        listed += [{"name": n, "version": None, "missing": True, "devices": [], "waiting": w}
                   for n, w in sorted(waiting.items()) if n not in published]
        return listed

    def latest_since(self, device: str, since: float) -> dict[str, Any]:
        """The focused device's chart points and results newer than `since` (device clock), for a push."""
        with self.cond:
            extra = self.extra.get(device)
            if extra is None:
                return {"points": [], "results": []}
            return {"points": [p for p in extra.history if p["ts"] > since],
                    "results": extra.latest(since),
                    "deploys": list(extra.deploys)[-5:]}


def count(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The header's counts: online, stale, offline (also stopped), with problems, waiting for a model."""
    counts = {"total": len(rows), "online": 0, "stale": 0, "offline": 0, "problems": 0, "waiting": 0}
    for r in rows:
        key = "online" if r["presence"] == "online" else "stale" if r["presence"] == "stale" else "offline"
        counts[key] += 1
        counts["problems"] += bool(r["problems"])
        counts["waiting"] += bool(r["waiting"])
    return counts
