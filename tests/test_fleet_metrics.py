"""The fleet-wide /metrics (`agent.fleet.metrics.render`): real `lepton-agent run` daemons on a real mosquitto feed
a FleetView; the exposition parses with the Prometheus client's own parser, passes `promtool check metrics`, and
carries every device with its labels (a device id with dots, an offline device), and the pipeline waiting for its
delivered model (only while its device is online); every expression of the Grafana dashboard names a series render()
emits."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import Broker
from conftest import ROOT
from delivery_kit import connect, unique_prefix
from test_daemon import Daemon
from test_telemetry_daemon import _fake_root, _promtool

from agent.fleet.metrics import families, render
from agent.fleet.watch import DeviceView, FleetView
from agent.mqtt.topics import FleetTopics

GRAFANA = ROOT / "docs" / "grafana-fleet.json"


DOOR = "doorbell"
"""The delivered model name each device's `door` pipeline runs by: no deployment of it ever comes, so it waits."""

WAITING = f"""
[[pipelines]]
name = "door"
source = "test:colors"
delivered = "{DOOR}"
"""


def _config(tmp: Path, port: int, prefix: str, fixtures: Path, device: str, groups: list[str],
            more: str = "") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    root = _fake_root(tmp, 51.5, "0x50000")  # throttled since boot, nothing now
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
device_id = "{device}"
groups = {json.dumps(groups)}
state_dir = "{tmp / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
prefix = "{prefix}"
keepalive_s = 5
[profile]
telemetry_interval_s = 1
[telemetry]
root = "{root}"
[[pipelines]]
name = "colors"
source = "test:colors"
model = "{fixtures / 'colors_int8.json'}"
threshold = 0.0
[pipelines.source_options]
fps = 10
width = 64
height = 48
{more}""")
    return path


def _wait(view: FleetView, predicate: Callable[[dict[str, DeviceView]], bool], timeout: float = 60) -> None:
    with view.cond:
        assert view.cond.wait_for(lambda: predicate(view.devices), timeout), {
            d: (v.presence, v.telemetry is not None) for d, v in view.devices.items()}


def _measured(devices: dict[str, DeviceView], device: str) -> bool:
    d = devices.get(device)
    if d is None or d.presence != "yes" or d.telemetry is None:
        return False
    return (d.telemetry.get("pipelines") or {}).get("colors", {}).get("latency_ms", {}).get("p95") is not None


def _samples(text: str) -> dict[str, list[Any]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _one(samples: dict[str, list[Any]], name: str, **labels: str) -> Any:
    found = [s for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def test_fleet_metrics_from_live_daemons(tmp_path: Path, broker: Broker, fixtures: Path) -> None:
    prefix = unique_prefix()
    dotted = _config(tmp_path / "a", broker.port, prefix, fixtures, "cam.a", ["porch", "hall"], WAITING)
    other = _config(tmp_path / "b", broker.port, prefix, fixtures, "d-yard", ["yard"], WAITING)
    link = connect(broker.port)
    try:
        view = FleetView(link, FleetTopics(prefix), telemetry=True)
        with Daemon(dotted) as a, Daemon(other) as b:
            _wait(view, lambda ds: _measured(ds, "cam.a") and _measured(ds, "d-yard")
                  and ds["d-yard"].waiting_for_model == {"door": DOOR})
            assert b.terminate() == 0  # a clean stop: its retained status says `stopped`
            _wait(view, lambda ds: ds["d-yard"].presence == "no")
            body, content_type = render(view)
            live = view.snapshot()
            assert a.terminate() == 0
    finally:
        link.close()

    assert content_type.startswith("text/plain; version=")
    text = body.decode()
    _promtool(text)
    s = _samples(text)
    assert {(x.labels["presence"], x.value) for x in s["lepton_fleet_devices"]} == {
        ("yes", 1.0), ("no", 1.0), ("stale", 0.0), ("?", 0.0)}
    # The dotted id as configured (its topics carry it encoded), groups in name order, the class from its birth.
    a_labels = {"device": "cam.a", "group": "hall,porch", "class": "generic-x86_64"}
    b_labels = {"device": "d-yard", "group": "yard", "class": "generic-x86_64"}
    info = _one(s, "lepton_device_info", device="cam.a")
    assert info.labels == {**a_labels, "agent": info.labels["agent"], "backend": info.labels["backend"]}
    assert info.labels["backend"] and info.labels["agent"]
    assert {(x.labels["device"], x.labels["group"]) for x in s["lepton_device_group"]} == {
        ("cam.a", "hall"), ("cam.a", "porch"), ("d-yard", "yard")}
    assert _one(s, "lepton_device_online", **a_labels).value == 1.0
    assert _one(s, "lepton_device_online", **b_labels).value == 0.0
    assert _one(s, "lepton_device_stale", **a_labels).value == 0.0
    assert _one(s, "lepton_device_last_seen_timestamp_seconds", **a_labels).value > 0
    # The pipeline waiting for its delivered model, with the name it waits for: none for the running one, and none
    # for the stopped device's, which waited too while it was online.
    (door,) = s["lepton_pipeline_waiting_for_model"]
    assert (door.labels, door.value) == ({**a_labels, "pipeline": "door", "model": DOOR}, 1.0)
    model = _one(s, "lepton_pipeline_model_info", device="cam.a")
    assert model.labels == {**a_labels, "pipeline": "colors", "model": "colors", "version": "1", "variant": ""}

    # The live device's figures, as its last telemetry payload says them, in base units.
    payload = next(d.telemetry for d in live if d.device == "cam.a")
    assert payload is not None
    assert _one(s, "lepton_temperature_celsius", **a_labels).value == 51.5
    assert _one(s, "lepton_agent_resident_bytes", **a_labels).value == round(payload["rss_mb"] * 2**20)
    assert _one(s, "lepton_throttled", **a_labels, flag="throttled", when="since_boot").value == 1.0
    assert _one(s, "lepton_throttled", **a_labels, flag="throttled", when="now").value == 0.0
    assert _one(s, "lepton_governor_level", **a_labels).value == payload["governor"]["level"]
    assert _one(s, "lepton_spool_queued", **a_labels).value == payload["spool"]["queued"]
    colors = payload["pipelines"]["colors"]
    assert _one(s, "lepton_pipeline_items_per_second", **a_labels, pipeline="colors").value == colors["fps"]
    for stage, key in (("total", "latency_ms"), ("pre", "pre_ms"), ("invoke", "invoke_ms"), ("post", "post_ms")):
        p95 = _one(s, "lepton_pipeline_latency_seconds", **a_labels, pipeline="colors", stage=stage, percentile="95")
        assert p95.value == round(colors[key]["p95"] / 1000, 6)
    # The stopped device keeps its labels, presence and model, but no figure that would stand as current.
    assert _one(s, "lepton_pipeline_model_info", device="d-yard").labels["group"] == "yard"
    figures = ("lepton_cpu_usage_ratio", "lepton_temperature_celsius", "lepton_pipeline_items_per_second",
               "lepton_pipeline_latency_seconds", "lepton_governor_level", "lepton_spool_queued")
    assert not [x for name in figures for x in s[name] if x.labels["device"] == "d-yard"]

    _grafana_names_are_emitted(text, payload)


def _grafana_names_are_emitted(live_text: str, payload: dict[str, Any]) -> None:
    """Every metric an expression of docs/grafana-fleet.json names is one render() emits: the live scrape's, plus
    a camera's source series (live sources only: the same real payload with a `source` as a camera has) and a
    deployment's (the retained deploy state docs/delivery.md §6 defines, here mid-download)."""
    camera = copy.deepcopy(payload)
    camera["pipelines"]["colors"]["source"] = {"state": "connected", "since": payload["ts"], "reopens": 1,
                                               "errors": 0, "last_error": None, "grabbed": 10, "decoded": 10}
    birth = {"state": "online", "ts": payload["ts"], "heartbeat_s": 60}
    deploy = {"model": "colors", "version": "2.0.1", "state": "downloading", "progress": 0.25, "reason": None,
              "id": "r1", "ts": payload["ts"], "v": 1}
    cam = DeviceView("cam", online=True, status=birth, birth=birth, telemetry=camera, state=deploy)
    from prometheus_client import CollectorRegistry, generate_latest

    class Collector:
        def collect(self) -> Any:
            yield from families([cam])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    extra = _samples(generate_latest(registry).decode())
    labels = {"device": "cam", "group": "", "class": payload["profile"], "model": "colors", "version": "2.0.1"}
    assert _one(extra, "lepton_deploy_state", **labels).labels["state"] == "downloading"
    assert _one(extra, "lepton_deploy_progress_ratio", **labels).value == 0.25
    assert _one(extra, "lepton_source_reopens_total", device="cam", pipeline="colors").value == 1.0
    emitted = set(_samples(live_text)) | set(extra)
    dashboard = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    named = {m for e in exprs for m in re.findall(r"\blepton_[a-z0-9_]+", e)}
    assert len(exprs) > 15 and named, exprs
    assert named <= emitted, named - emitted
