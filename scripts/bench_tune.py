#!/usr/bin/env python3
"""Tuning benchmark (issue 20): how long an on-device tune takes, and what it costs the loop. JSON.

One run, one process: the BlazeFace full-range pipeline (float base, its int8 from `model quantize`,
short-range, in the manifest `model compare` writes) reads a looping video of an LFW mosaic at `--fps`,
with the profile's `--threads`. The loop's per-item latency (pre + invoke + post, as the results carry
it) is recorded in `--repeats` pairs of windows, a window without a tune (`outside`) and one with a
tune (`during`: the items the loop processed while the tuner measured the variants beside it), each as
long as the other, their order alternating from pair to pair: a shared machine's load drifts over
minutes, and each pair compares two neighbouring windows. Printed: per pair the two p95s and their
ratio, the median of those ratios (what to read on a noisy machine), the pooled p95s, the tunes'
durations, the load average before and after, and the last table. On this frame only the base agrees
with itself (min_agreement 0.5), so the loop runs the same model in every window. The issue's target:
the loop's p95 during a tune within 10 % of its p95 outside one.

    .venv/bin/python scripts/bench_tune.py [--threads 1] [--fps 10] [--repeats 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
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

from compress_inputs import face_photos  # noqa: E402
from fetch_models import fetch  # noqa: E402

from agent.config import PipelineSettings, PolicySettings, SupervisorSection  # noqa: E402
from agent.pipeline import Pipeline  # noqa: E402
from agent.profiles import load_profile  # noqa: E402
from agent.tune import Tuner  # noqa: E402


def _fleet(*args: str) -> None:
    code = "import sys; from agent.cli import fleet_main; sys.exit(fleet_main())"
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, cwd=ROOT)


def _variants(folder: Path) -> tuple[Path, Path]:
    import cv2

    models = fetch(ROOT / ".cache") / "face"
    calib, evaluation = face_photos(folder / "photos")
    for name in ("face_detection_full_range.tflite", "face_detection_short_range.tflite"):
        shutil.copy(models / name, folder / name)
    _fleet("model", "quantize", str(folder / "face_detection_full_range.tflite"), "--calib", str(calib),
           "-o", str(folder / "full_int8.tflite"))
    manifest = folder / "faces.json"
    _fleet("model", "compare", str(folder / "face_detection_full_range.tflite"), str(folder / "full_int8.tflite"),
           str(folder / "face_detection_short_range.tflite"), "--eval", str(evaluation), "--runs", "2",
           "--write-manifest", str(manifest))
    image = cv2.imread(str(evaluation / "lfw_0.png"))
    assert image is not None
    video = folder / "faces.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"FFV1"), 10, (image.shape[1], image.shape[0]))
    for _ in range(10):
        writer.write(image)
    writer.release()
    return manifest, video


def _p(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values)
    return {"items": len(values), "p50": round(float(np.percentile(a, 50)), 3) if len(a) else None,
            "p95": round(float(np.percentile(a, 95)), 3) if len(a) else None}


def _window(items: list[tuple[float, float]], lock: threading.Lock, a: float, b: float) -> list[float]:
    with lock:
        return [ms for t, ms in items if a <= t < b]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=6, help="pairs of windows, one with a tune (default 6)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        manifest, video = _variants(Path(tmp))
        items: list[tuple[float, float]] = []  # (monotonic when emitted, item latency ms)
        lock = threading.Lock()

        def sink(name: str, payload: dict[str, Any]) -> None:
            with lock:
                items.append((time.monotonic(), sum(payload["latency_ms"].values())))

        settings = PipelineSettings(name="faces", source=str(video), model=manifest, threshold=0.5,
                                    source_options={"realtime": True, "loop": True, "fps": args.fps},
                                    policy=PolicySettings(on_change=False, max_rate=1000),
                                    latency_budget_ms=1000.0, min_agreement=0.5)
        profile = load_profile("generic-x86_64").model_copy(update={"threads": args.threads, "max_fps": args.fps})
        stop = threading.Event()
        p = Pipeline(settings, profile=profile, supervisor=SupervisorSection(), backend=None, sink=sink, stop=stop)
        p.start()
        pairs: list[dict[str, Any]] = []
        outside_all: list[float] = []
        during_all: list[float] = []
        durations: list[float] = []
        try:
            stop.wait(2.0)  # warm-up, not measured
            tuner = Tuner(lambda: [p], stop)
            result = tuner.tune(p, "bench")  # the first tune loads every variant once: not measured either
            length = result.duration_s
            for k in range(args.repeats):
                spans: dict[str, tuple[float, float]] = {}
                for kind in (("outside", "during") if k % 2 == 0 else ("during", "outside")):
                    t0 = time.monotonic()
                    if kind == "during":
                        result = tuner.tune(p, "bench")
                        durations.append(result.duration_s)
                    else:
                        stop.wait(length)
                    spans[kind] = (t0, time.monotonic())
                length = float(np.median(durations))
                out, dur = (_window(items, lock, *spans[kind]) for kind in ("outside", "during"))
                outside_all += out
                during_all += dur
                po, pd = _p(out), _p(dur)
                pairs.append({"outside": po, "during": pd,
                              "p95_ratio": round(pd["p95"] / po["p95"], 3) if po["p95"] and pd["p95"] else None})
        finally:
            p.halt()
            p.join(10)
    ratios = [r["p95_ratio"] for r in pairs if r["p95_ratio"] is not None]
    print(json.dumps({
        "threads": args.threads, "fps": args.fps, "cpus": os.cpu_count(), "load_avg": {"before": load_before,
                                                                                    "after": _load()},
        "tunes": len(durations), "tune_s": {"p50": round(float(np.median(durations)), 3),
                                            "max": round(max(durations), 3)},
        "loop_ms": {"outside": _p(outside_all), "during": _p(during_all),
                    "p95_ratio_median": round(float(np.median(ratios)), 3) if ratios else None,
                    "pairs": pairs},
        "tune": result.as_dict(),
    }, indent=1))
    return 0

if __name__ == "__main__":
    sys.exit(main())
