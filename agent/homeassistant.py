"""Home Assistant MQTT discovery: this device and its sensors, announced to Home Assistant.

Sensors read the agent's own topics, so nothing extra is published for them: CPU, the
agent's CPU share, memory, temperature and the governor's level from
`lepton/<dev>/telemetry`; per pipeline its fps and median latency from the same payload
(and for an IP camera its connection state: connected, reconnecting, …), and its last
result (the top class, the detected labels, or the wake word) from
`lepton/<dev>/results/<pipeline>`. Availability follows the retained status topic
(`online` only while the agent's birth stands; the will and `stopped` make it unavailable).

Configs are sent unretained — a device taken out of the fleet leaves no ghost behind —
so they are sent again on every (re)connect and whenever Home Assistant announces itself
with `online` on `<discovery_prefix>/status`. A pipeline removed by a reload has its
sensors removed (an empty config).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import HomeAssistantSection
from agent.mqtt.link import Link
from agent.mqtt.topics import Topics
from agent.telemetry import read_temperature

logger = logging.getLogger(__name__)

AVAILABILITY_TEMPLATE = "{{ 'online' if value_json.state == 'online' else 'offline' }}"
LAST_RESULT_TEMPLATE = (
    "{% if value_json.classes is defined %}"
    "{{ value_json.classes[0].label if value_json.classes else 'nothing' }}"
    "{% elif value_json.detections is defined %}"
    "{{ (value_json.detections | map(attribute='label') | join(', ') or 'nothing')[:255] }}"
    "{% elif value_json.event is defined %}{{ value_json.label }}"
    "{% else %}unknown{% endif %}"
)


def node_id(device: str) -> str:
    """The discovery node id: Home Assistant takes [a-zA-Z0-9_-] only."""
    return "lepton_" + re.sub(r"[^A-Za-z0-9_-]", "_", device)


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
        return f"{self.settings.discovery_prefix}/sensor/{self.node}/{object_id}/config"

    def _base(self, object_id: str, name: str, state_topic: str, template: str) -> dict[str, Any]:
        return {
            "name": name,
            "unique_id": f"{self.node}_{object_id}",
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
            key = re.sub(r"[^A-Za-z0-9_-]", "_", pipeline)
            ref = f"value_json.pipelines[{json.dumps(pipeline)}]"
            if self.telemetry:
                add(f"{key}_fps", self._measurement(f"{key}_fps", f"{pipeline} fps", "{{ " + ref + ".fps }}", "fps",
                                                    icon="mdi:camera-timer"))
                add(f"{key}_latency", self._measurement(f"{key}_latency", f"{pipeline} latency",
                                                        "{{ " + ref + ".latency_ms.p50 }}", "ms",
                                                        device_class="duration"))
            if pipeline in cameras:
                camera = self._base(f"{key}_camera", f"{pipeline} camera", self.topics.telemetry,
                                    "{{ " + ref + ".source.state if " + ref + ".source else 'stopped' }}")
                camera.update(icon="mdi:cctv", expire_after=max(60, round(3 * self.telemetry_interval_s)))
                add(f"{key}_camera", camera)
            result = self._base(f"{key}_last_result", f"{pipeline} last result", self.topics.results(pipeline),
                                LAST_RESULT_TEMPLATE)
            result["icon"] = "mdi:eye"
            add(f"{key}_last_result", result)
        return out

    def send(self) -> None:
        """Send every config (and empty ones for sensors that are gone)."""
        with self._lock:
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
            changed = set(self.configs()) != self._announced
        if changed:
            self.send()
