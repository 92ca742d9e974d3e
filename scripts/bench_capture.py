#!/usr/bin/env python3
"""Benchmark: what sample capture costs a pipeline's loop, as JSON (issue 15).

One process, one model (BlazeFace short range), real photos (scikit-image's, at 512x512) served from
memory as fast as the loop takes them, the daemon's own `Pipeline` with its fps limit lifted (so the
figure is the loop's throughput, not the limit). Capture "on" means a band of [0, 1]: every frame is a
band hit, so every frame goes through the capture decision and as many as `max_per_minute` allows
(`--per-minute`: the default 60, up to the config's ceiling of 6000, 100 a second) are copied, queued,
JPEG-encoded, hashed and fsync'd into a store by the writer thread.

On a shared, noisy machine two separate runs differ by more than capture costs, so the modes are
interleaved inside one running loop: blocks of `--block` items, capture switched on or off between two
items (`Pipeline.capture`, which the loop reads per item), in ABBA pairs (off-on, on-off, …) so that a
drift in the machine's load falls on both modes alike. Each pair gives one ratio fps_on / fps_off; the
median of `--pairs` ratios (with its quartiles, and `median_ci95`: a bootstrap interval of the median)
is the throughput figure, `cost_percent` = 100 x (1 - median). A block whose loop was preempted by
another process is slow whatever its mode; the typical item (the median time per item of a block) is
not, so `typical_item_ratio_on_off` (median over the pairs of median_off / median_on) reads through
that noise. `item_ms` pools the time per item (one emit to the next) of each mode: p50 and p95.

Beside it, the count proof, which noise cannot blur: CPU time (`time.thread_time`) spent in capture by
the loop's thread per item (the decision, and for a kept frame the copy and queueing), over the loop
thread's CPU time per item; and the writer thread's CPU time per stored sample (JPEG, hash, fsync), which
runs beside the loop and is bounded by `max_per_minute`. `uptime` (the load averages) before and after
says how busy the machine was.

    scripts/bench_capture.py [--pairs 200] [--block 50] [--per-minute 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from face_photos import PHOTOS  # noqa: E402

from agent.config import PipelineSettings, SampleCaptureSettings, SupervisorSection  # noqa: E402
from agent.pipeline import Pipeline  # noqa: E402
from agent.profiles import load_profile  # noqa: E402
from agent.samples.capturer import CaptureWriter, PipelineCapture  # noqa: E402
from agent.samples.sample_store import SampleStore  # noqa: E402
from agent.sources.source import Item, Source, register_source  # noqa: E402

FRAMES: list[np.ndarray[Any, Any]] = []
WARMUP_ITEMS = 30


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


class Block:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.periods: list[float] = []
        self.cpu = 0.0
        """The loop thread's CPU seconds over the block."""
        self.capture_cpu = 0.0
        """Of which in capture's `observe`."""


class Interleaved(Pipeline):
    """The daemon's pipeline, fps limit lifted; switches capture on and off between blocks, in its own thread."""

    def plan(self, pairs: int, block: int) -> None:
        self.kept: PipelineCapture | None = self.capture
        assert self.kept is not None
        observe = self.kept.observe

        def timed(*a: Any, **kw: Any) -> None:
            t0 = time.thread_time()
            observe(*a, **kw)
            self.current.capture_cpu += time.thread_time() - t0

        self.kept.observe = timed  # type: ignore[method-assign]
        self.schedule = [m for i in range(pairs) for m in (("off", "on") if i % 2 == 0 else ("on", "off"))]
        self.block = block
        self.blocks: list[Block] = []
        self.done = threading.Event()
        self.warmup = WARMUP_ITEMS
        self.last: float | None = None
        self.last_cpu = 0.0
        self.current = Block("warmup")

    def admit(self, item: Item) -> bool:
        super().admit(item)
        return True

    def _emit(self, item: Item, results: list[dict[str, Any]], runner: Any) -> None:
        super()._emit(item, results, runner)
        now, cpu = time.perf_counter(), time.thread_time()
        block = self.current
        if self.last is not None and block.mode != "warmup":
            block.periods.append(now - self.last)
            block.cpu += cpu - self.last_cpu
        self.last, self.last_cpu = now, cpu
        if block.mode == "warmup":
            self.warmup -= 1
            if self.warmup > 0:
                return
        elif len(block.periods) < self.block:
            return
        else:
            self.blocks.append(block)
        if len(self.blocks) == len(self.schedule):
            self.capture = self.kept
            self.done.set()
            self.halt()
            return
        self.current = Block(self.schedule[len(self.blocks)])
        self.capture = self.kept if self.current.mode == "on" else None  # read by the loop from the next item on


def load_averages() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200, help="ABBA pairs of blocks (one ratio each)")
    ap.add_argument("--block", type=int, default=50, help="items per block")
    ap.add_argument("--per-minute", type=float, default=60.0, help="the capture's max_per_minute")
    args = ap.parse_args()
    from agent.vision.cv import cv2

    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket"):
        FRAMES.append(cv2.resize(np.ascontiguousarray(PHOTOS[name]()[:, :, ::-1]), (512, 512)))
    model = ROOT / ".cache" / "models" / "face" / "face_detection_short_range.tflite"
    load_before = load_averages()
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        stop = threading.Event()
        writer = CaptureWriter(SampleStore(Path(tmp), 256 * 1024 * 1024, reserve_bytes=0), "bench", stop)
        write = writer.write
        writer_cpu: list[float] = []

        def timed_write(pending: Any) -> bool:
            t0 = time.thread_time()
            try:
                return write(pending)
            finally:
                writer_cpu.append(time.thread_time() - t0)

        writer.write = timed_write  # type: ignore[method-assign]
        writer.start()
        settings = PipelineSettings(name="faces", source="bench:photos", model=model,
                                    capture=SampleCaptureSettings(enabled=True, band=(0.0, 1.0),
                                                                  max_per_minute=args.per_minute))
        profile = load_profile("generic-x86_64").model_copy(update={"max_fps": 1000})
        p = Interleaved(settings, profile=profile, supervisor=SupervisorSection(), backend=None,
                        sink=lambda n, r: None, stop=threading.Event(), capture=writer)
        p.plan(args.pairs, args.block)
        started = time.monotonic()
        p.start()
        finished = p.done.wait(3600)
        p.halt()
        p.join(10)
        writer.drain(60)
        stop.set()
        writer.join(5)
        elapsed = time.monotonic() - started
        stats = p.kept.stats.as_dict() if p.kept is not None else {}
        store = writer.store.stats.as_dict()
    if not finished:
        print("bench_capture: the loop did not finish its blocks", file=sys.stderr)
        return 1
    load_after = load_averages()

    def fps(b: Block) -> float:
        return len(b.periods) / sum(b.periods)

    ratios, typical = [], []
    for i in range(0, len(p.blocks), 2):
        pair = {b.mode: b for b in p.blocks[i:i + 2]}
        ratios.append(fps(pair["on"]) / fps(pair["off"]))
        typical.append(float(np.median(pair["off"].periods)) / float(np.median(pair["on"].periods)))
    by_mode = {m: [b for b in p.blocks if b.mode == m] for m in ("off", "on")}
    periods = {m: np.array([x for b in bs for x in b.periods]) * 1000 for m, bs in by_mode.items()}
    on_items = sum(len(b.periods) for b in by_mode["on"])
    loop_cpu_on = sum(b.cpu for b in by_mode["on"])
    capture_cpu = sum(b.capture_cpu for b in by_mode["on"])
    def spread(values: list[float]) -> dict[str, Any]:
        q1, median, q3 = (float(x) for x in np.percentile(values, [25, 50, 75]))
        # How well the median itself is known: 95 % of the medians of 2000 resamples of the pairs.
        rng = np.random.default_rng(0)
        medians = np.median(rng.choice(np.array(values), (2000, len(values))), axis=1)
        low, high = (round(float(x), 4) for x in np.percentile(medians, [2.5, 97.5]))
        return {"median": round(median, 4), "median_ci95": [low, high], "q1": round(q1, 4), "q3": round(q3, 4)}

    report = {
        "machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
        "load_average_before": load_before, "load_average_after": load_after,
        "pairs": args.pairs, "block_items": args.block, "max_per_minute": args.per_minute,
        "seconds": round(elapsed, 1),
        "fps": {m: round(float(len(v) / (v.sum() / 1000)), 1) for m, v in periods.items()},
        "item_ms": {m: {"p50": round(float(np.percentile(v, 50)), 3), "p95": round(float(np.percentile(v, 95)), 3)}
                    for m, v in periods.items()},
        "fps_ratio_on_off": spread(ratios),
        "typical_item_ratio_on_off": spread(typical),
        "cost_percent": round(100 * (1 - float(np.median(ratios))), 2),
        "typical_cost_percent": round(100 * (1 - float(np.median(typical))), 2),
        "count_proof": {
            "loop_cpu_us_per_item": round(1e6 * loop_cpu_on / on_items, 1),
            "capture_cpu_us_per_item": round(1e6 * capture_cpu / on_items, 2),
            "capture_share_of_loop_cpu_percent": round(100 * capture_cpu / loop_cpu_on, 3),
            "writer_cpu_ms_per_sample": round(1e3 * float(np.mean(writer_cpu)), 2) if writer_cpu else None,
            "writer_samples": len(writer_cpu),
        },
        "capture": stats, "store": store,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
