"""`bench` on audio: raw invoke against the whole streaming pipeline, per model window, in one run."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from agent.bench import percentiles
from agent.tasks.wakeword import SAMPLE_RATE, STEP_SAMPLES, WakeWordRunner

SYNTHETIC_S = 10.0


def synthetic_clip() -> np.ndarray[Any, np.dtype[np.int16]]:
    """Ten seconds of quiet noise, the same every run."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal(int(SYNTHETIC_S * SAMPLE_RATE)) * 300).astype(np.int16)


def bench_audio(runner: WakeWordRunner, clips: list[np.ndarray[Any, Any]], runs: int = 100,
                warmup: int = 10) -> dict[str, Any]:
    """Feed the clips one model window at a time (at least `runs` windows, every clip at least once).

    `pipeline_ms` is one window through frontend, quantization, invoke and decision;
    `invoke_ms` a bare invoke interleaved with it. `realtime_factor` is audio seconds
    per wall second of pipeline time.
    """
    clips = clips or [synthetic_clip()]
    window = STEP_SAMPLES * max(m.stride for m in runner.models)
    model = runner.model
    clock = time.perf_counter_ns
    invoke_ms: list[float] = []
    pipeline_ms: list[float] = []
    audio_samples = 0
    pipeline_ns = 0
    for i in range(warmup):
        model.invoke()
        runner.process(clips[0][(i * window) % len(clips[0]) :][:window])
    while len(pipeline_ms) < runs or audio_samples == 0:
        for clip in clips:
            runner.reset()
            for start in range(0, len(clip), window):
                piece = clip[start : start + window]
                t0 = clock()
                model.invoke()
                t1 = clock()
                runner.process(piece)
                t2 = clock()
                invoke_ms.append((t1 - t0) / 1e6)
                pipeline_ms.append((t2 - t1) / 1e6)
                pipeline_ns += t2 - t1
                audio_samples += len(piece)
    runner.reset()
    elapsed_s = pipeline_ns / 1e9
    audio_s = audio_samples / SAMPLE_RATE
    return {
        "model": str(model.path),
        "backend": model.backend.name,
        "threads": model.threads,
        "invoke_ms": percentiles(invoke_ms),
        "pipeline_ms": percentiles(pipeline_ms),
        "items": len(pipeline_ms),
        "audio_s": round(audio_s, 3),
        "elapsed_s": round(elapsed_s, 6),
        "realtime_factor": round(audio_s / elapsed_s, 1) if elapsed_s > 0 else None,
    }
