"""Home Assistant MQTT discovery: this device and its sensors, announced to Home Assistant.

Sensors read the agent's own topics, so nothing extra is published for them: CPU, the
agent's CPU share, memory, temperature and the governor's level from
`lepton/<dev>/telemetry`; per pipeline its fps and median latency from the same payload
(and for an IP camera its connection state: connected, reconnecting, …), and its last
result (the top class, the detected labels, or the wake word) from
`lepton/<dev>/results/<pipeline>`. Availability follows the retained status topic
(`online` only while the agent's birth stands; the will and `stopped` make it unavailable).

Configs are sent unretained, so they are sent again on every (re)connect and whenever Home
Assistant announces itself with `online` on `<discovery_prefix>/status`. A pipeline removed
by a reload has its sensors removed (an empty config). Home Assistant keeps a discovered
device in its registry (its entities `unavailable`) until it gets an empty config for each
of them: `retire` (the agent command, or `lepton-fleet retire` for a device that is gone)
sends those.

Ids go through `agent.names.encode_name`, so distinct device and pipeline names never share
an id (`cam.a` and `cam_a` used to become one). `unique_id` is `<node>/<object>`: the
encoded names hold `_`, so joining them with `_` would not be unambiguous.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from agent import __version__
from agent.commands import Command, register_action
from agent.config import HomeAssistantSection
from agent.mqtt.link import Link
from agent.mqtt.topics import Topics
from agent.names import encode_name
from agent.telemetry import read_temperature

logger = logging.getLogger(__name__)

# `value_json is defined`: an emptied (retired) retained status is not JSON, and must read as offline quietly.
AVAILABILITY_TEMPLATE = "{{ 'online' if value_json is defined and value_json.state == 'online' else 'offline' }}"
LAST_RESULT_TEMPLATE = (
    "{% if value_json.classes is defined %}"
    "{{ value_json.classes[0].label if value_json.classes else 'nothing' }}"
    "{% elif value_json.detections is defined %}"
    "{{ (value_json.detections | map(attribute='label') | join(', ') or 'nothing')[:255] }}"
    "{% elif value_json.event is defined %}{{ value_json.label }}"
    "{% else %}unknown{% endif %}"
)


@register_action
class Retire(Command):
    """`retire`: empty every discovery config of this device (docs/telemetry.md); the reply lists them."""

    action: Literal["retire"]


TELEMETRY_OBJECTS = ("cpu", "agent_cpu", "memory", "temperature", "governor_level")
PIPELINE_OBJECTS = ("fps", "latency", "last_result", "camera")
"""Per pipeline `<encoded name>_<suffix>`; no telemetry object ends in one of these, so ids never clash."""


def node_id(device: str) -> str:
    """The discovery node id: Home Assistant takes [a-zA-Z0-9_-] only; distinct devices, distinct ids."""
    return "lepton_" + encode_name(device)


def pipeline_object(pipeline: str, suffix: str) -> str:
    return f"{encode_name(pipeline)}_{suffix}"


def config_topic(prefix: str, device: str, object_id: str) -> str:
    return f"{prefix}/sensor/{node_id(device)}/{object_id}/config"


def every_config_topic(prefix: str, device: str, pipelines: Iterable[str]) -> list[str]:
    """The config topics of every sensor the device can have with these pipelines (what retiring empties)."""
    objects = [*TELEMETRY_OBJECTS, *(pipeline_object(p, s) for p in pipelines for s in PIPELINE_OBJECTS)]
    return [config_topic(prefix, device, o) for o in objects]


class Discovery:
    """Builds and sends the discovery configs of one device."""

    def __init__(self, link: Link, topics: Topics, settings: HomeAssistantSection, *, device: str,
                 model: str, pipelines: Callable[[], list[str]], telemetry: bool, telemetry_interval_s: float,
                 root: Path = Path("/"), cameras: Callable[[], list[str]] = list) -> None:
        self.link = link
        self.topics = topics
        self.settings = settings
        self.device = device
        self.model = model
        self.pipelines = pipelines
        self.cameras = cameras
        """The pipelines reading a network camera: they get a connection-state sensor."""
        self.telemetry = telemetry
        self.telemetry_interval_s = telemetry_interval_s
        self.root = root
        self.node = node_id(device)
        self.sent = 0
        self.retired = False
        """Set by `retire()`: nothing is announced again until the agent restarts."""
        self._announced: set[str] = set()
        self._has_temperature = False  # sticky: a zone that fails one read must not remove the sensor
        self._lock = threading.Lock()  # the link thread (connects, HA online) and the monitor (refresh) send

    @property
    def ha_status_topic(self) -> str:
        return f"{self.settings.discovery_prefix}/status"

    def attach(self) -> None:
        """Send on every connect and when Home Assistant comes online (call before the link starts)."""
        self.link.watch(self.ha_status_topic, self._on_ha_status)
        self.link.on_connected.append(self.send)

    def _on_ha_status(self, payload: bytes) -> None:
        if payload.strip() == b"online":
            logger.info("home assistant is online: sending discovery")
            self.send()

    def config_topic(self, object_id: str) -> str:
        return config_topic(self.settings.discovery_prefix, self.device, object_id)

    def _base(self, object_id: str, name: str, state_topic: str, template: str) -> dict[str, Any]:
        return {
            "name": name,
            "unique_id": f"{self.node}/{object_id}",
            "state_topic": state_topic,
            "value_template": template,
            "availability": [{"topic": self.topics.status, "value_template": AVAILABILITY_TEMPLATE}],
            "availability_mode": "all",
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": {
                "identifiers": [self.node],
                "name": self.device,
                "manufacturer": "Lepton",
                "model": self.model,
                "sw_version": __version__,
            },
            "origin": {"name": "lepton-agent", "sw_version": __version__},
        }

    def _measurement(self, object_id: str, name: str, template: str, unit: str,
                     device_class: str | None = None, icon: str | None = None) -> dict[str, Any]:
        config = self._base(object_id, name, self.topics.telemetry, template)
        config.update(unit_of_measurement=unit, state_class="measurement",
                      expire_after=max(60, round(3 * self.telemetry_interval_s)))
        if device_class is not None:
            config["device_class"] = device_class
        if icon is not None:
            config["icon"] = icon
        return config

    def configs(self) -> dict[str, dict[str, Any]]:
        """Config topic → config payload, for the sensors this device has now."""
        out: dict[str, dict[str, Any]] = {}

        def add(object_id: str, config: dict[str, Any]) -> None:
            out[self.config_topic(object_id)] = config

        if self.telemetry:
            add("cpu", self._measurement("cpu", "CPU", "{{ value_json.cpu_percent }}", "%", icon="mdi:cpu-64-bit"))
            add("agent_cpu", self._measurement("agent_cpu", "Agent CPU", "{{ value_json.agent_cpu_percent }}", "%",
                                               icon="mdi:chip"))
            add("memory", self._measurement("memory", "Memory used", "{{ value_json.mem_percent }}", "%",
                                            icon="mdi:memory"))
            self._has_temperature = self._has_temperature or read_temperature(self.root) is not None
            if self._has_temperature:
                add("temperature", self._measurement("temperature", "SoC temperature", "{{ value_json.temp_c }}",
                                                     "°C", device_class="temperature"))
            add("governor_level", self._measurement("governor_level", "Governor level",
                                                    "{{ value_json.governor.level }}", "steps", icon="mdi:speedometer"))
        cameras = set(self.cameras()) if self.telemetry else set()
        for pipeline in self.pipelines():
            fps, latency, last, camera_id = (pipeline_object(pipeline, s) for s in PIPELINE_OBJECTS)
            ref = f"value_json.pipelines[{json.dumps(pipeline)}]"
            if self.telemetry:
                add(fps, self._measurement(fps, f"{pipeline} fps", "{{ " + ref + ".fps }}", "fps",
                                           icon="mdi:camera-timer"))
                # p50 is null until the pipeline has an item: Jinja renders it `None`, which Home
                # Assistant's numeric MQTT sensor takes as unknown (not 0 ms).
                add(latency, self._measurement(latency, f"{pipeline} latency", "{{ " + ref + ".latency_ms.p50 }}",
                                               "ms", device_class="duration"))
            if pipeline in cameras:
                camera = self._base(camera_id, f"{pipeline} camera", self.topics.telemetry,
                                    "{{ " + ref + ".source.state if " + ref + ".source else 'stopped' }}")
                camera.update(icon="mdi:cctv", expire_after=max(60, round(3 * self.telemetry_interval_s)))
                add(camera_id, camera)
            result = self._base(last, f"{pipeline} last result", self.topics.results(pipeline), LAST_RESULT_TEMPLATE)
            result["icon"] = "mdi:eye"
            add(last, result)
        return out

    def send(self) -> None:
        """Send every config (and empty ones for sensors that are gone)."""
        with self._lock:
            if self.retired:
                return
            configs = self.configs()
            for topic in sorted(self._announced - configs.keys()):
                self.link.send_raw(topic, b"")
            for topic, config in configs.items():
                self.link.send_raw(topic, json.dumps(config, separators=(",", ":")).encode())
            self._announced = set(configs)
            self.sent += 1
        logger.debug("home assistant discovery: %d sensors", len(configs))

    def refresh(self) -> None:
        """Send again if the sensors changed (a pipeline added or removed)."""
        with self._lock:
            changed = not self.retired and set(self.configs()) != self._announced
        if changed:
            self.send()

    def retire(self) -> list[str]:
        """Remove the device from Home Assistant: an empty config for every sensor it has or had.

        Announcing stops until the agent restarts (a restart with `[homeassistant] enabled`
        announces the device again). Returns the config topics emptied.
        """
        with self._lock:
            self.retired = True
            topics = sorted(self._announced | set(every_config_topic(
                self.settings.discovery_prefix, self.device, self.pipelines())))
            for topic in topics:
                self.link.send_raw(topic, b"")
            self._announced = set()
        logger.warning("home assistant: device retired (%d sensor configs emptied)", len(topics))
        return topics


def retire(discovery: Discovery | None, link: Link, prefix: str, device: str, pipelines: list[str]) -> dict[str, Any]:
    """The `retire` command: also with discovery off now, since an earlier run may have announced the device."""
    if discovery is not None:
        topics = discovery.retire()
    else:
        topics = every_config_topic(prefix, device, pipelines)
        for topic in topics:
            link.send_raw(topic, b"")
    return {"configs_emptied": topics, "announcing": False}
