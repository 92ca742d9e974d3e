#!/usr/bin/env python3
"""Benchmark: what telemetry and the governor cost the agent, as JSON (issue 7).

Two real daemons (`lepton-agent run`) run side by side against one local mosquitto, so
both see the same machine load: one with telemetry and the governor every second
(`telemetry_interval_s = 1`, `governor.interval_s = 1`), one with both off. Each scenario
(an idle agent; an agent running the colour classifier on `test:colors` at --fps) is
measured for --seconds after a warm-up: the agent's CPU time (all its threads, from
/proc/<pid>/task/*/schedstat) as percent of one core, and its resident memory (VmRSS sampled every
second, VmHWM at the end). Reported: both, `ratio` (on / off) and `delta` (on - off).

    scripts/bench_telemetry.py [--seconds 30] [--warmup 5] [--fps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from broker import Broker, Watcher  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads: nanoseconds from schedstat (utime/stime tick at 10 ms, too
    coarse for an idle agent), else the ticks of /proc/<pid>/stat."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def status_mb(pid: int, key: str) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def config(folder: Path, port: int, device: str, reporting: bool, fps: float | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = f"""
[agent]
device_id = "{device}"
state_dir = "{folder / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
[profile]
telemetry_interval_s = 1
[telemetry]
enabled = {str(reporting).lower()}
[governor]
enabled = {str(reporting).lower()}
interval_s = 1.0
"""
    if fps:
        text += f"""
[[pipelines]]
name = "colors"
source = "test:colors"
model = "{ROOT / 'tests' / 'fixtures' / 'colors_int8.json'}"
[pipelines.source_options]
fps = {fps}
"""
    path = folder / "agent.toml"
    path.write_text(text)
    return path


def scenario(tmp: Path, broker: Broker, name: str, fps: float | None, seconds: float, warmup: float) -> dict[str, Any]:
    pause = threading.Event()  # never set: its wait() is the interruptible timer
    devices = {"on": f"bench-{name}-on", "off": f"bench-{name}-off"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with Watcher(broker.port, [f"lepton/{devices['on']}/telemetry"]) as watcher:
        try:
            for mode, device in devices.items():
                path = config(tmp / name / mode, broker.port, device, mode == "on", fps)
                procs[mode] = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(path)],
                                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            pause.wait(warmup)
            start = {mode: cpu_seconds(p.pid) for mode, p in procs.items()}
            seen = len(watcher.messages)
            rss: dict[str, list[float]] = {mode: [] for mode in procs}
            for _ in range(int(seconds)):
                pause.wait(1.0)
                for mode, p in procs.items():
                    rss[mode].append(status_mb(p.pid, "VmRSS"))
            out: dict[str, Any] = {}
            for mode, p in procs.items():
                used = cpu_seconds(p.pid) - start[mode]
                out[mode] = {"cpu_percent": round(100 * used / int(seconds), 3),
                             "rss_mb": round(sum(rss[mode]) / len(rss[mode]), 1),
                             "rss_peak_mb": round(status_mb(p.pid, "VmHWM"), 1)}
            out["on"]["telemetry_messages"] = len(watcher.messages) - seen
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(20)
    off, on = out["off"], out["on"]
    out["ratio"] = {"cpu": round(on["cpu_percent"] / off["cpu_percent"], 3) if off["cpu_percent"] else None,
                    "rss": round(on["rss_mb"] / off["rss_mb"], 3)}
    out["delta"] = {"cpu_percent": round(on["cpu_percent"] - off["cpu_percent"], 3),
                    "rss_mb": round(on["rss_mb"] - off["rss_mb"], 1)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second of the pipeline scenario")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as folder:
        tmp = Path(folder)
        with Broker(tmp / "broker") as broker:
            report = {
                "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
                "seconds": args.seconds,
                "telemetry_interval_s": 1.0,
                "governor_interval_s": 1.0,
                "idle": scenario(tmp, broker, "idle", None, args.seconds, args.warmup),
                f"pipeline_{args.fps:g}fps": scenario(tmp, broker, "pipeline", args.fps, args.seconds, args.warmup),
            }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
