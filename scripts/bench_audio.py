#!/usr/bin/env python3
"""Wake word benchmark (JSON): our streaming pipeline against pymicro-wakeword's own loop, in one run.

1. Real-time factor (audio seconds per CPU-bound wall second) on the same decoded recordings,
   ours and the reference's interleaved round by round, for each model alone and for all
   models listening together (we share one frontend; the reference runs one per model).
   The decisions on every file (detected or not, and when first) must be identical.
2. An audio-only agent process (`lepton-agent infer MANIFEST -`) fed raw PCM at real time:
   its CPU share of one core (measured after start-up), its resident memory, and whether
   OpenCV got into it.

Needs the test extra (pymicro-wakeword) and `.cache/models/wakeword` (scripts/fetch_models.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.manifest import load_spec  # noqa: E402
from agent.runtime import Model  # noqa: E402
from agent.tasks.wakeword import EXACT_MODEL_OPTIONS, MODEL_OPTIONS, WakeWordModel, WakeWordRunner  # noqa: E402

DATA = ROOT / "tests" / "fixtures" / "wakeword"
MODELS = ROOT / ".cache" / "models" / "wakeword"
NAMES = ("alexa", "hey_jarvis", "hey_mycroft", "okay_nabu")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _recordings() -> list[tuple[str, bytes]]:
    out = []
    for path in sorted(DATA.glob("*/*.wav")):
        with wave.open(str(path), "rb") as w:
            out.append((f"{path.parent.name}/{path.name}", w.readframes(w.getnframes())))
    return out


# -- the two pipelines ---------------------------------------------------------------


class Ours:
    def __init__(self, names: tuple[str, ...], options: dict[str, Any]) -> None:
        models = []
        for name in names:
            spec = load_spec(MODELS / f"{name}.json")
            models.append(WakeWordModel(Model(spec.path, **options), spec))
        self.runner = WakeWordRunner(models)

    def run(self, audio: bytes) -> tuple[float, dict[str, float | None]]:
        self.runner.reset()
        samples = np.frombuffer(audio, np.int16)
        t0 = time.perf_counter()
        results = self.runner.process(samples)
        elapsed = time.perf_counter() - t0
        first: dict[str, float | None] = {m.settings.label: None for m in self.runner.models}
        for r in results:
            if first[r["label"]] is None:
                first[r["label"]] = r["t"]
        return elapsed, first


class Reference:
    """pymicro-wakeword's own loop (its __main__): one MicroWakeWordFeatures per model."""

    def __init__(self, names: tuple[str, ...]) -> None:
        from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures

        self.pairs = [(MicroWakeWord.from_config(MODELS / f"{n}.json"), MicroWakeWordFeatures()) for n in names]

    def run(self, audio: bytes) -> tuple[float, dict[str, float | None]]:
        for mww, features in self.pairs:
            mww.reset()
            features.reset()
        first: dict[str, float | None] = {}
        elapsed = 0.0
        for mww, features in self.pairs:
            t0 = time.perf_counter()
            hit = None
            for step, row in enumerate(features.process_streaming(audio), start=1):
                if mww.process_streaming(row) and hit is None:
                    hit = round((step + 2) * 0.01, 3)
            elapsed += time.perf_counter() - t0
            first[mww.wake_word] = hit
        return elapsed, first


def _compare(files: list[tuple[str, bytes]], names: tuple[str, ...], rounds: int,
             options: dict[str, Any] = MODEL_OPTIONS) -> dict[str, Any]:
    ours, ref = Ours(names, options), Reference(names)
    audio_s = sum(len(a) for _, a in files) / 32000
    ours_rtf, ref_rtf = [], []
    differences = []
    for round_ in range(rounds):
        t_ours = t_ref = 0.0
        # Alternate who goes first so neither always meets a warm or a cold cache.
        order = (ours, ref) if round_ % 2 == 0 else (ref, ours)
        for name, audio in files:
            decisions = {}
            for side in order:
                elapsed, first = side.run(audio)
                decisions[side] = first
                if side is ours:
                    t_ours += elapsed
                else:
                    t_ref += elapsed
            if decisions[ours] != decisions[ref] and round_ == 0:
                differences.append({"file": name, "ours": decisions[ours], "reference": decisions[ref]})
        ours_rtf.append(audio_s / t_ours)
        ref_rtf.append(audio_s / t_ref)
    o, r = statistics.median(ours_rtf), statistics.median(ref_rtf)
    return {
        "models": list(names),
        "ours_realtime_factor": round(o, 1),
        "reference_realtime_factor": round(r, 1),
        "ratio": round(o / r, 2),
        "decisions_identical": not differences,
        "differences": differences,
    }


# -- an audio-only agent fed at real time -------------------------------------------------


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _realtime(files: list[tuple[str, bytes]], seconds: float, settle_s: float, block_ms: int) -> dict[str, Any]:
    audio = b"".join(a for _, a in files)
    cmd = [sys.executable, "-m", "agent", "infer", str(MODELS / "alexa.json"), "-"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout.read().decode().splitlines()))  # type: ignore[union-attr]
    reader.start()
    pace = threading.Event()  # never set: its wait() is the interruptible clock of the feed
    chunk = 32 * block_ms  # what a microphone source hands over per block
    start = time.monotonic()
    sent = 0
    mark: tuple[float, float] | None = None
    rss = []
    while True:
        now = time.monotonic() - start
        if now >= settle_s + seconds:
            break
        if mark is None and now >= settle_s:
            mark = (time.monotonic(), _cpu_s(proc.pid))
        if mark is not None and int(now) != int(now - 0.03):
            rss.append(_status_mb(proc.pid, "VmRSS"))
        offset = sent % len(audio)
        proc.stdin.write(audio[offset : offset + chunk])
        proc.stdin.flush()
        sent += chunk
        pace.wait(max(0.0, sent / 32000 - (time.monotonic() - start)))
    assert mark is not None
    wall, cpu = time.monotonic() - mark[0], _cpu_s(proc.pid) - mark[1]
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    peak = _status_mb(proc.pid, "VmHWM")
    anon, file = _status_mb(proc.pid, "RssAnon"), _status_mb(proc.pid, "RssFile")
    proc.stdin.close()
    proc.wait(timeout=30)
    reader.join(timeout=30)
    return {
        "fed_s": round(seconds, 1),
        "block_ms": block_ms,
        "cpu_percent_of_one_core": round(100 * cpu / wall, 3),
        "rss_mb": round(statistics.median(rss), 1),
        "peak_rss_mb": round(peak, 1),
        # RssFile: pages of shared libraries (numpy/OpenBLAS, pydantic-core, the interpreter);
        # RssAnon: what the process itself allocated.
        "rss_anon_mb": round(anon, 1),
        "rss_file_mb": round(file, 1),
        "opencv_loaded": "cv2" in maps or "opencv" in maps,
        "detections": len(lines),
        "exit_code": proc.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all files (median taken)")
    parser.add_argument("--realtime-s", type=float, default=30.0, help="seconds of audio fed at real time")
    parser.add_argument("--settle-s", type=float, default=5.0, help="start-up time left out of the CPU share")
    args = parser.parse_args()
    files = _recordings()
    report: dict[str, Any] = {
        "backend": Model(MODELS / "alexa.tflite", **MODEL_OPTIONS).backend.name,
        "files": len(files),
        "audio_s": round(sum(len(a) for _, a in files) / 32000, 3),
        "rounds": args.rounds,
        "per_model": [_compare(files, (name,), args.rounds) for name in NAMES],
        "all_models_together": _compare(files, NAMES, args.rounds),
        # The builtin kernels: the reference's probabilities bit for bit, at the cost of speed.
        "per_model_exact": [_compare(files, (name,), args.rounds, EXACT_MODEL_OPTIONS) for name in NAMES],
    }
    ratios = [m["ratio"] for m in report["per_model"]]
    report["single_model_ratio_min"] = min(ratios)
    compared = [*report["per_model"], report["all_models_together"], *report["per_model_exact"]]
    report["decisions_identical"] = all(m["decisions_identical"] for m in compared)
    # The microphone source's default block (100 ms), and the 30 ms blocks voice satellites often use.
    report["realtime_feed"] = _realtime(files, args.realtime_s, args.settle_s, 100)
    report["realtime_feed_30ms_blocks"] = _realtime(files, args.realtime_s, args.settle_s, 30)
    feed = report["realtime_feed"]
    report["targets"] = {
        "ratio_at_least_1.5": report["single_model_ratio_min"] >= 1.5,
        "cpu_at_most_1_percent": feed["cpu_percent_of_one_core"] <= 1.0,
        "rss_at_most_60_mb": feed["peak_rss_mb"] <= 60.0,
        "no_opencv": not feed["opencv_loaded"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
