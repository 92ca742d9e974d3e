"""The governor on a scripted temperature ramp (a fake thermal zone) and a scripted CPU load, driving
real pipelines: fps steps, a cheaper manifest variant swapped in and out, pause past the hard limit,
audio untouched, recovery with hysteresis."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import RegisterSource

from agent.config import GovernorSection, PipelineSettings, PolicySettings, SupervisorSection
from agent.governor import Governor, Reading
from agent.manifest import load_spec
from agent.monitor import Monitor
from agent.pipeline import Pipeline
from agent.profiles import Profile, load_profile
from agent.sources.source import Item, Source
from agent.telemetry import CpuShare
from agent.variants import cheaper_variants


class _Microphone(Source):
    """Stands in for an audio source: the governor must leave its pipeline alone."""

    kind = "audio"

    def open(self) -> None:
        pass

    def read(self, timeout: float) -> Item | None:
        return None

    def close(self) -> None:
        pass




class ScriptedCpu(CpuShare):
    """The agent's CPU share as a script says, one value per tick."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = list(values)

    def sample(self) -> float:
        return self.values.pop(0)


def _zone(root: Path, celsius: float) -> None:
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text(f"{round(celsius * 1000)}\n")


def _profile() -> Profile:
    # pi-3b: soft 65 °C, hard 78 °C; a 10 fps ceiling and a 75 % CPU budget for round numbers.
    return load_profile("pi-3b").model_copy(update={"max_fps": 10.0, "cpu_budget_percent": 75.0})


class Watched:
    """A pipeline plus a condition to wait on its state and results (no sleeps)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline
        self.results: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        pipeline.sink = self._sink
        pipeline.on_state = self._changed

    def _sink(self, name: str, payload: dict[str, Any]) -> None:
        with self.cond:
            self.results.append(payload)
            self.cond.notify_all()

    def _changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait(self, predicate: Any, timeout: float = 30.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), (self.p.stats, self.results[-1:])


def _pipeline(name: str, source: str, model: Path, stop: threading.Event, **options: Any) -> Pipeline:
    # Every processed frame reported, so a test can see which model made it.
    settings = PipelineSettings(name=name, source=source, model=model, source_options=options, threshold=0.0,
                                policy=PolicySettings(on_change=False, max_rate=100))
    return Pipeline(settings, profile=_profile(), supervisor=SupervisorSection(), backend=None,
                    sink=lambda n, p: None, stop=stop)


def test_variants_are_read_from_the_manifest(fixtures: Path) -> None:
    variants = cheaper_variants(load_spec(fixtures / "colors_bench_variants.json"))
    # The int8 file ranks as the first fallback; the float file is dearer than the base and never used.
    assert [(v.file, v.rank) for v in variants] == [("colors_int8.tflite", 1)]
    assert cheaper_variants(load_spec(fixtures / "colors_bench_variants.json"), min_agreement=1.01) == []
    assert cheaper_variants(load_spec(fixtures / "colors_int8.json")) == []


def test_scripted_temperature_ramp(tmp_path: Path, fixtures: Path, source_kind: RegisterSource) -> None:
    source_kind(lambda uri: uri == "fake-mic:", _Microphone)
    stop = threading.Event()
    cam = Watched(_pipeline("cam", "test:colors", fixtures / "colors_bench_variants.json", stop, fps=30, width=64,
                            height=48, hold=3))
    mic = _pipeline("mic", "fake-mic:", fixtures / "colors_int8.json", stop)
    pipelines = [cam.p, mic]
    settings = GovernorSection(step_s=10, recover_s=30, fps_step=0.5, min_fps=1.0, max_level=4, variant_level=2)
    governor = Governor(settings, _profile(), lambda: pipelines)
    root = tmp_path / "root"
    monitor = Monitor(pipelines=lambda: pipelines, spool=lambda: None, publish=None, governor=governor, root=root,
                      disk_path=tmp_path, telemetry_interval_s=60, governor_interval_s=5, profile="pi-3b",
                      stop=stop)
    monitor.cpu = ScriptedCpu([20.0] * 100)  # the CPU is never the reason here
    cam.p.start()
    cam.wait(lambda: len(cam.results) >= 3)
    assert cam.p.max_fps == 10.0 and cam.p.variant is None

    # (seconds, °C) → (level, paused, fps cap of "cam", its variant). soft 65, hard 78, hysteresis 5.
    ramp = [
        (0, 50.0, 0, False, 10.0, None),
        (10, 65.0, 1, False, 5.0, None),                      # at the soft limit: one step
        (15, 66.0, 1, False, 5.0, None),                      # less than step_s since the last step: hold
        (20, 67.0, 2, False, 5.0, "colors_int8.tflite"),      # level 2: the cheaper variant, same fps
        (30, 64.0, 2, False, 5.0, "colors_int8.tflite"),      # below soft, not by the hysteresis nor for long
        (40, 70.0, 3, False, 2.5, "colors_int8.tflite"),
        (50, 78.5, 4, True, 1.25, "colors_int8.tflite"),      # past the hard limit: paused, deepest level
        (60, 75.0, 4, True, 1.25, "colors_int8.tflite"),      # not 5 °C under the hard limit yet
        (70, 72.5, 4, False, 1.25, "colors_int8.tflite"),     # resumed, still slow
        (80, 61.0, 4, False, 1.25, "colors_int8.tflite"),     # cool enough, but within recover_s of the resume
        (100, 59.0, 3, False, 2.5, "colors_int8.tflite"),     # one step up
        (110, 59.0, 3, False, 2.5, "colors_int8.tflite"),     # the next only after recover_s
        (130, 55.0, 2, False, 5.0, "colors_int8.tflite"),
        (160, 55.0, 1, False, 5.0, None),                     # back to the base model
        (190, 55.0, 0, False, 10.0, None),
        (220, 55.0, 0, False, 10.0, None),
    ]
    for t, celsius, level, paused, fps, variant in ramp:
        _zone(root, celsius)
        governor.tick(monitor.reading(), now=float(t))
        assert (governor.level, governor.paused) == (level, paused), (t, celsius, governor.state())
        assert cam.p.max_fps == pytest.approx(fps) and cam.p.chosen_variant == variant, (t, celsius)
        assert cam.p.paused == paused
        # The audio pipeline is never capped, paused or swapped.
        assert mic.governed_fps is None and not mic.paused and mic.max_fps == 10.0
        if paused:
            cam.wait(lambda: cam.p.stats.state == "paused")
        elif t == 70:
            cam.wait(lambda: cam.p.stats.state == "running")
        if t in (20, 160):
            # The loop picked the swapped model up between two items, and results say which runs.
            seen = len(cam.results)
            cam.wait(lambda: len(cam.results) > seen + 1 and cam.p.variant == variant)  # noqa: B023
            assert cam.results[-1]["model"] == ({"name": "colors-bench", "version": 1, "variant": variant}
                                                if variant else {"name": "colors-bench", "version": 1})
    state = governor.state()
    assert state["changes"] == 11 and state["last_change"]["what"] == "step up"  # 9 steps/pauses + 2 swaps
    assert state["pipelines"] == {"cam": {"fps": 10.0, "capped": False, "variant": None, "paused": False}}
    assert cam.p.stats.pauses == 1 and cam.p.stats.swaps == 2 and cam.p.stats.restarts == 0
    # The variant classified the colours as well as the base did.
    labels = [r["classes"][0]["label"] for r in cam.results if r["model"].get("variant")]
    assert labels and set(labels) <= {"red", "green", "blue"}
    stop.set()
    cam.p.halt()
    assert cam.p.join(10)


def test_cpu_budget_with_predicted_relief() -> None:
    profile = _profile()  # budget 75 %, hysteresis 10 → a step up needs ≤ 65 %, also after the step
    pipeline = _pipeline("cam", "test:colors", Path(__file__).parent / "fixtures" / "colors_int8.json",
                         threading.Event())
    governor = Governor(GovernorSection(step_s=0, recover_s=0, fps_step=0.5, min_fps=0.5, max_level=3),
                        profile, lambda: [pipeline])
    script = [
        (80.0, 1),   # over budget: down
        (78.0, 2),   # still over: down again (step_s 0)
        (70.0, 2),   # under budget, not under budget - hysteresis: hold
        (50.0, 2),   # ≤ 65 now, but one step up doubles the fps: ~100 % predicted: hold
        (30.0, 1),   # ~60 % predicted: up
        (40.0, 1),   # ~80 % predicted: hold
        (76.0, 2),   # over again
        (20.0, 1),
        (25.0, 0),
    ]
    for cpu, level in script:
        governor.tick(Reading(temp_c=None, cpu_percent=cpu))
        assert governor.level == level, (cpu, governor.state())
    assert pipeline.max_fps == 10.0 and governor.state()["pressure"] is None


def test_firmware_throttling_is_pressure(tmp_path: Path) -> None:
    governor = Governor(GovernorSection(step_s=0), _profile(), list)
    governor.tick(Reading(temp_c=60.0, cpu_percent=10.0, throttled=True))
    assert governor.level == 1 and governor.pressure == "throttled"
    # The monitor reads the firmware's word from sysfs: bit 2 (throttled now).
    node = tmp_path / "sys/devices/platform/soc/soc:firmware/get_throttled"
    node.parent.mkdir(parents=True)
    node.write_text("0x4\n")
    monitor = Monitor(pipelines=list, spool=lambda: None, publish=None, governor=governor, root=tmp_path,
                      disk_path=tmp_path, telemetry_interval_s=60, governor_interval_s=5, profile="p",
                      stop=threading.Event())
    assert monitor.reading().throttled is True
    node.write_text("0x50000\n")  # under-voltage and throttling since boot only: not now
    assert monitor.reading().throttled is False


def test_a_broken_variant_is_skipped_not_retried(tmp_path: Path, fixtures: Path) -> None:
    import json
    import shutil

    for name in ("colors_bench_int8.tflite", "colors_int8.tflite"):
        shutil.copy(fixtures / name, tmp_path / name)
    manifest = json.loads((fixtures / "colors_bench_variants.json").read_text())
    manifest["variants"][0]["sha256"] = "0" * 64  # the file on disk does not match
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    stop = threading.Event()
    cam = Watched(_pipeline("cam", "test:colors", tmp_path / "m.json", stop, fps=30, width=32, height=32))
    governor = Governor(GovernorSection(step_s=0, variant_level=1, fps_step=0.5, max_level=2), _profile(),
                        lambda: [cam.p])
    cam.p.start()
    cam.wait(lambda: cam.p.stats.state == "running")
    governor.tick(Reading(temp_c=70.0, cpu_percent=None), now=0.0)
    # The variant could not be used: level 1 falls back to an fps step, the base model keeps running.
    assert governor.level == 1 and cam.p.chosen_variant is None and cam.p.max_fps == 5.0
    governor.tick(Reading(temp_c=70.0, cpu_percent=None), now=1.0)
    assert governor.level == 2 and cam.p.max_fps == 2.5 and cam.p.stats.swaps == 0
    stop.set()
    cam.p.halt()
    assert cam.p.join(10)


def test_monitor_survives_a_failing_tick_and_counts_it(tmp_path: Path) -> None:
    calls = {"spool": 0}
    published: list[dict[str, Any]] = []
    cond = threading.Condition()

    def spool() -> dict[str, Any]:
        calls["spool"] += 1
        if calls["spool"] == 1:
            raise RuntimeError("spool database is locked")
        return {"queued": 2, "dropped": 0, "bytes": 10}

    def publish(payload: dict[str, Any]) -> None:
        with cond:
            published.append(payload)
            cond.notify_all()

    stop = threading.Event()
    _zone(tmp_path, 41.0)
    monitor = Monitor(pipelines=list, spool=spool, publish=publish, governor=None, root=tmp_path,
                      disk_path=tmp_path, telemetry_interval_s=0.2, governor_interval_s=5, profile="p", stop=stop)
    monitor.start()
    try:
        with cond:
            assert cond.wait_for(lambda: len(published) >= 2, 30)
    finally:
        stop.set()
        monitor.join(5)
    assert monitor.errors == 1 and published[0]["monitor_errors"] == 1
    assert published[0]["spool"] == {"queued": 2, "dropped": 0, "bytes": 10} and published[0]["temp_c"] == 41.0
    assert published[0]["governor"]["enabled"] is False
    # The payload with the governor off also meets the documented schema (the link adds `v`).
    import json

    import jsonschema

    schema = json.loads((Path(__file__).parent.parent / "docs" / "telemetry.schema.json").read_text())
    jsonschema.validate({**published[1], "v": 1}, schema)
