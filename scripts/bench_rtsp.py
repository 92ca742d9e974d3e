#!/usr/bin/env python3
"""RTSP frame freshness: the agent's stream source against a bare `cv2.VideoCapture`, on the same stream. JSON.

Starts the tests' RTSP camera (tests/rtsp_server.py: gst-rtsp-server, 640x480 15 fps H.264 of real
photos, every frame stamped with the time the server pushed it) on a free loopback port; then, one
after the other on that stream, for `--seconds` each:
- `bare`: `cv2.VideoCapture(url)` read in a loop, the face model run on every frame read;
- `agent`: the agent's source (`open_source(url)`: capture thread, latest-frame semantics), the same
  model on every item read, as the pipeline's loop does; `agent_decode_threads_1` the same with the
  source option `decode_threads = 1` (FFmpeg's frame threading holds a frame back per extra thread).
Each starts with `WARMUP_S` not counted (the frames FFmpeg buffered while opening come in a burst),
and reports `open_s`, the time to the first frame. For each, the frame age (now - the server's stamp)
`at_capture` (when the frame was read/grabbed) and
`at_result` (when the model's answer is ready), p50/p95/max in ms, the frames processed per second and,
for the agent, the stale frames it dropped. Both clocks are this machine's: the ages are end to end
(encode, RTP, decode, queueing, inference).

    .venv/bin/python scripts/bench_rtsp.py [--seconds 8] [--transport tcp|udp]
Needs the system RTSP server (scripts/lib.sh ensure_rtsp_server).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from broker import free_port  # noqa: E402
from fetch_models import fetch  # noqa: E402
from rtsp_camera import RtspCamera, read_stamp, server_available  # noqa: E402

from agent.manifest import load_spec  # noqa: E402
from agent.runtime import Model  # noqa: E402
from agent.sources.source import open_source  # noqa: E402
from agent.tasks import Inference, create_task  # noqa: E402
from agent.vision.cv import cv2  # noqa: E402

WARMUP_S = 2.0


def _summary(ages: list[float]) -> dict[str, float]:
    a = np.array(ages) * 1000.0
    return {"p50": round(float(np.percentile(a, 50)), 1), "p95": round(float(np.percentile(a, 95)), 1),
            "max": round(float(a.max()), 1)}


def _bare(url: str, inference: Inference, seconds: float, transport: str | None) -> dict[str, Any]:
    import os

    if transport:
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = f"rtsp_transport;{transport}"
    t0 = time.monotonic()
    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
    os.environ.pop("OPENCV_FFMPEG_CAPTURE_OPTIONS", None)
    if not cap.isOpened():
        raise SystemExit(f"bench_rtsp: cv2 cannot open {url}")
    capture, result = [], []
    first: float | None = None
    end = time.monotonic() + WARMUP_S + seconds
    while time.monotonic() < end:
        ok, frame = cap.read()
        if not ok:
            continue
        first = first or time.monotonic() - t0
        now, stamp = time.time(), read_stamp(frame)
        inference.run(frame)
        if stamp is not None and time.monotonic() > end - seconds:
            capture.append(now - stamp)
            result.append(time.time() - stamp)
    cap.release()
    return {"open_s": round(first or 0.0, 2), "frames": len(capture), "fps": round(len(capture) / seconds, 2),
            "age_ms": {
        "at_capture": _summary(capture), "at_result": _summary(result)}}


def _agent(url: str, inference: Inference, seconds: float, transport: str | None,
           decode_threads: int | None = None) -> dict[str, Any]:
    t0 = time.monotonic()
    options: dict[str, Any] = {"transport": transport} if transport else {}
    if decode_threads is not None:
        options["decode_threads"] = decode_threads
    source = open_source(url, options)
    source.open()
    capture, result = [], []
    first: float | None = None
    dropped_before = 0
    try:
        end = time.monotonic() + WARMUP_S + seconds
        while time.monotonic() < end:
            item = source.read(0.5)
            if item is None:
                continue
            first = first or time.monotonic() - t0
            stamp = read_stamp(item.data)
            inference.run(item.data)
            if time.monotonic() <= end - seconds:
                dropped_before = source.stats.dropped
            elif stamp is not None:
                capture.append(item.ts - stamp)
                result.append(time.time() - stamp)
    finally:
        source.close()
    return {"open_s": round(first or 0.0, 2), "frames": len(capture), "fps": round(len(capture) / seconds, 2),
            "dropped": source.stats.dropped - dropped_before,
            "age_ms": {"at_capture": _summary(capture), "at_result": _summary(result)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--transport", choices=("tcp", "udp"))
    args = ap.parse_args()
    problem = server_available()
    if problem is not None:
        print(f"bench_rtsp: {problem}", file=sys.stderr)
        return 2
    spec = load_spec(fetch(ROOT / ".cache") / "face" / "face_detection_short_range.tflite")
    model = Model(spec.path, threads=1)
    inference = Inference(model, create_task(model, spec))
    with tempfile.TemporaryDirectory() as tmp, RtspCamera(Path(tmp), free_port()) as cam:
        url = cam.url()
        report = {"stream": "640x480 15 fps H.264 (gst-rtsp-server, x264 zerolatency), loopback",
                  "transport": args.transport or "tcp (default)", "model": spec.name, "seconds": args.seconds,
                  "bare_cv2": _bare(url, inference, args.seconds, args.transport),
                  "agent": _agent(url, inference, args.seconds, args.transport),
                  "agent_decode_threads_1": _agent(url, inference, args.seconds, args.transport, 1)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
