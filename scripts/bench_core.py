#!/usr/bin/env python3
"""Benchmark: raw interpreter invoke against our whole pipeline, per model, in one run. Prints JSON.

For each fixture model and each real third-party model: `invoke_ms` is the bare
`Invoke()` on an already-filled input; `pipeline_ms` is preprocess (a 640x480 BGR
frame, decode excluded) + invoke + postprocess. The two are interleaved frame by
frame so that both see the same machine load. `ratio_p50` = pipeline / invoke.
Targets (issues 2 and 16), read without the 640x480 frame's resize (`ratio_p50_without_resize`): <= 1.10 x
raw invoke for the benchmark-sized classifier (colors_bench_int8) and every BlazeFace detector; each row says its
`target_ratio`. The rest have none: on the 32x32 toys the invoke takes microseconds, and raw-tensor and wake
word pipelines report whole output tensors or stream audio, not one frame's result.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_models import fetch  # noqa: E402

from agent.bench import bench  # noqa: E402
from agent.manifest import load_spec  # noqa: E402
from agent.runtime import Model, load_backend  # noqa: E402
from agent.tasks import Inference, create_task  # noqa: E402


def models(fixtures: Path, cache: Path) -> list[Path]:
    real = fetch(cache)
    return [
        fixtures / "colors_bench_int8.json",
        fixtures / "colors_int8.json",
        fixtures / "colors_float.json",
        fixtures / "shapes_int8.json",
        *sorted((real / "face").glob("*.tflite")),
        *sorted((real / "wakeword").glob("*.tflite")),
    ]


def measure(path: Path, frame: Any, runs: int, threads: int) -> dict[str, Any]:
    spec = load_spec(path)
    model = Model(spec.path, threads=threads)
    inference = Inference(model, create_task(model, spec))
    items = [frame] if inference.task.item_kind == "image" else []
    report = bench(inference, items, runs=runs, warmup=max(10, runs // 10), fixed_costs=True)
    report["task"] = inference.task.key
    report["ratio_p50"] = round(report["pipeline_ms"]["p50"] / report["invoke_ms"]["p50"], 3)
    report["ratio_p95"] = round(report["pipeline_ms"]["p95"] / report["invoke_ms"]["p95"], 3)
    targeted = path.name.startswith("colors_bench_int8") or getattr(inference.task, "decoder", None) is not None
    report["target_ratio"] = 1.10 if targeted else None
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    frame = cv2.imread(str(ROOT / "tests" / "fixtures" / "images" / "red_1.png"))
    results = [measure(p, frame, args.runs, args.threads) for p in models(ROOT / "tests" / "fixtures", ROOT / ".cache")]
    bench_sized = next(r for r in results if r["model"].endswith("colors_bench_int8.tflite"))
    out = {
        "backend": load_backend().name,
        "backend_version": load_backend().version,
        "frame": [480, 640, 3],
        "threads": args.threads,
        "runs": args.runs,
        "models": results,
        # The target is about a classifier with real compute (colors_bench_int8: 160x160 input,
        # depthwise-separable blocks); on the 32x32 toys the 640x480 resize alone outweighs the invoke.
        "classify_ratio_p50": bench_sized["ratio_p50"],
        # The 640x480 -> input resize on its own line: a cost of the camera's frame size, not of the model.
        "classify_resize_ms_p50": bench_sized["resize_ms"]["p50"],
        "classify_ratio_p50_without_resize": bench_sized["ratio_p50_without_resize"],
        "classify_target_ratio": 1.10,
        "worst_targeted_ratio_p50_without_resize": max(
            r["ratio_p50_without_resize"] for r in results if r["target_ratio"] is not None),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
