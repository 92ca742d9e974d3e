"""An optional Prometheus endpoint serving the telemetry figures (the `prometheus` extra).

`prometheus-client` is imported only when the endpoint is enabled. A scrape reads the
monitor's latest telemetry payload (refreshed every telemetry interval) through a custom
collector, so a scrape costs no sampling and the figures are the ones MQTT carries.
Units follow Prometheus' conventions: seconds, whole bytes, 0-1 ratios instead of percent;
counters end in `_total`; a figure with no value (no thermal zone, no latency sample yet) has
no sample rather than a 0.

`Families` and `add_telemetry` are shared with the fleet-wide exposition (`agent.fleet.metrics`): the same
names and units for one device's payload here and for every device's there, only the labels differ.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from agent import __version__
from agent.errors import BadInput

logger = logging.getLogger(__name__)

Latest = Callable[[], dict[str, Any] | None]

_PERCENTILES = {"p50": "50", "p95": "95", "p99": "99"}


def _ratio(percent: Any) -> float | None:
    """A 0-100 figure as Prometheus' 0-1 ratio, without float noise (0.5 %: 0.005, not 0.005000000000000001)."""
    return round(percent / 100.0, 6) if _number(percent) else None


def _bytes(mib: Any) -> int | None:
    # The payload carries MiB to 0.1; Prometheus counts whole bytes.
    return round(mib * 2**20) if _number(mib) else None


def _seconds(ms: Any) -> float | None:
    # Milliseconds come rounded to 3 decimals, so 6 decimals of seconds keep every digit and drop the noise.
    return round(ms / 1000.0, 6) if _number(ms) else None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Families:
    """Metric families built sample by sample: each name made once (an exposition may name a family only once),
    in the order first used, with the labels of its first sample. A value that is not a number adds nothing."""

    def __init__(self) -> None:
        self._by_name: dict[str, Any] = {}

    def gauge(self, name: str, doc: str, labels: dict[str, str], value: Any) -> None:
        self._add("gauge", name, doc, labels, value)

    def counter(self, name: str, doc: str, labels: dict[str, str], value: Any) -> None:
        self._add("counter", name, doc, labels, value)

    def declare(self, kind: str, name: str, doc: str, labels: list[str]) -> None:
        """A family that is served (with its HELP and TYPE) even while it has no sample."""
        if name not in self._by_name:
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            self._by_name[name] = cls(name, doc, labels=labels)

    def _add(self, kind: str, name: str, doc: str, labels: dict[str, str], value: Any) -> None:
        if not _number(value):
            return
        self.declare(kind, name, doc, list(labels))
        self._by_name[name].add_metric(list(labels.values()), float(value))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._by_name.values())


def add_telemetry(fams: Families, payload: dict[str, Any], base: dict[str, str]) -> None:
    """One telemetry payload's figures as samples labelled `base` (+ flag/when, pipeline, stage/percentile)."""
    fams.gauge("lepton_cpu_usage_ratio", "Machine CPU use (0-1)", base, _ratio(payload.get("cpu_percent")))
    fams.gauge("lepton_agent_cpu_usage_ratio", "The agent's share of all cores (0-1)", base,
               _ratio(payload.get("agent_cpu_percent")))
    fams.gauge("lepton_load1", "1-minute load average", base, payload.get("load1"))
    fams.gauge("lepton_memory_used_ratio", "Machine memory in use (0-1)", base, _ratio(payload.get("mem_percent")))
    fams.gauge("lepton_agent_resident_bytes", "The agent's resident memory", base, _bytes(payload.get("rss_mb")))
    fams.gauge("lepton_temperature_celsius", "SoC temperature", base, payload.get("temp_c"))
    fams.gauge("lepton_disk_free_bytes", "Free space where the agent keeps its state", base,
               _bytes(payload.get("disk_free_mb")))
    fams.gauge("lepton_agent_uptime_seconds", "Seconds since the agent started", base, payload.get("uptime_s"))
    throttled = payload.get("throttled")
    if isinstance(throttled, dict):
        for key, value in throttled.items():
            flag, when = (key[: -len("_since_boot")], "since_boot") if key.endswith("_since_boot") else (key, "now")
            fams.gauge("lepton_throttled", "Raspberry Pi firmware throttle flags (1: set)",
                       {**base, "flag": flag, "when": when}, 1.0 if value else 0.0)
    governor = payload.get("governor") or {}
    fams.gauge("lepton_governor_level", "Governor pressure level (0: full speed)", base, governor.get("level"))
    fams.gauge("lepton_governor_paused", "1 while the governor pauses vision loops", base,
               1.0 if governor.get("paused") else 0.0)
    spool = payload.get("spool") or {}
    fams.gauge("lepton_spool_queued", "Results waiting for the broker", base, spool.get("queued"))
    fams.counter("lepton_spool_dropped", "Results dropped because the spool was full", base,
                 float(spool.get("dropped") or 0))

    pipelines: dict[str, Any] = payload.get("pipelines") or {}
    for name, p in pipelines.items():
        if not isinstance(p, dict):
            continue
        labels = {**base, "pipeline": name}
        source = p.get("source")
        if source:  # live sources only (cameras, streams)
            fams.gauge("lepton_source_connected", "1 while the camera or stream is open, 0 while it is being "
                       "(re)connected or refused", labels, 1.0 if source.get("state") == "connected" else 0.0)
            fams.counter("lepton_source_reopens", "Attempts to reopen the camera or stream", labels,
                         float(source.get("reopens", 0)))
        fams.gauge("lepton_pipeline_items_per_second", "Items processed per second, smoothed", labels,
                   float(p.get("fps", 0.0)))
        fams.gauge("lepton_pipeline_max_items_per_second", "The item rate limit in force (governed)", labels,
                   float(p.get("max_fps", 0.0)))
        fams.counter("lepton_pipeline_frames", "Items processed", labels, float(p.get("frames", 0)))
        fams.counter("lepton_pipeline_dropped", "Items not processed (fps limit, stale frames)", labels,
                     float(p.get("dropped", 0)))
        for stage, key in (("total", "latency_ms"), ("pre", "pre_ms"), ("invoke", "invoke_ms"), ("post", "post_ms")):
            for q, value in (p.get(key) or {}).items():
                # A gauge per percentile, not a summary: the rings give a window's percentiles but no _sum/_count.
                # Its label is `percentile`, since Prometheus reserves `quantile` for summaries (promtool refuses
                # it here). No sample yet: no series, not 0 s.
                if q in _PERCENTILES:
                    fams.gauge("lepton_pipeline_latency_seconds", "Per-item latency percentile over the recent "
                               "window (absent until the pipeline has processed an item)",
                               {**labels, "stage": stage, "percentile": _PERCENTILES[q]}, _seconds(value))


def waiting_in(payload: dict[str, Any]) -> dict[str, str]:
    """Pipeline → the delivered model name it waits for, as a telemetry payload says (`waiting_for_model`)."""
    pipelines = payload.get("pipelines")
    return {name: p["delivered"] for name, p in (pipelines.items() if isinstance(pipelines, dict) else ())
            if isinstance(p, dict) and p.get("state") == "waiting_for_model" and isinstance(p.get("delivered"), str)}


def add_waiting(fams: Families, base: dict[str, str], waiting: dict[str, str]) -> None:
    """`lepton_pipeline_waiting_for_model` for each pipeline → model name in `waiting`. Only waiting pipelines
    have a series: a pipeline stops waiting when its model is deployed, and then its series goes (no 0 kept)."""
    for pipeline, model in sorted(waiting.items()):
        fams.gauge("lepton_pipeline_waiting_for_model", "1 while the pipeline waits for a deployment of the "
                   "delivered model it names (no series otherwise)", {**base, "pipeline": pipeline, "model": model},
                   1.0)


def _info(device: str) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    fam = GaugeMetricFamily("lepton_agent_info", "The agent serving these figures (always 1)",
                            labels=["device", "version"])
    fam.add_metric([device, __version__], 1.0)
    return fam

class PrometheusEndpoint:
    """`GET /metrics` on host:port with the latest telemetry; `start()`, `close()`."""

    def __init__(self, host: str, port: int, device: str, latest: Latest) -> None:
        self.host, self.port, self.device, self.latest = host, port, device, latest
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise BadInput("prometheus.enabled: the endpoint needs prometheus-client "
                           "(pip install 'lepton-agent[prometheus]')") from None
        endpoint = self

        class Collector:
            def collect(self) -> Iterator[Any]:
                # Before the first telemetry payload (~2 s after start) only the info series: a scrape
                # then is not an empty body, and absent figures are absent, not zeros.
                yield _info(endpoint.device)
                payload = endpoint.latest()
                if payload is not None:
                    fams = Families()
                    add_telemetry(fams, payload, {"device": endpoint.device})
                    add_waiting(fams, {"device": endpoint.device}, waiting_in(payload))
                    yield from fams

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector())
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=registry)
        except OSError as exc:
            raise BadInput(f"prometheus: cannot listen on {self.host}:{self.port} ({exc.strerror})") from None
        logger.info("prometheus endpoint on http://%s:%d/metrics", self.host, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(2.0)
