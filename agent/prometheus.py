"""An optional Prometheus endpoint serving the telemetry figures (the `prometheus` extra).

`prometheus-client` is imported only when the endpoint is enabled. A scrape reads the
monitor's latest telemetry payload (refreshed every telemetry interval) through a custom
collector, so a scrape costs no sampling and the figures are the ones MQTT carries.
Units follow Prometheus' conventions: seconds and bytes; counters end in `_total`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from agent.errors import BadInput

logger = logging.getLogger(__name__)

Latest = Callable[[], dict[str, Any] | None]

_QUANTILES = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}


def _families(payload: dict[str, Any], device: str) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield from _gauge(GaugeMetricFamily, "lepton_cpu_percent", "Machine CPU use, percent", device,
                      payload.get("cpu_percent"))
    yield from _gauge(GaugeMetricFamily, "lepton_agent_cpu_percent", "The agent's share of all cores, percent",
                      device, payload.get("agent_cpu_percent"))
    yield from _gauge(GaugeMetricFamily, "lepton_load1", "1-minute load average", device, payload.get("load1"))
    yield from _gauge(GaugeMetricFamily, "lepton_memory_used_percent", "Machine memory in use, percent", device,
                      payload.get("mem_percent"))
    rss = payload.get("rss_mb")
    yield from _gauge(GaugeMetricFamily, "lepton_agent_resident_bytes", "The agent's resident memory", device,
                      None if rss is None else rss * 2**20)
    yield from _gauge(GaugeMetricFamily, "lepton_temperature_celsius", "SoC temperature", device,
                      payload.get("temp_c"))
    disk = payload.get("disk_free_mb")
    yield from _gauge(GaugeMetricFamily, "lepton_disk_free_bytes", "Free space where the agent keeps its state",
                      device, None if disk is None else disk * 2**20)
    yield from _gauge(GaugeMetricFamily, "lepton_agent_uptime_seconds", "Seconds since the agent started", device,
                      payload.get("uptime_s"))
    throttled = payload.get("throttled")
    if isinstance(throttled, dict):
        fam = GaugeMetricFamily("lepton_throttled", "Raspberry Pi firmware throttle flags (1: set)",
                                labels=["device", "flag", "when"])
        for key, value in throttled.items():
            flag, when = (key[: -len("_since_boot")], "since_boot") if key.endswith("_since_boot") else (key, "now")
            fam.add_metric([device, flag, when], 1.0 if value else 0.0)
        yield fam
    governor = payload.get("governor") or {}
    yield from _gauge(GaugeMetricFamily, "lepton_governor_level", "Governor pressure level (0: full speed)", device,
                      governor.get("level"))
    yield from _gauge(GaugeMetricFamily, "lepton_governor_paused", "1 while the governor pauses vision loops",
                      device, 1.0 if governor.get("paused") else 0.0)
    spool = payload.get("spool") or {}
    yield from _gauge(GaugeMetricFamily, "lepton_spool_queued", "Results waiting for the broker", device,
                      spool.get("queued"))
    dropped = CounterMetricFamily("lepton_spool_dropped", "Results dropped because the spool was full",
                                  labels=["device"])
    dropped.add_metric([device], float(spool.get("dropped") or 0))
    yield dropped

    pipelines: dict[str, Any] = payload.get("pipelines") or {}
    fps = GaugeMetricFamily("lepton_pipeline_fps", "Items processed per second", labels=["device", "pipeline"])
    cap = GaugeMetricFamily("lepton_pipeline_max_fps", "The fps limit in force (governed)",
                            labels=["device", "pipeline"])
    frames = CounterMetricFamily("lepton_pipeline_frames", "Items processed", labels=["device", "pipeline"])
    drops = CounterMetricFamily("lepton_pipeline_dropped", "Items not processed (fps limit, stale frames)",
                                labels=["device", "pipeline"])
    latency = GaugeMetricFamily("lepton_pipeline_latency_seconds", "Per-item latency over the recent window",
                                labels=["device", "pipeline", "stage", "quantile"])
    up = GaugeMetricFamily("lepton_source_connected", "1 while the camera or stream is open, 0 while it is being "
                           "(re)connected or refused", labels=["device", "pipeline"])
    reopens = CounterMetricFamily("lepton_source_reopens", "Attempts to reopen the camera or stream",
                                  labels=["device", "pipeline"])
    for name, p in pipelines.items():
        source = p.get("source")
        if source:  # live sources only (cameras, streams)
            up.add_metric([device, name], 1.0 if source.get("state") == "connected" else 0.0)
            reopens.add_metric([device, name], float(source.get("reopens", 0)))
        fps.add_metric([device, name], float(p.get("fps", 0.0)))
        cap.add_metric([device, name], float(p.get("max_fps", 0.0)))
        frames.add_metric([device, name], float(p.get("frames", 0)))
        drops.add_metric([device, name], float(p.get("dropped", 0)))
        for stage, key in (("total", "latency_ms"), ("pre", "pre_ms"), ("invoke", "invoke_ms"), ("post", "post_ms")):
            for q, value in (p.get(key) or {}).items():
                if q in _QUANTILES:
                    latency.add_metric([device, name, stage, _QUANTILES[q]], float(value) / 1000.0)
    yield from (fps, cap, frames, drops, latency, up, reopens)


def _gauge(cls: Any, name: str, doc: str, device: str, value: Any) -> Iterator[Any]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        fam = cls(name, doc, labels=["device"])
        fam.add_metric([device], float(value))
        yield fam


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
                payload = endpoint.latest()
                if payload is not None:
                    yield from _families(payload, endpoint.device)

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
