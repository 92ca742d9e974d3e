"""Telemetry from the running daemon over a real mosquitto: the schema, values against /proc, a fake
thermal zone driving the governor through variant swap, pause and recovery with results' seq
continuous; Home Assistant discovery checked as Home Assistant reads it; the Prometheus endpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.publish as publish
import pytest
from broker import Broker, Watcher, free_port
from conftest import ROOT, run_cli
from test_daemon import Daemon, fleet

SCHEMA = json.loads((ROOT / "docs" / "telemetry.schema.json").read_text())


def _fake_root(tmp: Path, celsius: float, throttle_word: str = "0x0") -> Path:
    """/sys from the test (thermal zone, Pi throttle node); /proc is the real one."""
    root = tmp / "root"
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    set_temperature(root, celsius)
    node = root / "sys/devices/platform/soc/soc:firmware/get_throttled"
    node.parent.mkdir(parents=True)
    node.write_text(throttle_word + "\n")
    (root / "proc").symlink_to("/proc")
    return root


def set_temperature(root: Path, celsius: float) -> None:
    # Written whole and renamed, so the agent never reads half a number.
    temp = root / "sys/class/thermal/thermal_zone0/temp"
    partial = temp.with_suffix(".new")
    partial.write_text(f"{round(celsius * 1000)}\n")
    partial.replace(temp)


def write_config(tmp: Path, port: int, root: Path, model: Path, device: str, extra: str = "",
                 telemetry: str = "") -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
device_id = "{device}"
state_dir = "{tmp / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
keepalive_s = 5
[profile]
telemetry_interval_s = 1
thermal_soft_c = 60
thermal_hard_c = 70
cpu_budget_percent = 100
[telemetry]
root = "{root}"
{telemetry}
[governor]
interval_s = 0.2
step_s = 0
recover_s = 0
max_level = 3
variant_level = 2
fps_step = 0.5
{extra}
[[pipelines]]
name = "colors"
source = "test:colors"
model = "{model}"
threshold = 0.0
[pipelines.source_options]
fps = 20
hold = 2
width = 64
height = 48
[pipelines.policy]
on_change = false
max_rate = 100
""")
    return path


def _validate(payloads: list[dict[str, Any]]) -> None:
    for payload in payloads:
        jsonschema.validate(payload, SCHEMA)


def _vm(pid: int, key: str) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def test_telemetry_schema_values_and_the_governor(tmp_path: Path, broker: Broker, fixtures: Path) -> None:
    # Under-voltage now (not the governor's business), throttled since boot only.
    root = _fake_root(tmp_path, 45.0, "0x50001")
    config = write_config(tmp_path, broker.port, root, fixtures / "colors_bench_variants.json", "d-tel")
    with Watcher(broker.port, ["lepton/d-tel/#"]) as w, Daemon(config) as daemon:
        assert daemon.proc is not None
        first = w.wait_json("/telemetry", lambda m: any(p["pipelines"]["colors"]["frames"] > 0 for p in m),
                            timeout=60)[-1]
        # Figures against the fake /sys and the real /proc, read right after.
        assert first["temp_c"] == 45.0 and first["profile"] == "generic-x86_64"
        assert first["throttled"] == {"under_voltage": True, "under_voltage_since_boot": True,
                                      "freq_capped": False, "freq_capped_since_boot": False,
                                      "throttled": False, "throttled_since_boot": True,
                                      "soft_temp_limit": False, "soft_temp_limit_since_boot": False}
        assert first["rss_mb"] == pytest.approx(_vm(daemon.proc.pid, "VmRSS"), rel=0.25)
        assert first["rss_mb"] <= _vm(daemon.proc.pid, "VmHWM") + 1
        st = os.statvfs(tmp_path / "state")
        assert first["disk_free_mb"] == pytest.approx(st.f_bavail * st.f_frsize / 2**20, rel=0.05)
        assert first["load1"] == pytest.approx(float(Path("/proc/loadavg").read_text().split()[0]), abs=1.5)
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        assert uptime - 120 <= first["system_uptime_s"] <= uptime + 0.1  # reported to 0.1 s, some seconds ago
        assert 0 < first["uptime_s"] < 120 and first["spool"]["dropped"] == 0
        colors = first["pipelines"]["colors"]
        assert colors["state"] == "running" and colors["max_fps"] == 30.0 and colors["variant"] is None
        assert 0 < colors["invoke_ms"]["p50"] <= colors["invoke_ms"]["p95"]
        assert colors["latency_ms"]["p50"] <= colors["latency_ms"]["p95"] <= colors["latency_ms"]["p99"]
        assert first["governor"]["level"] == 0 and first["governor"]["thermal_soft_c"] == 60.0

        # Hot: the governor steps down to its deepest level; level 2 swaps in the cheaper variant.
        set_temperature(root, 64.0)
        hot = w.wait_json("/telemetry", lambda m: m[-1]["governor"]["level"] == 3
                          and m[-1]["pipelines"]["colors"]["variant"] == "colors_int8.tflite", timeout=60)[-1]
        assert hot["governor"]["pressure"] == "thermal" and "64.0 °C ≥ soft limit 60 °C" in hot["governor"]["reason"]
        assert hot["pipelines"]["colors"]["max_fps"] == 7.5  # levels 1 and 3 halve the fps, level 2 is the variant
        assert hot["governor"]["pipelines"]["colors"] == {"fps": 7.5, "capped": True,
                                                          "variant": "colors_int8.tflite", "paused": False}
        w.wait_json("/results/colors", lambda m: m[-1]["model"].get("variant") == "colors_int8.tflite", timeout=30)

        # Past the hard limit: paused, and the status says so.
        set_temperature(root, 71.0)
        paused = w.wait_json("/telemetry", lambda m: m[-1]["pipelines"]["colors"]["state"] == "paused",
                             timeout=60)[-1]
        assert paused["governor"]["paused"] is True and paused["pipelines"]["colors"]["fps"] == 0.0
        w.wait_json("/status", lambda m: m[-1]["pipelines"][0]["state"] == "paused", timeout=30)
        seq_paused = max(r["seq"] for r in w.json("/results/colors"))

        # Cool again: resumed, back to level 0 and the base model.
        set_temperature(root, 40.0)
        cool = w.wait_json("/telemetry", lambda m: m[-1]["governor"]["level"] == 0
                           and m[-1]["pipelines"]["colors"]["state"] == "running"
                           and m[-1]["pipelines"]["colors"]["variant"] is None, timeout=60)[-1]
        assert cool["governor"]["changes"] >= 8 and cool["pipelines"]["colors"]["max_fps"] == 30.0
        results = w.wait_json("/results/colors", lambda m: m[-1]["seq"] > seq_paused + 3
                              and "variant" not in m[-1]["model"], timeout=30)
        # One loop throughout: seq never skips or repeats across the swaps and the pause.
        assert [r["seq"] for r in results] == list(range(1, len(results) + 1))
        assert {r["model"].get("variant") for r in results} == {None, "colors_int8.tflite"}
        _rc, (status,) = fleet(broker.port, "cmd", "d-tel", "status")
        stats = status["result"]["pipeline_stats"]["colors"]
        assert stats["restarts"] == 0 and stats["pauses"] == 1 and stats["swaps"] == 2
        assert status["result"]["governor"]["level"] == 0
        _validate(w.json("/telemetry"))
        assert daemon.terminate() == 0
    log = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in log
    assert "governor: temperature 71.0 °C ≥ hard limit 70 °C: vision pipelines paused" in log


def test_telemetry_off(tmp_path: Path, broker: Broker, fixtures: Path) -> None:
    root = _fake_root(tmp_path, 45.0)
    config = write_config(tmp_path, broker.port, root, fixtures / "colors_int8.json", "d-quiet",
                          telemetry="enabled = false")
    with Watcher(broker.port, ["lepton/d-quiet/#"]) as w, Daemon(config) as daemon:
        w.wait_json("/results/colors", lambda m: len(m) >= 30, timeout=60)  # > 1 s of running
        assert w.json("/telemetry") == []
        assert daemon.terminate() == 0


def _ha_messages(w: Watcher) -> list[tuple[str, dict[str, Any]]]:
    return [(t, json.loads(p)) for t, p, _ in w.messages if t.startswith("homeassistant/") and t.endswith("/config")
            and p]


def _check_ha_config(topic: str, config: dict[str, Any]) -> None:
    """What Home Assistant's MQTT sensor discovery requires of a config."""
    import re

    m = re.fullmatch(r"homeassistant/sensor/([A-Za-z0-9_-]+)/([A-Za-z0-9_-]+)/config", topic)
    assert m, topic
    allowed = {"name", "unique_id", "state_topic", "value_template", "availability", "availability_mode",
               "payload_available", "payload_not_available", "device", "origin", "unit_of_measurement",
               "state_class", "device_class", "icon", "expire_after"}
    assert set(config) <= allowed, set(config) - allowed
    assert config["unique_id"] and config["name"]
    assert config["state_topic"] and not set("+#") & set(config["state_topic"])
    device = config["device"]
    assert device["identifiers"] and all(isinstance(i, str) for i in device["identifiers"]) and device["name"]
    assert config["availability"] and all(a["topic"] and not set("+#") & set(a["topic"])
                                          for a in config["availability"])
    if "device_class" in config:
        assert config["device_class"] in {"temperature", "duration"}
        assert config["unit_of_measurement"] in {"°C", "ms"}
    if "state_class" in config:
        assert config["state_class"] == "measurement" and "unit_of_measurement" in config


def _render(template: str, payload: bytes) -> str:
    # As Home Assistant renders value templates: Jinja2, the payload as `value` and parsed as `value_json`.
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    return env.from_string(template).render(value=payload.decode(), value_json=json.loads(payload)).strip()


def test_home_assistant_discovery(tmp_path: Path, fixtures: Path) -> None:
    root = _fake_root(tmp_path, 52.5)
    with Broker(tmp_path / "broker") as own:
        config = write_config(tmp_path, own.port, root, fixtures / "colors_int8.json", "d.ha",
                              extra="[homeassistant]\nenabled = true\n")
        with Watcher(own.port, ["homeassistant/#", "lepton/d.ha/#"]) as w, Daemon(config) as daemon:
            w.wait_json("/telemetry", lambda m: len(m) >= 2, timeout=60)
            w.wait_json("/results/colors", lambda m: len(m) >= 1, timeout=30)
            configs = dict(_ha_messages(w))
            objects = {t.split("/")[3] for t in configs}
            assert objects == {"cpu", "agent_cpu", "memory", "temperature", "governor_level", "colors_fps",
                               "colors_latency", "colors_last_result"}
            assert all(t.startswith("homeassistant/sensor/lepton_d_ha/") for t in configs)
            assert len({c["unique_id"] for c in configs.values()}) == len(configs)
            assert len({json.dumps(c["device"], sort_keys=True) for c in configs.values()}) == 1
            assert not any(retain for t, _, retain in w.messages if t.startswith("homeassistant/"))
            for topic, c in configs.items():
                _check_ha_config(topic, c)
            # The templates, rendered as Home Assistant would, give numbers and labels from the real payloads.
            latest = {t: p for t, p, _ in w.messages}
            values = {}
            for topic, c in configs.items():
                body = latest[c["state_topic"]]
                values[topic.split("/")[3]] = _render(c["value_template"], body)
                status = latest["lepton/d.ha/status"]
                assert _render(c["availability"][0]["value_template"], status) == c["payload_available"]
                assert _render(c["availability"][0]["value_template"],
                               b'{"state": "offline", "bdseq": 3}') == c["payload_not_available"]
                assert _render(c["availability"][0]["value_template"],
                               b'{"state": "stopped", "bdseq": 3}') == c["payload_not_available"]
            assert float(values["temperature"]) == 52.5
            for key in ("cpu", "agent_cpu", "memory", "colors_fps", "colors_latency", "governor_level"):
                float(values[key])
            assert values["colors_last_result"] in {"red", "green", "blue"}

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
            w2 = Watcher(own.port, ["homeassistant/#"]).start()
            try:
                assert w2.wait_for(lambda m: len([t for t, p, _ in m if t.endswith("/config") and p])
                                   >= len(configs), timeout=60)
            finally:
                w2.stop()
            assert before >= 2 * len(configs) + 3
            assert daemon.terminate() == 0
    assert "Traceback" not in (tmp_path / "agent.log").read_text()


def test_prometheus_endpoint(tmp_path: Path, broker: Broker, fixtures: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    root = _fake_root(tmp_path, 47.25)
    port = free_port()
    config = write_config(tmp_path, broker.port, root, fixtures / "colors_int8.json", "d-prom",
                          extra=f"[prometheus]\nenabled = true\nport = {port}\n")
    with Watcher(broker.port, ["lepton/d-prom/telemetry"]) as w, Daemon(config) as daemon:
        w.wait_json("/telemetry", lambda m: any(p["pipelines"]["colors"]["frames"] > 0 for p in m), timeout=60)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        sample = {f.name: f.samples[0] for f in families.values() if f.samples}
        assert sample["lepton_temperature_celsius"].value == 47.25
        assert sample["lepton_temperature_celsius"].labels == {"device": "d-prom"}
        assert families["lepton_pipeline_frames"].type == "counter"
        frames = next(s for s in families["lepton_pipeline_frames"].samples if s.name.endswith("_total"))
        assert frames.labels == {"device": "d-prom", "pipeline": "colors"} and frames.value > 0
        latency = families["lepton_pipeline_latency_seconds"].samples
        stages = {(s.labels["stage"], s.labels["quantile"]) for s in latency}
        assert {("total", "0.99"), ("invoke", "0.5"), ("pre", "0.95"), ("post", "0.5")} <= stages
        assert sample["lepton_agent_resident_bytes"].value > 10 * 2**20
        assert sample["lepton_governor_level"].value == 0.0
        assert daemon.terminate() == 0
    # Nothing listens once the agent is gone.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


@pytest.mark.parametrize(("extra", "fragments"), [
    ("[governor]\nfps_step = 2\n", ("governor.fps_step",)),
    ("[telemetry]\nring_size = 3\n", ("telemetry.ring_size",)),
    ("[telemetry]\nrot = '/'\n", ("telemetry.rot", "unknown key")),
    ("[homeassistant]\ndiscovery_prefix = 'home/assistant'\n", ("homeassistant.discovery_prefix",)),
    ("[prometheus]\nport = 0\n", ("prometheus.port",)),
    ("[profile]\ncpu_budget_percent = 150\n", ("profile.cpu_budget_percent",)),
])
def test_bad_reporting_settings(tmp_path: Path, fixtures: Path, extra: str, fragments: tuple[str, ...]) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\ndevice_id = "d"\n{extra}')
    r = run_cli("check-config", "--config", str(path))
    assert r.rc == 2 and len(r.err_lines) == 1 and "Traceback" not in r.err, r.err
    for fragment in (str(path), *fragments):
        assert fragment in r.err_lines[0], r.err_lines[0]


def test_prometheus_port_taken_or_extra_missing_is_bad_input(tmp_path: Path, fixtures: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = tmp_path / "agent.toml"
        config.write_text(f'[agent]\ndevice_id = "d"\nstate_dir = "{tmp_path / "state"}"\n'
                          f"[mqtt]\nbroker = 'mqtt://127.0.0.1:{free_port()}'\n"
                          f"[prometheus]\nenabled = true\nport = {port}\n")
        r = run_cli("run", "--config", str(config))
        assert r.rc == 2 and "Traceback" not in r.err
        assert r.err_lines == [f"lepton-agent: prometheus: cannot listen on 127.0.0.1:{port} "
                               "(Address already in use)"]
    # Without the extra installed (as on a device that never asked for it).
    code = ("import sys; sys.modules['prometheus_client'] = None; from agent.cli import agent_main; "
            f"sys.exit(agent_main(['run', '--config', {str(config)!r}]))")
    r2 = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                        check=False)
    assert r2.returncode == 2 and "Traceback" not in r2.stderr
    assert [x for x in r2.stderr.splitlines() if not x.startswith("INFO: ")] == [
        "lepton-agent: prometheus.enabled: the endpoint needs prometheus-client "
        "(pip install 'lepton-agent[prometheus]')"]
