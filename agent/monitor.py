"""The agent watching itself: one thread that ticks the governor and publishes telemetry.

Every `governor.interval_s` it reads the SoC temperature, the firmware's throttle flags
and the agent's CPU share and lets the governor act; every telemetry interval (the
profile's `telemetry_interval_s`) it builds the telemetry payload (docs/telemetry.md),
keeps it as `latest` (the Prometheus endpoint serves it) and publishes it on
`lepton/<dev>/telemetry`. A tick that fails is logged and counted, and the loop carries on
after a short backoff; every wait is on the agent's stop event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.governor import Governor, Reading, disabled_state
from agent.pipeline import Pipeline
from agent.telemetry import CpuShare, SystemSampler, read_temperature, read_throttled

logger = logging.getLogger(__name__)

BACKOFF_S = (1.0, 30.0)
"""Wait after a failed tick: doubles from the first to the second."""


def pipeline_figures(p: Pipeline) -> dict[str, Any]:
    """One pipeline's part of telemetry."""
    st = p.stats
    return {
        "state": st.state,
        "fps": round(st.fps, 2) if st.state == "running" else 0.0,
        "max_fps": round(p.max_fps, 3),
        "frames": st.processed,
        "dropped": st.skipped + st.source_dropped,
        "skipped": st.skipped,
        "source_dropped": st.source_dropped,
        "results": st.results,
        "restarts": st.restarts,
        "errors": st.errors,
        "variant": p.variant,
        # The delivered name it runs or waits for: the device's own /metrics says which model a waiting one needs.
        "delivered": p.settings.delivered,
        "tune": p.slot.tune_summary,
        "source": p.source_status(),
        **p.rings.summary(),
    }


class Monitor:
    """Samples, governs and reports until the stop event is set."""

    def __init__(self, *, pipelines: Callable[[], list[Pipeline]], spool: Callable[[], dict[str, Any] | None],
                 publish: Callable[[dict[str, Any]], None] | None, governor: Governor | None,
                 root: Path, disk_path: Path, telemetry_interval_s: float, governor_interval_s: float,
                 profile: str, stop: threading.Event) -> None:
        self.pipelines = pipelines
        self.spool = spool
        self.publish = publish
        self.governor = governor
        self.root = root
        self.telemetry_interval_s = telemetry_interval_s
        self.governor_interval_s = governor_interval_s
        self.profile = profile
        self.stop = stop
        self.sampler = SystemSampler(root=root, disk_path=disk_path)
        self.cpu = CpuShare()
        self.latest: dict[str, Any] | None = None
        """The last telemetry payload built (also when it is not published)."""
        self.errors = 0
        self.published = 0
        self.on_tick: list[Callable[[], None]] = []
        """Called after each telemetry tick (Home Assistant discovery follows pipeline changes here)."""
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        now = time.monotonic()
        next_governor = now + self.governor_interval_s if self.governor is not None else float("inf")
        # The first report after a short while (CPU figures need an interval), then every interval.
        next_report = now + min(self.telemetry_interval_s, 2.0)
        failures = 0
        while not self.stop.wait(max(0.0, min(next_governor, next_report) - time.monotonic())):
            now = time.monotonic()
            try:
                if now >= next_governor:
                    next_governor = now + self.governor_interval_s
                    self.govern()
                if now >= next_report:
                    next_report = now + self.telemetry_interval_s
                    self.report()
                failures = 0
            except Exception:
                self.errors += 1
                failures += 1
                delay = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (failures - 1))
                logger.exception("monitor: tick failed (%d so far); again in %.0f s", self.errors, delay)
                if self.stop.wait(delay):
                    break

    def reading(self) -> Reading:
        flags = read_throttled(self.root, vcgencmd=None)  # the sysfs node only: no process every tick
        throttled = bool(flags and (flags["throttled"] or flags["freq_capped"] or flags["soft_temp_limit"]))
        return Reading(read_temperature(self.root), self.cpu.sample(), throttled)

    def govern(self) -> None:
        if self.governor is not None:
            self.governor.tick(self.reading())

    def build(self) -> dict[str, Any]:
        """The telemetry payload (without `ts`/`v`, which the link adds)."""
        system = self.sampler.sample()
        spool = self.spool()
        return {
            **system,
            "profile": self.profile,
            "governor": self.governor.state() if self.governor is not None else disabled_state(),
            "spool": {"queued": 0, "dropped": 0, "bytes": 0} if spool is None else spool,
            "pipelines": {p.name: pipeline_figures(p) for p in self.pipelines()},
            "monitor_errors": self.errors,
        }

    def report(self) -> None:
        payload = self.build()
        payload["ts"] = round(time.time(), 3)
        self.latest = payload
        if self.publish is not None:
            self.publish(payload)
            self.published += 1
        for hook in self.on_tick:
            hook()
