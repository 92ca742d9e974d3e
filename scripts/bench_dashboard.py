#!/usr/bin/env python3
"""Benchmark: `lepton-fleet dashboard` with a simulated fleet, as JSON (issue 14).

A local mosquitto, N virtual devices (scripts/fleet_sim.py: the agent's own link, a result every
--result-every seconds and a telemetry message every --telemetry-every seconds each), the dashboard as its own
process and the page open in headless Chromium (Debian's). Reported:

- `dashboard`: the dashboard process's CPU (percent of one core, over --seconds with the page open and the
  fleet talking) and its resident memory (VmRSS at the end, VmHWM);
- `page`: time from opening the page to all N rows in the table, and the browser's JS heap;
- `status_change_ms`: for --changes devices one after another, the time from the device's status change (its
  link closes and publishes `stopped`; taken just before) to the page showing the row as stopped, measured in
  the browser (a MutationObserver stamps Date.now() on the row's change; same machine, same clock).

    scripts/bench_dashboard.py [-n 1000] [--seconds 20] [--changes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from broker import Broker, wait_until  # noqa: E402
from dashboard_kit import browser, dashboard  # noqa: E402
from fleet_brokers import proc_cpu_s as _proc_cpu_s  # noqa: E402
from fleet_devices import Fleet  # noqa: E402

from agent.delivery.signing import TrustedKeys  # noqa: E402

WATCH_ROW = """device => {
  window.shownAt = window.shownAt || {};
  const row = document.querySelector(`#fleet-rows tr[data-device="${device}"]`);
  new MutationObserver((_, observer) => {
    if (row.dataset.presence === "stopped") { observer.disconnect(); window.shownAt[device] = Date.now(); }
  }).observe(row, {attributes: true, attributeFilter: ["data-presence"]});
}"""


def _rss_mb(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}


def _counts(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/fleet", timeout=30) as r:  # noqa: S310 - our own loopback server
        return dict(json.loads(r.read())["counts"])


def bench(n: int, seconds: float, changes: int, result_every: float, telemetry_every: float,
          folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"devices": n, "cpus": os.cpu_count(), "result_every_s": result_every,
                           "telemetry_every_s": telemetry_every}
    with Broker(folder / "broker") as mqtt:
        fleet = Fleet(folder / "fleet", mqtt.url, n, "lepton", TrustedKeys.from_config({}),
                      result_every_s=result_every, telemetry_every_s=telemetry_every)
        try:
            out["fleet_online_s"] = round(fleet.start(), 1)
            with dashboard(mqtt.url, "lepton", log=folder / "dashboard.log") as dash:
                pid = dash.proc.pid
                if not wait_until(lambda: _counts(dash.url)["online"] >= n, timeout=120, step=0.5):
                    raise RuntimeError(f"the dashboard saw {_counts(dash.url)} of {n} devices")
                with browser() as context:
                    page = context.new_page()
                    t0 = time.monotonic()
                    page.goto(dash.url)
                    page.wait_for_function(f"document.querySelectorAll('#fleet-rows tr').length >= {n}",
                                           timeout=120_000)
                    out["page"] = {"all_rows_s": round(time.monotonic() - t0, 2)}
                    cpu0, w0 = _proc_cpu_s(pid), time.monotonic()
                    page.wait_for_timeout(seconds * 1000)  # the measuring window: the fleet talks, the page is open
                    cpu1, w1 = _proc_cpu_s(pid), time.monotonic()
                    out["dashboard"] = {"cpu_percent": round(100 * (cpu1 - cpu0) / (w1 - w0), 1), **_rss_mb(pid),
                                        "window_s": round(w1 - w0, 1)}
                    out["page"]["js_heap_mb"] = round(page.evaluate("performance.memory.usedJSHeapSize") / 2**20, 1)
                    delays = []
                    picked = [fleet.devices[(i * 97 + n // 2) % n] for i in range(changes)]
                    for device in picked:
                        page.evaluate(WATCH_ROW, device.device)
                        changed = time.time()
                        device.close()
                        fleet.devices.remove(device)  # closed once: the fleet's close skips it
                        shown = page.wait_for_function("d => window.shownAt[d]", arg=device.device,
                                                       timeout=60_000).json_value()
                        delays.append(shown - changed * 1000)
                    out["status_change_ms"] = {"median": round(statistics.median(delays)), "max": round(max(delays)),
                                               "each": [round(d) for d in delays]}
        finally:
            fleet.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="virtual devices (default 1000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="CPU measuring window (default 20)")
    parser.add_argument("--changes", type=int, default=5, help="status changes timed (default 5)")
    parser.add_argument("--result-every", type=float, default=10.0, help="seconds between a device's results")
    parser.add_argument("--telemetry-every", type=float, default=10.0, help="seconds between a device's telemetry")
    args = parser.parse_args()
    if args.n < 1 or args.changes < 1 or args.changes > args.n:
        print("bench_dashboard: -n and --changes must be at least 1, --changes at most -n", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        result = bench(args.n, args.seconds, args.changes, args.result_every, args.telemetry_every, Path(tmp))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
