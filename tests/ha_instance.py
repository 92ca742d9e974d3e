"""A running Home Assistant (2024.3.3, scripts/ha_venv.sh) with its MQTT integration on a test broker.

Usage: ha_instance.py PORT. Prints `ready` once its MQTT client is connected (discovery on,
prefix `homeassistant`); then for each line `snapshot` on stdin prints one JSON line: the MQTT
entities in its entity registry (entity id, unique id, device id, state) and the devices in
its device registry with their MQTT identifiers. `quit` (or end of input) stops it. Only the
MQTT integration and what it depends on are loaded; bootstrap's other default integrations
fail to import in this lean venv and are left out (their errors go to stderr).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any


async def main(port: int) -> None:
    from homeassistant import bootstrap, core, loader
    from homeassistant.helpers import device_registry as dr
    from homeassistant.helpers import entity_registry as er

    config_dir = Path(tempfile.mkdtemp())
    (config_dir / ".storage").mkdir()
    (config_dir / "configuration.yaml").write_text("")
    entry = {"entry_id": "mqtt", "version": 1, "minor_version": 1, "domain": "mqtt", "title": "test broker",
             "data": {"broker": "127.0.0.1", "port": port, "discovery": True, "discovery_prefix": "homeassistant"},
             "options": {}, "pref_disable_new_entities": False, "pref_disable_polling": False, "source": "user",
             "unique_id": None, "disabled_by": None}
    (config_dir / ".storage" / "core.config_entries").write_text(json.dumps(
        {"version": 1, "minor_version": 1, "key": "core.config_entries", "data": {"entries": [entry]}}))
    hass = core.HomeAssistant(str(config_dir))
    hass.config.skip_pip = True
    loader.async_setup(hass)
    await bootstrap.async_from_config_dict({"homeassistant": {}}, hass)
    await hass.async_start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    # Its client connects in the background and offers nothing to await: look until it is, or give up.
    while not (hass.data.get("mqtt") and hass.data["mqtt"].client.connected):
        if loop.time() > deadline:
            sys.exit("home assistant: no MQTT connection within 60 s")
        await asyncio.sleep(0.05)
    print("ready", flush=True)
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() not in ("", "quit"):
        await hass.async_block_till_done()
        entities: list[dict[str, Any]] = []
        for e in er.async_get(hass).entities.values():
            if e.platform == "mqtt":
                state = hass.states.get(e.entity_id)
                entities.append({"entity_id": e.entity_id, "unique_id": e.unique_id, "device_id": e.device_id,
                                 "state": state.state if state else None,
                                 "unit": state.attributes.get("unit_of_measurement") if state else None})
        devices = [{"id": d.id, "name": d.name, "identifiers": sorted(i for domain, i in d.identifiers
                                                                     if domain == "mqtt")}
                   for d in dr.async_get(hass).devices.values()
                   if any(domain == "mqtt" for domain, _ in d.identifiers)]
        print(json.dumps({"entities": entities, "devices": devices}), flush=True)
    await hass.async_stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(int(sys.argv[1])))
