#!/usr/bin/env python3
"""Benchmark: what sample capture costs a pipeline's loop, as JSON (issue 15).

One process, one model (BlazeFace short range), real photos (scikit-image's, at 512x512) served from
memory as fast as the loop takes them, the daemon's own `Pipeline` with its fps limit lifted (so the
figure is the loop's throughput, not the limit). Rounds alternate capture off / capture on, where on
means a band of [0, 1]: every frame is a band hit, so every frame goes through the capture decision and
as many as `max_per_minute` allows (`--per-minute`: the default 60, up to the config's ceiling of 6000,
100 a second) are copied, queued, JPEG-encoded, hashed and fsync'd into a store by the writer thread.
Reported per mode: loop fps and the p50/p95 of the time per item (read → process → results → capture),
and the throughput cost of capture in percent (on a shared machine this difference is mostly noise:
the rounds show its spread);
`loop_share_percent` is the time the loop itself spent in capture (timed around each call) over the
time it ran, which is what capture takes from the loop's thread; plus what the store got (stored,
limited, dropped at the queue). The writer's JPEG encoding runs on its own thread, bounded by
`max_per_minute`.

    scripts/bench_capture.py [--seconds 5] [--rounds 3] [--per-minute 60]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from face_photos import PHOTOS  # noqa: E402

from agent.config import PipelineSettings, SampleCaptureSettings, SupervisorSection  # noqa: E402
from agent.pipeline import Pipeline  # noqa: E402
from agent.profiles import load_profile  # noqa: E402
from agent.samples.capturer import CaptureWriter  # noqa: E402
from agent.samples.sample_store import SampleStore  # noqa: E402
from agent.sources.source import Item, Source, register_source  # noqa: E402

FRAMES: list[np.ndarray[Any, Any]] = []


class MemoryFrames(Source):
    """The photos, round and round, with no wait: the loop's own speed is what is measured."""

    kind = "frames"

    def open(self) -> None:
        self.n = 0

    def read(self, timeout: float) -> Item | None:
        self.n += 1
        return Item(FRAMES[self.n % len(FRAMES)], self.n, self.n / 30, time.time())

    def close(self) -> None:
        pass


register_source(lambda uri: uri == "bench:photos")(MemoryFrames)


class Measured(Pipeline):
    """The daemon's pipeline, fps limit lifted, timing each item from one emit to the next."""

    def admit(self, item: Item) -> bool:
        super().admit(item)
        return True

    def _emit(self, item: Item, results: list[dict[str, Any]], runner: Any) -> None:
        super()._emit(item, results, runner)
        now = time.perf_counter()
        if self.last is not None:
            self.periods.append(now - self.last)
        self.last = now

    last: float | None = None
    periods: list[float]


def run(model: Path, capture: bool, seconds: float, folder: Path, per_minute: float) -> dict[str, Any]:
    stop = threading.Event()
    writer = CaptureWriter(SampleStore(folder, 64 * 1024 * 1024, reserve_bytes=0), "bench", stop)
    writer.start()
    settings = PipelineSettings(name="faces", source="bench:photos", model=model,
                                capture=SampleCaptureSettings(enabled=capture, band=(0.0, 1.0),
                                                              max_per_minute=per_minute))
    profile = load_profile("generic-x86_64").model_copy(update={"max_fps": 240})
    p = Measured(settings, profile=profile, supervisor=SupervisorSection(), backend=None, sink=lambda n, r: None,
                 stop=threading.Event(), capture=writer)
    p.periods = []
    spent: list[float] = []
    if p.capture is not None:
        observe = p.capture.observe

        def timed(*a: Any) -> None:
            t0 = time.perf_counter()
            observe(*a)
            spent.append(time.perf_counter() - t0)

        p.capture.observe = timed  # type: ignore[method-assign,assignment]
    p.start()
    stop.wait(seconds)
    p.halt()
    p.join(10)
    writer.drain(30)
    stop.set()
    writer.join(5)
    periods = np.array(p.periods[10:]) * 1000
    out = {"items": len(periods), "fps": round(1000 / float(periods.mean()), 1),
           "item_ms": {"p50": round(float(np.percentile(periods, 50)), 3),
                       "p95": round(float(np.percentile(periods, 95)), 3)}}
    if p.capture is not None:
        out["capture"] = {**p.capture.stats.as_dict(), "store": writer.store.stats.as_dict(),
                          "bytes": writer.store.size_bytes}
        # The loop's own share: the decision (and, when kept, the copy and queueing) per item.
        out["observe_us"] = {"mean": round(float(np.mean(spent)) * 1e6, 2),
                             "p95": round(float(np.percentile(spent, 95)) * 1e6, 2)}
        out["observe_share_percent"] = round(100 * float(np.sum(spent)) / float(np.sum(p.periods)), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-minute", type=float, default=60.0, help="the capture's max_per_minute")
    args = ap.parse_args()
    from agent.vision.cv import cv2

    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket"):
        FRAMES.append(cv2.resize(np.ascontiguousarray(PHOTOS[name]()[:, :, ::-1]), (512, 512)))
    model = ROOT / ".cache" / "models" / "face" / "face_detection_short_range.tflite"
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        for r in range(args.rounds):
            for mode in ("off", "on"):
                folder = Path(tmp) / f"{mode}-{r}"
                runs[mode].append(run(model, mode == "on", args.seconds, folder, args.per_minute))
                shutil.rmtree(folder, ignore_errors=True)
    fps = {m: float(np.mean([x["fps"] for x in v])) for m, v in runs.items()}
    p95 = {m: float(np.mean([x["item_ms"]["p95"] for x in v])) for m, v in runs.items()}
    report = {"machine": platform.machine(), "python": platform.python_version(), "seconds": args.seconds,
              "rounds": args.rounds, "max_per_minute": args.per_minute,
              "fps_off": round(fps["off"], 1), "fps_on": round(fps["on"], 1),
              "p95_ms_off": round(p95["off"], 3), "p95_ms_on": round(p95["on"], 3),
              "throughput_cost_percent": round(100 * (1 - fps["on"] / fps["off"]), 2),
              "loop_share_percent": round(float(np.mean([x["observe_share_percent"] for x in runs["on"]])), 3),
              "runs": runs}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
