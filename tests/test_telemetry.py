"""Telemetry readers against a fake sysfs tree and against the real /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.telemetry import LatencyRing, StageRings, SystemSampler, decode_throttled, read_temperature, read_throttled


def _zone(root: Path, n: int, kind: str, milli: int) -> None:
    zone = root / "sys/class/thermal" / f"thermal_zone{n}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(kind + "\n")
    (zone / "temp").write_text(f"{milli}\n")


def test_soc_zone_is_preferred(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "gpu-thermal", 71000)
    _zone(tmp_path, 1, "cpu-thermal", 58123)
    assert read_temperature(tmp_path) == 58.12
    assert read_temperature(tmp_path / "nothing") is None


def test_hottest_zone_when_none_is_named(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "acpitz", 41000)
    _zone(tmp_path, 1, "iwlwifi_1", 47500)
    assert read_temperature(tmp_path) == 47.5


def test_throttle_word_from_the_firmware_node(tmp_path: Path) -> None:
    node = tmp_path / "sys/devices/platform/soc/soc:firmware/get_throttled"
    node.parent.mkdir(parents=True)
    node.write_text("50005\n")  # under-voltage now and since boot, throttled since boot, soft limit since boot
    flags = read_throttled(tmp_path, vcgencmd=None)
    assert flags == {
        "under_voltage": True, "under_voltage_since_boot": True,
        "freq_capped": False, "freq_capped_since_boot": False,
        "throttled": True, "throttled_since_boot": True,
        "soft_temp_limit": False, "soft_temp_limit_since_boot": False,
    }
    assert read_throttled(tmp_path / "elsewhere", vcgencmd=None) is None


def test_decode_all_bits() -> None:
    assert all(decode_throttled(0xF000F).values())
    assert not any(decode_throttled(0).values())


def test_ring_is_fixed_size_and_gives_percentiles() -> None:
    ring = LatencyRing(size=100)
    assert ring.percentiles(50) == {"p50": None}  # no sample: no value, not 0 ms
    for v in range(1000):
        ring.add(float(v))
    assert len(ring) == 100
    p = ring.percentiles(50, 95, 99)
    assert p["p50"] == pytest.approx(949.5) and p["p99"] == pytest.approx(998.01)


def test_stage_rings_keep_the_last_items_and_give_each_stage_its_percentiles() -> None:
    rings = StageRings(size=100)
    empty = rings.summary()
    # No sample: no value (None), not 0 ms (issue 18), as a single ring gives it.
    assert empty["latency_ms"] == {"p50": None, "p95": None, "p99": None} == LatencyRing().percentiles(50, 95, 99)
    assert empty["pre_ms"] == {"p50": None, "p95": None}
    alone = {name: LatencyRing(size=100) for name in ("pre", "invoke", "post", "total")}
    for v in range(1000):
        pre, invoke, post = v * 0.001, v * 0.01 + 1, (v % 7) * 0.5
        rings.add(pre, invoke, post)
        for name, value in (("pre", pre), ("invoke", invoke), ("post", post), ("total", pre + invoke + post)):
            alone[name].add(value)
    assert len(rings) == 100
    assert rings.summary() == {  # what one ring per stage gives
        "latency_ms": alone["total"].percentiles(50, 95, 99), "pre_ms": alone["pre"].percentiles(50, 95),
        "invoke_ms": alone["invoke"].percentiles(50, 95), "post_ms": alone["post"].percentiles(50, 95)}
    rings.clear()
    assert len(rings) == 0 and rings.summary() == empty


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def test_system_figures_agree_with_proc(tmp_path: Path) -> None:
    sample = SystemSampler(disk_path=tmp_path).sample()
    for key, value in sample.items():
        assert value is None or isinstance(value, (int, float, dict)), key
    info = _meminfo()
    used_percent = 100.0 * (info["MemTotal"] - info["MemAvailable"]) / info["MemTotal"]
    assert sample["mem_percent"] == pytest.approx(used_percent, abs=5.0)
    assert sample["load1"] == pytest.approx(float(Path("/proc/loadavg").read_text().split()[0]), abs=1.0)
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    assert sample["rss_mb"] == pytest.approx(rss_kb / 1024, rel=0.2)
    st = os.statvfs(tmp_path)
    assert sample["disk_free_mb"] == pytest.approx(st.f_bavail * st.f_frsize / 2**20, rel=0.05)
    assert 0.0 <= sample["cpu_percent"] <= 100.0
