"""Telemetry from the running daemon over a real mosquitto: the schema, values against /proc, a fake
thermal zone driving the governor through variant swap, pause and recovery with results' seq
continuous; the Prometheus endpoint checked by promtool (Home Assistant: test_homeassistant.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from broker import Broker, Watcher, free_port, wait_until
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


IDLE_PIPELINES = """
[[pipelines]]
name = "idle.a"
source = "test:colors"
model = "{model}"
enabled = false

[[pipelines]]
name = "idle_a"
source = "test:colors"
model = "{model}"
enabled = false
"""
"""Two pipelines that never run (no latency sample) and whose names the old ids confused."""


def _promtool(text: str) -> None:
    """`promtool check metrics` (Prometheus 2.42, Debian's package; scripts/lib.sh installs it): clean."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: scripts/test installs it (ensure_promtool)")
        pytest.skip("promtool not installed (scripts/test installs it)")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60,
                       check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (r.stdout, r.stderr)


class PrometheusServer:
    """Debian's Prometheus 2.42 scraping the agent's endpoint every second, queried over its HTTP API."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("prometheus is missing: scripts/test installs it (ensure_promtool)")
            pytest.skip("prometheus not installed (scripts/test installs it)")
        config = tmp / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: lepton\n"
                          f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n")
        self.port = free_port()
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        except OSError:
            return []  # not listening yet
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait(self, promql: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            nonlocal found
            found = self.query(promql)
            return bool(found)

        assert wait_until(check, timeout=timeout, step=0.25), f"prometheus never had {promql}"
        return found

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def test_prometheus_endpoint(tmp_path: Path, broker: Broker, fixtures: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    root = _fake_root(tmp_path, 47.25)
    port = free_port()
    config = write_config(tmp_path, broker.port, root, fixtures / "colors_int8.json", "d-prom",
                          extra=f"[prometheus]\nenabled = true\nport = {port}\n")
    # `door` names a delivered model no deployment ever brings: it waits, and says for which model.
    config.write_text(config.read_text() + IDLE_PIPELINES.format(model=fixtures / "colors_int8.json")
                      + '[[pipelines]]\nname = "door"\nsource = "test:colors"\ndelivered = "doorbell"\n')
    with Watcher(broker.port, ["lepton/d-prom/telemetry"]) as w, Daemon(config) as daemon:
        w.wait_json("/telemetry", lambda m: any(p["pipelines"]["colors"]["frames"] > 0 for p in m), timeout=60)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        _promtool(text)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        sample = {f.name: f.samples[0] for f in families.values() if f.samples}
        assert sample["lepton_temperature_celsius"].value == 47.25
        assert sample["lepton_temperature_celsius"].labels == {"device": "d-prom"}
        assert sample["lepton_agent_info"].labels["device"] == "d-prom"
        assert families["lepton_pipeline_frames"].type == "counter"
        frames = next(s for s in families["lepton_pipeline_frames"].samples if s.name.endswith("_total"))
        assert frames.labels == {"device": "d-prom", "pipeline": "colors"} and frames.value > 0
        latency = families["lepton_pipeline_latency_seconds"].samples
        stages = {(s.labels["pipeline"], s.labels["stage"], s.labels["percentile"]) for s in latency}
        assert {("colors", "total", "99"), ("colors", "invoke", "50"), ("colors", "pre", "95"),
                ("colors", "post", "50")} <= stages
        # The idle pipelines have no latency sample: no series (not 0 s); their item rate is a true 0.
        assert {p for p, _, _ in stages} == {"colors"}
        rates = {s.labels["pipeline"]: s.value for s in families["lepton_pipeline_items_per_second"].samples}
        assert rates["idle.a"] == rates["idle_a"] == 0.0
        # Prometheus units: 0-1 ratios, whole bytes, no float noise in seconds.
        for name in ("lepton_cpu_usage_ratio", "lepton_agent_cpu_usage_ratio", "lepton_memory_used_ratio"):
            assert 0.0 <= sample[name].value <= 1.0
        assert sample["lepton_memory_used_ratio"].value > 0.0
        for name in ("lepton_agent_resident_bytes", "lepton_disk_free_bytes"):
            assert sample[name].value == int(sample[name].value) > 10 * 2**20
        assert all(len(repr(s.value)) <= 10 for s in latency), [s.value for s in latency]
        assert sample["lepton_governor_level"].value == 0.0
        # Only the waiting pipeline has a series, with the delivered name it waits for.
        waiting = families["lepton_pipeline_waiting_for_model"].samples
        assert [(s.labels, s.value) for s in waiting] == [
            ({"device": "d-prom", "pipeline": "door", "model": "doorbell"}, 1.0)]

        # A real Prometheus server scrapes it: the target is up, series carry their labels, no value is absent.
        server = PrometheusServer(tmp_path, port)
        try:
            server.wait('up{job="lepton"} == 1')
            p99 = server.wait('lepton_pipeline_latency_seconds{stage="total", percentile="99"}')
            assert [(r["metric"]["device"], r["metric"]["pipeline"]) for r in p99] == [("d-prom", "colors")]
            assert float(p99[0]["value"][1]) > 0
            assert server.query('lepton_pipeline_latency_seconds{pipeline=~"idle.*"}') == []
            scraped = server.wait("lepton_pipeline_items_per_second")
            assert {r["metric"]["pipeline"] for r in scraped} == {"colors", "idle.a", "idle_a", "door"}
            door = server.wait("lepton_pipeline_waiting_for_model")
            assert [(r["metric"]["pipeline"], r["metric"]["model"]) for r in door] == [("door", "doorbell")]
            ratio = server.wait("lepton_memory_used_ratio")
            assert 0 < float(ratio[0]["value"][1]) < 1
        finally:
            server.close()
        # Discovery is off now, but an earlier run may have announced the device: retire empties it all the same.
        with Watcher(broker.port, ["homeassistant/sensor/lepton_d-prom/#"]) as ha:
            rc, (report,) = fleet(broker.port, "retire", "d-prom")
            assert rc == 0 and report["by"] == "agent" and report["ok"], report
            emptied = set(report["result"]["configs_emptied"])
            assert len(emptied) == 5 + 4 * 4  # the telemetry sensors; fps, latency, last result, camera per pipeline
            assert ha.wait_for(lambda m: {t for t, p, _ in m if not p} == emptied, 30)
        assert daemon.terminate() == 0
    # Nothing listens once the agent is gone.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_prometheus_before_the_first_telemetry() -> None:
    """A scrape before the first telemetry payload (~2 s after start): not an empty body, and promtool-clean."""
    from prometheus_client.parser import text_string_to_metric_families

    from agent.prometheus import PrometheusEndpoint

    latest: list[dict[str, Any]] = []
    port = free_port()
    endpoint = PrometheusEndpoint("127.0.0.1", port, "d.x", lambda: latest[-1] if latest else None)
    endpoint.start()
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        _promtool(text)
        assert [f.name for f in text_string_to_metric_families(text)] == ["lepton_agent_info"]
        # A payload as the monitor builds it for a pipeline with no sample yet and a board without sensors.
        none = {"p50": None, "p95": None}
        latest.append({"cpu_percent": 12.3, "agent_cpu_percent": 0.5, "mem_percent": 41.0, "rss_mb": 63.1,
                       "temp_c": None, "throttled": None, "disk_free_mb": 1024.7, "uptime_s": 1.9,
                       "governor": {"level": 0, "paused": False}, "spool": {"queued": 0, "dropped": 0},
                       "pipelines": {"cam.a": {"fps": 0.0, "max_fps": 5.0, "frames": 0, "dropped": 0,
                                               "latency_ms": {**none, "p99": None}, "pre_ms": none,
                                               "invoke_ms": none, "post_ms": {"p50": 0.139, "p95": None}}}})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        _promtool(text)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert "lepton_temperature_celsius" not in families and "lepton_throttled" not in families
        assert [(s.labels["stage"], s.labels["percentile"], s.value)
                for s in families["lepton_pipeline_latency_seconds"].samples] == [("post", "50", 0.000139)]
        assert "0.000139\n" in text and "0.00013900000000000002" not in text
        assert families["lepton_agent_cpu_usage_ratio"].samples[0].value == 0.005
        assert families["lepton_agent_resident_bytes"].samples[0].value == round(63.1 * 2**20)
    finally:
        endpoint.close()


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
