"""Every real third-party model loads, inspects correctly and benches on this lane's runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

FACE = {
    # file: (input shape, recognised task detail fragment)
    "face_detection_short_range.tflite": ([1, 128, 128, 3], "BlazeFace short-range 128x128"),
    "face_detection_front.tflite": ([1, 128, 128, 3], "BlazeFace short-range 128x128"),
    "face_detection_back.tflite": ([1, 256, 256, 3], "BlazeFace back-camera 256x256"),
    "face_detection_full_range.tflite": ([1, 192, 192, 3], "BlazeFace full-range 192x192"),
    "face_detection_full_range_sparse.tflite": ([1, 192, 192, 3], "BlazeFace full-range 192x192"),
    "face_landmark.tflite": ([1, 192, 192, 3], "no known output layout"),
    "iris_landmark.tflite": ([1, 64, 64, 3], "no known output layout"),
}
WAKEWORDS = ("alexa", "hey_jarvis", "hey_mycroft", "okay_nabu")


@pytest.mark.parametrize("name", sorted(FACE))
def test_face_models_inspect_and_bench(models_dir: Path, name: str, backend: str) -> None:
    path = models_dir / "face" / name
    r = run_cli("inspect", str(path), "--format", "json")
    assert r.rc == 0, r.err
    info = json.loads(r.out)
    shape, detail = FACE[name]
    assert info["inputs"][0]["shape"] == shape and info["inputs"][0]["dtype"] == "float32"
    assert info["int8"] is False and "CONV_2D" in info["float_ops"]
    assert "DEQUANTIZE" in info["ops"] or name.startswith(("face_landmark", "iris"))
    assert detail in info["task_detail"]
    assert info["signatures"] == [] and info["stateful"] is False
    b = run_cli("bench", str(path), "--runs", "5", "--warmup", "1")
    assert b.rc == 0, b.err
    report = json.loads(b.out)
    assert report["backend"] == backend and report["items"] == 5 and report["invoke_ms"]["p50"] > 0


@pytest.mark.parametrize("name", WAKEWORDS)
def test_wakeword_models_inspect_and_bench(models_dir: Path, name: str) -> None:
    manifest = models_dir / "wakeword" / f"{name}.json"
    r = run_cli("inspect", str(manifest), "--format", "json")
    assert r.rc == 0, r.err
    info = json.loads(r.out)
    assert info["int8"] is True and info["stateful"] is True
    assert info["inputs"][0]["dtype"] == "int8" and info["inputs"][0]["shape"][2] == 40
    assert info["outputs"][0]["dtype"] == "uint8"
    assert info["task"] == "wakeword" and info["micro"]["probability_cutoff"] > 0
    assert info["signatures"] == ["serving_default"]
    b = run_cli("bench", str(models_dir / "wakeword" / f"{name}.tflite"), "--runs", "20")
    assert b.rc == 0, b.err
    assert json.loads(b.out)["invoke_ms"]["p50"] > 0
