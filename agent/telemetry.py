"""What the device reports about itself: system figures and per-pipeline latency rings.

Every reader takes a `root` (default `/`) so tests can point it at a fake
sysfs/procfs tree. All values are numbers (or None when the board has no such
sensor), never strings.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

logger = logging.getLogger(__name__)

# Bits of the Raspberry Pi firmware's get_throttled word (vcgencmd get_throttled).
THROTTLE_BITS = {
    "under_voltage": 0,
    "freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
}
SINCE_BOOT_SHIFT = 16
# Kernel node exposing the same word (raspberrypi-hwmon / firmware driver), hexadecimal.
THROTTLE_NODES = (
    "sys/devices/platform/soc/soc:firmware/get_throttled",
    "sys/devices/platform/soc:firmware/get_throttled",
)
# Preferred thermal zone types: the SoC sensor, then anything.
SOC_ZONE_TYPES = ("cpu-thermal", "soc-thermal", "x86_pkg_temp", "cpu_thermal", "coretemp")


def decode_throttled(word: int) -> dict[str, bool]:
    flags: dict[str, bool] = {}
    for name, bit in THROTTLE_BITS.items():
        flags[name] = bool(word >> bit & 1)
        flags[f"{name}_since_boot"] = bool(word >> (bit + SINCE_BOOT_SHIFT) & 1)
    return flags


def read_throttled(root: Path = Path("/"), vcgencmd: str | None = "vcgencmd") -> dict[str, bool] | None:
    """The throttle flags from the firmware's sysfs node, else `vcgencmd get_throttled`; None off a Pi."""
    for node in THROTTLE_NODES:
        path = root / node
        try:
            return decode_throttled(int(path.read_text().strip(), 16))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            logger.debug("%s: %s", path, exc)
    if vcgencmd and shutil.which(vcgencmd):
        try:
            out = subprocess.run([vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=2,
                                 check=True).stdout
            return decode_throttled(int(out.strip().split("=", 1)[1], 16))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            logger.debug("vcgencmd get_throttled: %s", exc)
    return None


def read_temperature(root: Path = Path("/")) -> float | None:
    """SoC temperature in °C from /sys/class/thermal (the SoC zone if named, else the hottest)."""
    zones = sorted((root / "sys/class/thermal").glob("thermal_zone*"))
    readings: list[tuple[bool, float]] = []
    for zone in zones:
        try:
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            kind = (zone / "type").read_text().strip()
        except OSError:
            kind = ""
        readings.append((kind in SOC_ZONE_TYPES, milli / 1000.0))
    if not readings:
        return None
    soc = [t for is_soc, t in readings if is_soc]
    return round(max(soc or [t for _, t in readings]), 2)


class LatencyRing:
    """The last `size` samples in a fixed numpy ring: percentiles without growth."""

    def __init__(self, size: int = 512) -> None:
        self._values = np.zeros(size, np.float64)
        self._next = 0
        self._count = 0
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._values[self._next] = value
            self._next = (self._next + 1) % self._values.size
            self._count = min(self._count + 1, self._values.size)

    def percentiles(self, *ps: int) -> dict[str, float | None]:
        """`{"p50": …}` in ms; None with no sample yet ("no value", not 0 ms: issue 18)."""
        with self._lock:
            window = self._values[: self._count].copy()
        if window.size == 0:
            return {f"p{p}": None for p in ps}
        values = np.percentile(window, ps)
        return {f"p{p}": round(float(v), 3) for p, v in zip(ps, values, strict=True)}

    def clear(self) -> None:
        with self._lock:
            self._next = 0
            self._count = 0

    def __len__(self) -> int:
        return self._count


class StageRings:
    """Latency rings of one pipeline: the whole item and each stage (pre, invoke, post).

    One ring of rows (pre, invoke, post, total) under one lock: `add` runs once per frame on the pipeline's
    thread, and four separate rings cost four locks and four numpy stores there."""

    def __init__(self, size: int = 512) -> None:
        self._values = np.zeros((size, 4), np.float64)
        self._size = size
        self._next = 0
        self._count = 0
        self._lock = threading.Lock()

    def add(self, pre: float, invoke: float, post: float) -> None:
        with self._lock:
            i = self._next
            self._values[i] = (pre, invoke, post, pre + invoke + post)
            self._next = i + 1 if i + 1 < self._size else 0
            if self._count < self._size:
                self._count += 1

    def clear(self) -> None:
        with self._lock:
            self._next = 0
            self._count = 0

    def __len__(self) -> int:
        return self._count

    def summary(self) -> dict[str, dict[str, float | None]]:
        """`latency_ms` {p50, p95, p99} of the whole item, `pre_ms`, `invoke_ms`, `post_ms` {p50, p95}."""
        with self._lock:
            window = self._values[: self._count].copy()
        ps = (50, 95, 99)
        table = np.percentile(window, ps, axis=0) if window.shape[0] else None

        def column(c: int, upto: int) -> dict[str, float | None]:
            # No sample yet: None, "no value", not 0 ms (issue 18).
            return {f"p{p}": None if table is None else round(float(table[k, c]), 3) for k, p in enumerate(ps[:upto])}

        return {"latency_ms": column(3, 3), "pre_ms": column(0, 2), "invoke_ms": column(1, 2), "post_ms": column(2, 2)}


class CpuShare:
    """This process's share of all cores (0-100) between two calls, from its CPU times."""

    def __init__(self, process: psutil.Process | None = None, cores: int | None = None) -> None:
        self._process = process or psutil.Process()
        self.cores = cores or os.cpu_count() or 1
        self._last = self._read()

    def _read(self) -> tuple[float, float]:
        t = self._process.cpu_times()
        return time.monotonic(), t.user + t.system

    def sample(self) -> float:
        """Percent of the machine's CPU this process used since the previous call."""
        now, used = self._read()
        then, used_then = self._last
        self._last = (now, used)
        wall = now - then
        if wall <= 0:
            return 0.0
        return round(min(100.0, 100.0 * (used - used_then) / wall / self.cores), 1)


def read_uptime(root: Path = Path("/")) -> float | None:
    """Seconds since the machine booted (/proc/uptime)."""
    try:
        return round(float((root / "proc/uptime").read_text().split()[0]), 1)
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class SystemSampler:
    """psutil figures for the machine and this process; call `sample()` once per telemetry interval.

    CPU figures are averages since the previous call. `agent_cpu_percent` is this process's
    share of all cores (0-100), the figure the governor holds against the profile's budget.
    """

    root: Path = Path("/")
    disk_path: Path = Path("/")

    def __post_init__(self) -> None:
        self._process = psutil.Process()
        self._started = time.monotonic()
        self._share = CpuShare(self._process)
        # The first cpu_percent() call only sets the reference point.
        psutil.cpu_percent(interval=None)

    def sample(self) -> dict[str, Any]:
        mem = psutil.virtual_memory()
        try:
            load1 = float((self.root / "proc/loadavg").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            load1 = os.getloadavg()[0]
        try:
            disk_free_mb = shutil.disk_usage(self.disk_path).free / 2**20
        except OSError:
            disk_free_mb = None
        return {
            "cpu_percent": round(psutil.cpu_percent(interval=None), 1),
            "agent_cpu_percent": self._share.sample(),
            "load1": round(load1, 2),
            "mem_percent": round(mem.percent, 1),
            "rss_mb": round(self._process.memory_info().rss / 2**20, 1),
            "temp_c": read_temperature(self.root),
            "throttled": read_throttled(self.root, vcgencmd="vcgencmd" if self.root == Path("/") else None),
            "disk_free_mb": None if disk_free_mb is None else round(disk_free_mb, 1),
            "uptime_s": round(time.monotonic() - self._started, 1),
            "system_uptime_s": read_uptime(self.root),
        }
