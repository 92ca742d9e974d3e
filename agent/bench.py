"""`bench`: raw invoke against the whole pipeline, interleaved in one run so both see the same machine."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from agent.tasks.task import Inference


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 4), "p95": round(float(np.percentile(a, 95)), 4)}


def bench(inference: Inference, items: list[Any], runs: int = 100, warmup: int = 10,
          fixed_costs: bool = False) -> dict[str, Any]:
    """Time `runs` raw invokes and `runs` pipeline passes over `items` (decode excluded).

    `fixed_costs`: also time the resize of each frame alone (`resize_ms`), right after an invoke as in the
    pipeline. It is a cost of the frame's size, not of the model: on a Pi invoke is ~10x slower and the
    resize is not, so the benchmarks report it apart from pipeline / invoke. Also times `held_ms`: the
    pipeline for an item whose result the policy holds back (an unchanged scene: most frames of a pipeline
    reporting on change), which builds no result where the task can tell before (`Runner.gate`).
    Each of the three passes reads its own copy of the items, so each finds its frame as cold as a camera's
    new frame (last read a cycle of items ago), not warm from the pass before it: a 640x480 frame's resize
    timed straight after the pipeline had read the same frame took ~0.06 ms, ~0.08 ms cold as in the pipeline."""
    model, task = inference.model, inference.task
    if not items:
        items = [task.synthetic_item()]
    for i in range(warmup):
        inference.run(items[i % len(items)])
    resize = getattr(getattr(task, "preprocessor", None), "resize_only", None) if fixed_costs else None
    resize_items = _copies(items) if resize is not None else items
    held_items = _copies(items) if fixed_costs else items
    clock = time.perf_counter_ns
    invoke_ms: list[float] = []
    pipeline_ms: list[float] = []
    resize_ms: list[float] = []
    held_ms: list[float] = []
    gate = inference.gate
    for i in range(runs):
        item = items[i % len(items)]
        t0 = clock()
        model.invoke()
        t1 = clock()
        inference.run(item)
        t2 = clock()
        invoke_ms.append((t1 - t0) / 1e6)
        pipeline_ms.append((t2 - t1) / 1e6)
        if resize is not None:
            model.invoke()
            t3 = clock()
            resize(resize_items[i % len(items)])
            resize_ms.append((clock() - t3) / 1e6)
        if fixed_costs:
            inference.gate = _held_back
            try:
                model.invoke()
                t4 = clock()
                inference.process(held_items[i % len(items)])
                held_ms.append((clock() - t4) / 1e6)
            finally:
                inference.gate = gate
    report: dict[str, Any] = {
        "model": str(model.path),
        "backend": model.backend.name,
        "threads": model.threads,
        "invoke_ms": percentiles(invoke_ms),
        "pipeline_ms": percentiles(pipeline_ms),
        "items": runs,
    }
    invoke, pipeline = percentiles(invoke_ms), percentiles(pipeline_ms)
    if resize_ms:
        fixed = percentiles(resize_ms)
        report["resize_ms"] = fixed
        report["ratio_p50"] = round(pipeline["p50"] / invoke["p50"], 3)
        report["ratio_p50_without_resize"] = round((pipeline["p50"] - fixed["p50"]) / invoke["p50"], 3)
    if held_ms:
        held = percentiles(held_ms)
        report["held_ms"] = held
        report["ratio_p50_held"] = round(held["p50"] / invoke["p50"], 3)
        if resize_ms:
            report["ratio_p50_held_without_resize"] = round((held["p50"] - fixed["p50"]) / invoke["p50"], 3)
    return report


def _copies(items: list[Any]) -> list[Any]:
    """Items in memory of their own (arrays copied; anything else is shared, having no cache state to speak of)."""
    return [item.copy() if isinstance(item, np.ndarray) else item for item in items]


def _held_back(labels: list[str], scores: list[float]) -> bool:
    return False
