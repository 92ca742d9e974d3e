"""The whole fleet in one Prometheus scrape: `render(view)` for the dashboard's `GET /metrics`.

A fleet behind NAT cannot be scraped device by device; the dashboard already hears every device's status,
telemetry and deploy state over its one MQTT connection, so it serves them all. The figures are the per-device
exporter's (`agent.prometheus.add_telemetry`: same names, same units) with `device`, `group` and `class` on every
series, plus what only the fleet side knows: presence, last seen, deploy state, the model each pipeline runs, and
the pipelines waiting for a delivered model (`lepton_pipeline_waiting_for_model`, from the status, as the dashboard).

- `group` is the device's groups joined with `,` in name order (`""` for none), so each device's series stand
  once; `lepton_device_group{device, group}` lists each membership on its own, for a Grafana variable.
  Match one group with `group=~"(.*,)?hall(,.*)?"`.
- `class` is the device class (profile) of its last birth, else of its telemetry.
- Figures are served only for a device that is online and not stale: a gone device's last figures would stand
  in Prometheus as if current. Its presence, last seen, models and deploy state stay.

Docs: docs/telemetry.md (Fleet-wide metrics); Grafana: docs/grafana-fleet.json.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from agent.fleet.watch import DeviceView, FleetView
from agent.prometheus import Families, add_telemetry, add_waiting

PRESENCES = ("yes", "stale", "no", "?")
"""DeviceView.presence: online, online but its heartbeat stopped, offline or stopped, no status heard."""


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _groups(d: DeviceView) -> list[str]:
    groups = (d.birth or {}).get("groups")
    return sorted({str(g) for g in groups}) if isinstance(groups, list) else []


def _class(d: DeviceView) -> str:
    return _text((d.birth or {}).get("profile") or (d.telemetry or {}).get("profile"))


def _pipelines(d: DeviceView) -> list[dict[str, Any]]:
    pipelines = (d.birth or {}).get("pipelines")
    return [p for p in pipelines if isinstance(p, dict) and p.get("name")] if isinstance(pipelines, list) else []


def add_device(fams: Families, d: DeviceView) -> None:
    base = {"device": d.device, "group": ",".join(_groups(d)), "class": _class(d)}
    birth = d.birth or {}
    fams.gauge("lepton_device_info", "The device's agent and backend, from its last birth (always 1)",
               {**base, "agent": _text(birth.get("agent")), "backend": _text(birth.get("backend"))}, 1.0)
    for group in _groups(d):
        fams.gauge("lepton_device_group", "One group the device belongs to (always 1)",
                   {"device": d.device, "group": group}, 1.0)
    live = d.presence == "yes"
    fams.gauge("lepton_device_online", "1 while the device's status is online and its heartbeat current", base,
               1.0 if live else 0.0)
    fams.gauge("lepton_device_stale", "1 while the status says online but the heartbeat stopped (node gone)",
               base, 1.0 if d.presence == "stale" else 0.0)
    fams.gauge("lepton_device_last_seen_timestamp_seconds", "Unix time of the device's newest status or telemetry",
               base, d.last_seen)

    variants = {name: p.get("variant") for name, p in ((d.telemetry or {}).get("pipelines") or {}).items()
                if isinstance(p, dict)} if live else {}
    for p in _pipelines(d):
        model = p.get("model")
        if not isinstance(model, dict):
            continue
        name = str(p["name"])
        # Telemetry is newer than the birth about the variant: the governor swaps without a new birth.
        variant = variants[name] if name in variants else model.get("variant")
        fams.gauge("lepton_pipeline_model_info", "The model, version and variant file a pipeline runs (always 1; "
                   "variant empty for the manifest's own model)",
                   {**base, "pipeline": name, "model": _text(model.get("name")),
                    "version": _text(model.get("version")), "variant": _text(variant)}, 1.0)

    # From the status, as the dashboard's "waiting" (not telemetry): it is known from the birth on.
    add_waiting(fams, base, d.waiting_for_model)

    state = d.state
    if state is not None and state.get("model") is not None:
        labels = {**base, "model": _text(state.get("model")), "version": _text(state.get("version"))}
        fams.gauge("lepton_deploy_state", "The device's latest deployment and its state (always 1)",
                   {**labels, "state": _text(state.get("state"))}, 1.0)
        fams.gauge("lepton_deploy_progress_ratio", "Progress of the device's latest deployment (0-1)", labels,
                   state.get("progress"))

    if live and d.telemetry is not None:
        add_telemetry(fams, d.telemetry, base)


def families(devices: list[DeviceView]) -> Iterator[Any]:
    fams = Families()
    counts = Counter(d.presence for d in devices)
    for presence in PRESENCES:  # every presence, 0 too: a stat panel shows 0 offline, not "no data"
        fams.gauge("lepton_fleet_devices", "Devices known to the fleet view, by presence (yes: online, stale: "
                   "heartbeat stopped, no: offline or stopped, ?: no status heard)",
                   {"presence": presence}, float(counts[presence]))
    for d in devices:
        add_device(fams, d)
    yield from fams


def render(view: FleetView) -> tuple[bytes, str]:
    """The fleet's metrics in the Prometheus text format: (body, content type) for an HTTP response. At 1,000
    devices this is ~0.3 s of CPU (3.9 MB): an async server calls it in an executor, not on its event loop."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    devices = view.snapshot()

    class Collector:
        def collect(self) -> Iterator[Any]:
            yield from families(devices)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
