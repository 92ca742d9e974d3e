"""Home Assistant discovery as Home Assistant itself reads it, from a running daemon over a real mosquitto.

Home Assistant 2024.3.3 runs in a side venv (scripts/ha_venv.sh, cached under .cache/ha-venv or
$HA_VENV); tests/ha_check.py puts every config through its MQTT discovery schema and renders our
templates with its template engine, and tests/ha_instance.py runs it with its MQTT integration on
the test broker. Plus: ids of names that used to collide, "no value" as unknown, and retiring a
device online (the agent's command) and offline (the fleet alone).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import paho.mqtt.publish as publish
from broker import Broker, Watcher, wait_until
from conftest import ROOT
from test_daemon import Daemon, fleet
from test_telemetry_daemon import IDLE_PIPELINES, _fake_root, write_config

D_HA = "lepton/x--d-2eha"
"""Device d.ha's topics: a dot in a topic segment is encoded (agent.mqtt.topics.segment), as in its HA ids."""
STATUSES = ['{"state": "online", "bdseq": 3}', '{"state": "offline", "bdseq": 3}', '{"state": "stopped", "bdseq": 3}',
            ""]  # the last: a retained status cleared by `lepton-fleet retire`


@functools.cache
def _ha_python() -> str:
    r = subprocess.run([str(ROOT / "scripts" / "ha_venv.sh")], capture_output=True, text=True, timeout=280,
                       check=False, cwd=ROOT)
    assert r.returncode == 0, f"scripts/ha_venv.sh failed:\n{r.stderr[-3000:]}"
    python = Path(r.stdout.strip().splitlines()[-1])
    return str(python if python.is_absolute() else ROOT / python)


def home_assistant(configs: dict[str, str], states: dict[str, str]) -> dict[str, Any]:
    """What Home Assistant 2024.3.3 makes of these discovery configs (tests/ha_check.py)."""
    r = subprocess.run([_ha_python(), str(ROOT / "tests" / "ha_check.py")], capture_output=True, text=True,
                       timeout=120, check=False, input=json.dumps({"configs": configs, "states": states,
                                                                   "statuses": STATUSES}),
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    verdict: dict[str, Any] = json.loads(r.stdout)
    assert verdict["version"] == "2024.3.3"
    return verdict


def _ha_messages(w: Watcher) -> list[tuple[str, dict[str, Any]]]:
    return [(t, json.loads(p)) for t, p, _ in w.messages if t.startswith("homeassistant/") and t.endswith("/config")
            and p]


GOOD = {"name": "CPU", "unique_id": "lepton_d/cpu", "state_topic": "lepton/d/telemetry",
        "value_template": "{{ value_json.cpu_percent }}", "availability": [{"topic": "lepton/d/status"}],
        "device": {"identifiers": ["lepton_d"], "name": "d"}, "origin": {"name": "lepton-agent"},
        "unit_of_measurement": "%", "state_class": "measurement", "icon": "mdi:cpu-64-bit"}


def test_the_checker_catches_what_home_assistant_refuses_or_ignores() -> None:
    """The check below can fail: Home Assistant's own verdicts on configs that are wrong in ways we could be."""
    bad = {
        "good": GOOD,
        "wildcard": {**GOOD, "state_topic": "lepton/+x/telemetry"},
        "both_availabilities": {**GOOD, "availability_topic": "lepton/d/status"},
        "device_without_id": {**GOOD, "device": {"name": "d"}},
        "bad_template": {**GOOD, "value_template": "{{ value_json.cpu_percent "},
        "bad_state_class": {**GOOD, "state_class": "sometimes"},
        "typo": {**GOOD, "unit_of_measure": "%"},
    }
    configs = {f"homeassistant/sensor/lepton_d/{k}/config": json.dumps(v) for k, v in bad.items()}
    configs["homeassistant/sensor/lepton_d.x/dots/config"] = json.dumps(GOOD)
    verdict = home_assistant(configs, {"lepton/d/telemetry": '{"cpu_percent": 12.5}'})["configs"]
    by_object = {t.split("/")[3]: v for t, v in verdict.items()}
    assert by_object["good"] == {"error": None, "dropped": [], "value": "12.5", "availability": []}
    for key in ("wildcard", "both_availabilities", "device_without_id", "bad_template", "bad_state_class", "dots"):
        assert by_object[key]["error"], key
    assert by_object["typo"]["dropped"] == ["unit_of_measure"]


def test_home_assistant_discovery(tmp_path: Path, fixtures: Path) -> None:
    root = _fake_root(tmp_path, 52.5)
    with Broker(tmp_path / "broker") as own:
        config = write_config(tmp_path, own.port, root, fixtures / "colors_int8.json", "d.ha",
                              extra="[homeassistant]\nenabled = true\n")
        config.write_text(config.read_text() + IDLE_PIPELINES.format(model=fixtures / "colors_int8.json"))
        with Watcher(own.port, ["homeassistant/#", f"{D_HA}/#"]) as w, Daemon(config) as daemon:
            # A telemetry message from after the first item (latency has a value), and a result.
            w.wait_json("/telemetry", lambda m: bool(m) and m[-1]["pipelines"]["colors"]["frames"] > 0, timeout=60)
            w.wait_json("/results/colors", lambda m: len(m) >= 1, timeout=30)
            configs = dict(_ha_messages(w))
            objects = {t.split("/")[3] for t in configs}
            idle = {f"{p}_{s}" for p in ("x--idle-2ea", "idle_a") for s in ("fps", "latency", "last_result")}
            assert objects == {"cpu", "agent_cpu", "memory", "temperature", "governor_level", "colors_fps",
                               "colors_latency", "colors_last_result"} | idle
            # d.ha is encoded, not squashed into d_ha (which another device may be called).
            assert all(t.startswith("homeassistant/sensor/lepton_x--d-2eha/") for t in configs)
            assert len({c["unique_id"] for c in configs.values()}) == len(configs)
            assert len({json.dumps(c["device"], sort_keys=True) for c in configs.values()}) == 1
            assert not any(retain for t, _, retain in w.messages if t.startswith("homeassistant/"))

            # Home Assistant's verdict on every config, its templates on the real payloads.
            latest = {t: p.decode() for t, p, _ in w.messages if p}
            verdict = home_assistant({t: json.dumps(c) for t, c in configs.items()}, latest)["configs"]
            values = {}
            for topic, v in verdict.items():
                assert v["error"] is None and v["dropped"] == [], (topic, v)
                assert v["availability"] == [["online", "offline", "offline", "offline"]], (topic, v)
                values[topic.split("/")[3]] = v["value"]
            assert float(values["temperature"]) == 52.5
            for key in ("cpu", "agent_cpu", "memory", "colors_fps", "colors_latency", "governor_level"):
                float(values[key])
            assert values["colors_last_result"] in {"red", "green", "blue"}
            # No sample yet: `None`, which Home Assistant's numeric sensor shows as unknown (not 0 ms).
            assert values["x--idle-2ea_latency"] == values["idle_a_latency"] == "None"
            assert float(values["idle_a_fps"]) == 0.0  # not running: 0 items per second is the truth
            assert values["idle_a_last_result"] is None  # no result message yet: the sensor stays unknown

            # Home Assistant restarts: its birth brings the configs again.
            before = len(_ha_messages(w))
            publish.single("homeassistant/status", "online", hostname="127.0.0.1", port=own.port)
            assert w.wait_for(lambda m: len(_ha_messages(w)) >= before + len(configs), timeout=30)
            publish.single("homeassistant/status", "offline", hostname="127.0.0.1", port=own.port)

            # A reload adds a pipeline: its sensors appear; removed again, they are removed (empty configs).
            original = config.read_text()
            config.write_text(original + f"""
[[pipelines]]
name = "pattern"
source = "test:pattern"
model = "{fixtures / 'colors_int8.json'}"
[pipelines.source_options]
fps = 5
""")
            rc, (reload,) = fleet(own.port, "cmd", "d.ha", "reload")
            assert rc == 0 and reload["result"]["added"] == ["pattern"]
            assert w.wait_for(lambda m: any(t.endswith("/pattern_last_result/config") and p for t, p, _ in m), 30)
            config.write_text(original)
            rc, (reload,) = fleet(own.port, "cmd", "d.ha", "reload")
            assert rc == 0 and reload["result"]["removed"] == ["pattern"]
            gone = {"pattern_fps", "pattern_latency", "pattern_last_result"}
            assert w.wait_for(lambda m: {t.split("/")[3] for t, p, _ in m if t.startswith("homeassistant/")
                                         and not p} == gone, 30)

            # The broker restarts: the agent reconnects and sends them again.
            before = len(_ha_messages(w))
            w.stop()
            own.stop()
            own.start()
            w2 = Watcher(own.port, ["homeassistant/#", f"{D_HA}/#"]).start()
            try:
                assert w2.wait_for(lambda m: len([t for t, p, _ in m if t.endswith("/config") and p])
                                   >= len(configs), timeout=60)
                assert before >= 2 * len(configs) + 3
                _retire(own, w2, daemon, set(configs))
            finally:
                w2.stop()
    assert "Traceback" not in (tmp_path / "agent.log").read_text()


def _all_sensors(emptied: list[str], configs: set[str]) -> None:
    """Retiring empties every config the device sent, and the camera sensor every pipeline could have had."""
    assert configs <= set(emptied) and all(t in configs or t.endswith("_camera/config") for t in emptied), emptied


def _retire(own: Broker, w: Watcher, daemon: Daemon, configs: set[str]) -> None:
    """Retiring, online (the agent's command) and then offline (the fleet alone): nothing left behind."""
    w.wait_json("/status", lambda m: m[-1]["state"] == "online", timeout=30)
    rc, (report,) = fleet(own.port, "retire", "d.ha")
    assert rc == 0 and report["by"] == "agent" and report["ok"], report
    _all_sensors(report["result"]["configs_emptied"], configs)
    assert w.wait_for(lambda m: {t for t, p, _ in m if t.startswith("homeassistant/") and not p} >= configs, 30)
    # Home Assistant restarts: a retired agent does not announce the device again. The ping's reply comes
    # after anything the agent would have sent for Home Assistant's birth (one link thread, one outbox).
    count = len(_ha_messages(w))
    publish.single("homeassistant/status", "online", hostname="127.0.0.1", port=own.port)
    rc, _ = fleet(own.port, "cmd", "d.ha", "ping")
    assert rc == 0 and len(_ha_messages(w)) == count
    assert daemon.terminate() == 0

    # Gone for good: the fleet empties the configs itself and clears what the device left retained.
    rc, (report,) = fleet(own.port, "retire", "d.ha")
    assert rc == 0 and report["by"] == "fleet" and report["state"] == "stopped", report
    _all_sensors(report["configs_emptied"], configs)
    assert f"{D_HA}/status" in report["retained_cleared"]
    with Watcher(own.port, [f"{D_HA}/#", "sync/probe"]) as after:
        publish.single("sync/probe", "x", hostname="127.0.0.1", port=own.port)
        assert after.wait_for(lambda m: any(t == "sync/probe" for t, _, _ in m), 30)
        assert [t for t, _, retained in after.messages if retained] == []
    # Nothing known about it now: retiring again is a clear error, not a silent success.
    rc, _ = fleet(own.port, "retire", "d.ha")
    assert rc == 2



class HomeAssistantInstance:
    """tests/ha_instance.py in its own process: a running Home Assistant whose registries we can read."""

    def __init__(self, port: int, log: Path) -> None:
        self.log = log.open("w")
        # Home Assistant publishes its birth once its discovery subscriptions are in place: from then on
        # it hears every config (before, it would only hear the ones our agent re-sends on that birth).
        with Watcher(port, ["homeassistant/status"]) as birth:
            self.proc = subprocess.Popen([_ha_python(), str(ROOT / "tests" / "ha_instance.py"), str(port)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                         env={**os.environ, "PYTHONPATH": ""})
            assert self.proc.stdout is not None
            if self.proc.stdout.readline().strip() != "ready" or not birth.wait_for(
                    lambda m: (("homeassistant/status", b"online", False) in m), timeout=60):
                self.close()
                raise AssertionError(f"home assistant did not start: {log.read_text()[-3000:]}")

    def snapshot(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("snapshot\n")
        self.proc.stdin.flush()
        snap: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return snap

    def wait(self, predicate: Any, timeout: float = 60.0) -> dict[str, Any]:
        """The first snapshot that satisfies `predicate` (each snapshot waits for HA to be idle first)."""
        last: dict[str, Any] = {}

        def check() -> bool:
            nonlocal last
            last = self.snapshot()
            return bool(predicate(last))

        if not wait_until(check, timeout=timeout, step=0.2):
            raise AssertionError(f"home assistant never got there: {json.dumps(last)[:3000]}")
        return last

    def close(self) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def test_a_running_home_assistant_sees_the_device_and_forgets_it_when_retired(tmp_path: Path,
                                                                               fixtures: Path) -> None:
    """Issue 18 as a user of Home Assistant sees it: entities with values, unknown without one, unavailable
    on SIGTERM, and gone from its registries (not a ghost) once the device is retired."""
    root = _fake_root(tmp_path, 48.5)
    with Broker(tmp_path / "broker") as own:
        ha = HomeAssistantInstance(own.port, tmp_path / "homeassistant.log")
        try:
            config = write_config(tmp_path, own.port, root, fixtures / "colors_int8.json", "d.ha",
                                  extra="[homeassistant]\nenabled = true\n")
            config.write_text(config.read_text() + IDLE_PIPELINES.format(model=fixtures / "colors_int8.json"))
            with Daemon(config) as daemon:
                def settled(snap: dict[str, Any]) -> bool:
                    # Every sensor there, available, and the colors pipeline's latency past its first item.
                    states = {e["unique_id"].split("/", 1)[1]: e["state"] for e in snap["entities"]}
                    return (len(states) == 14 and "unavailable" not in states.values()
                            and states.get("colors_latency") not in (None, "unknown"))

                snap = ha.wait(settled)
                assert [d["identifiers"] for d in snap["devices"]] == [["lepton_x--d-2eha"]]
                states = {e["unique_id"].split("/", 1)[1]: e["state"] for e in snap["entities"]}
                assert states["temperature"] == "48.5"
                float(states["colors_latency"])
                # No latency sample: unknown (not 0 ms); both idle pipelines kept apart (idle.a, idle_a).
                assert states["x--idle-2ea_latency"] == states["idle_a_latency"] == "unknown"
                assert states["idle_a_last_result"] == "unknown"
                assert daemon.terminate() == 0
            snap = ha.wait(lambda s: {e["state"] for e in s["entities"]} == {"unavailable"})
            assert len(snap["entities"]) == 14  # what issue 18 found: a stopped device stays, unavailable

            rc, (report,) = fleet(own.port, "retire", "d.ha")
            assert rc == 0 and report["by"] == "fleet", report
            snap = ha.wait(lambda s: not s["entities"] and not s["devices"])
        finally:
            ha.close()
    # Home Assistant had nothing to complain about in our configs, templates or payloads (the cleared
    # status included); what it logs about its own integrations this lean venv lacks is not ours.
    log = (tmp_path / "homeassistant.log").read_text()
    assert "homeassistant.helpers.template" not in log and "homeassistant.components.mqtt" not in log, log[-3000:]
