"""Run by Home Assistant's own Python (scripts/ha_venv.sh): our discovery configs as Home Assistant reads them.

stdin: {"configs": {topic: payload text}, "states": {topic: payload text}}. For each config topic,
stdout (one JSON object) gives what Home Assistant 2024.3.3's MQTT discovery makes of it:
- `error`: why its discovery topic matcher or the sensor's DISCOVERY_SCHEMA (or the origin
  schema) refuses it, else null;
- `dropped`: keys the schema silently removed (vol.REMOVE_EXTRA: ones it ignores);
- `value`: the value template rendered by Home Assistant's template engine on the latest
  message of the state topic (null when there is none); `None` is what its numeric MQTT
  sensor takes as unknown (`PAYLOAD_NONE`);
- `availability`: the availability template rendered on each status payload given in
  `statuses`.
The steps are those of homeassistant/components/mqtt/discovery.py (topic, abbreviations,
origin) and mixins.py (the platform's discovery schema), in that order; nothing of ours is
imported here, and nothing of Home Assistant's is reimplemented beyond that glue.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from typing import Any


async def check(data: dict[str, Any]) -> dict[str, Any]:
    import voluptuous as vol
    from homeassistant.components.mqtt import sensor
    from homeassistant.components.mqtt.abbreviations import (
        ABBREVIATIONS,
        DEVICE_ABBREVIATIONS,
        ORIGIN_ABBREVIATIONS,
    )
    from homeassistant.components.mqtt.const import PAYLOAD_NONE
    from homeassistant.components.mqtt.discovery import (
        MQTT_ORIGIN_INFO_SCHEMA,
        SUPPORTED_COMPONENTS,
        TOPIC_MATCHER,
    )
    from homeassistant.const import __version__
    from homeassistant.core import HomeAssistant
    from homeassistant.helpers.template import Template

    hass = HomeAssistant(tempfile.mkdtemp())
    out: dict[str, Any] = {"version": __version__, "payload_none": PAYLOAD_NONE, "configs": {}}
    prefix = data.get("prefix", "homeassistant")
    for topic, text in data["configs"].items():
        report: dict[str, Any] = {"error": None, "dropped": [], "value": None, "availability": []}
        out["configs"][topic] = report
        match = TOPIC_MATCHER.match(topic.removeprefix(prefix + "/"))
        if not match or match.group("component") not in SUPPORTED_COMPONENTS or not topic.startswith(prefix + "/"):
            report["error"] = f"discovery topic not matched: {topic}"
            continue
        if match.group("component") != "sensor":
            report["error"] = f"not a sensor: {topic}"
            continue
        payload = json.loads(text)
        for key in list(payload):
            payload[ABBREVIATIONS.get(key, key)] = payload.pop(key)
        for key, table in (("device", DEVICE_ABBREVIATIONS), ("origin", ORIGIN_ABBREVIATIONS)):
            if isinstance(payload.get(key), dict):
                for k in list(payload[key]):
                    payload[key][table.get(k, k)] = payload[key].pop(k)
        try:
            if "origin" in payload:
                MQTT_ORIGIN_INFO_SCHEMA(payload["origin"])
            config = sensor.DISCOVERY_SCHEMA(payload)
        except vol.Invalid as exc:
            report["error"] = str(exc)
            continue
        report["dropped"] = sorted(set(payload) - set(config))
        state = data["states"].get(config["state_topic"])
        if "value_template" in config and state is not None:
            template = Template(config["value_template"].template, hass)
            report["value"] = str(template.async_render_with_possible_json_value(state, ""))
        for availability in config.get("availability", []):
            if "value_template" in availability:
                template = Template(availability["value_template"].template, hass)
                report["availability"].append([str(template.async_render_with_possible_json_value(s, ""))
                                               for s in data.get("statuses", [])])
    return out


if __name__ == "__main__":
    json.dump(asyncio.run(check(json.load(sys.stdin))), sys.stdout)
