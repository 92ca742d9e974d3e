"""`bench`: raw invoke against the whole pipeline, interleaved in one run so both see the same machine."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from agent.tasks.base import Inference


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 4), "p95": round(float(np.percentile(a, 95)), 4)}


def bench(inference: Inference, items: list[Any], runs: int = 100, warmup: int = 10) -> dict[str, Any]:
    """Time `runs` raw invokes and `runs` pipeline passes over `items` (decode excluded)."""
    model, task = inference.model, inference.task
    if not items:
        items = [task.synthetic_item()]
    for i in range(warmup):
        inference.run(items[i % len(items)])
    clock = time.perf_counter_ns
    invoke_ms: list[float] = []
    pipeline_ms: list[float] = []
    for i in range(runs):
        t0 = clock()
        model.invoke()
        t1 = clock()
        inference.run(items[i % len(items)])
        t2 = clock()
        invoke_ms.append((t1 - t0) / 1e6)
        pipeline_ms.append((t2 - t1) / 1e6)
    return {
        "model": str(model.path),
        "backend": model.backend.name,
        "threads": model.threads,
        "invoke_ms": percentiles(invoke_ms),
        "pipeline_ms": percentiles(pipeline_ms),
        "items": runs,
    }
