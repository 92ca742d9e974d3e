"""`lepton-agent infer / inspect / bench` end to end on real models and real files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli

import agent
from agent.manifest import load_spec
from agent.runtime import Model, load_backend
from agent.tasks import Inference, create_task


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_colours_are_classified_with_labels_and_latency(fixtures: Path) -> None:
    images = sorted((fixtures / "images").glob("[rgb]*_*.png"))
    assert len(images) == 6
    r = run_cli("infer", str(fixtures / "colors_int8.json"), *map(str, images))
    assert r.rc == 0, r.err
    lines = _lines(r.out)
    assert [line["source"] for line in lines] == [str(p) for p in images]
    for line, path in zip(lines, images, strict=True):
        assert line["frame"] == 0 and line["task"] == "classify"
        assert line["model"] == {"name": "colors", "version": 1}
        assert line["classes"][0]["label"] == path.name.split("_")[0]
        assert line["classes"][0]["score"] > 0.5
        assert set(line["latency_ms"]) == {"pre", "invoke", "post"}
        assert all(isinstance(v, float) for v in line["latency_ms"].values())
        # probabilities already come from the model's SOFTMAX: not re-normalised into mush
        assert sum(c["score"] for c in line["classes"]) == pytest.approx(1.0, abs=0.02)


def test_benchmark_sized_classifier(fixtures: Path) -> None:
    images = sorted((fixtures / "images").glob("[rgb]*_*.png"))
    r = run_cli("infer", str(fixtures / "colors_bench_int8.json"), *map(str, images))
    assert r.rc == 0, r.err
    for line, path in zip(_lines(r.out), images, strict=True):
        assert line["classes"][0]["label"] == path.name.split("_")[0]


def test_logits_get_softmax_and_gray_model_runs_on_colour_files(fixtures: Path) -> None:
    images = [fixtures / "images" / f"{s}_1.png" for s in ("circle", "square", "triangle")]
    r = run_cli("infer", str(fixtures / "shapes_int8.json"), *map(str, images), "--top-k", "3")
    assert r.rc == 0, r.err
    for line, shape in zip(_lines(r.out), ("circle", "square", "triangle"), strict=True):
        assert line["classes"][0]["label"] == shape
        assert len(line["classes"]) == 3
        assert sum(c["score"] for c in line["classes"]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(("manifest", "top_k"), [("colors_int8.json", 3), ("colors_float.json", 3),
                                                  ("colors_bench_int8.json", 2), ("shapes_int8.json", 3),
                                                  ("shapes_int8.json", 1)])
def test_a_few_classes_give_the_same_result_in_python_floats_as_in_arrays(
        fixtures: Path, manifest: str, top_k: int) -> None:
    # Up to classify.FEW classes the scores are finished in Python floats (one numpy call after the invoke),
    # more in arrays: quantized and float outputs, softmax applied or not, top-k below the class count: the
    # same classes in the same order (equal scores too: the higher index first), scores to the 6th decimal.
    import cv2

    spec = load_spec(fixtures / manifest)
    spec = spec.model_copy(update={"postprocess": spec.postprocess.model_copy(update={"top_k": top_k})})
    model = Model(spec.path, threads=1)
    inference = Inference(model, create_task(model, spec))
    ties = 0
    for path in sorted((fixtures / "images").glob("*_[12].png")):
        frame = cv2.imread(str(path))
        inference.task._few = True  # type: ignore[attr-defined]
        few = inference.run(frame)["classes"]
        inference.task._few = False  # type: ignore[attr-defined]
        arrays = inference.run(frame)["classes"]
        assert [c["label"] for c in few] == [c["label"] for c in arrays], (path.name, few, arrays)
        assert all(abs(a["score"] - b["score"]) <= 1e-6 for a, b in zip(few, arrays, strict=True)), path.name
        ties += len({c["score"] for c in arrays}) < len(arrays)
    assert manifest != "colors_int8.json" or ties  # a uint8 softmax ties its zeros: the order rule is exercised


def test_folder_glob_and_video(fixtures: Path) -> None:
    folder = fixtures / "images"
    r = run_cli("infer", str(fixtures / "colors_float.json"), str(folder), str(folder / "green_*.png"),
                str(fixtures / "video" / "colors.avi"))
    assert r.rc == 0, r.err
    lines = _lines(r.out)
    by_source: dict[str, list[dict]] = {}
    for line in lines:
        by_source.setdefault(line["source"], []).append(line)
    assert len(by_source[str(folder)]) == len(list(folder.glob("*.png")))
    assert [line["frame"] for line in by_source[str(folder)]] == list(range(len(by_source[str(folder)])))
    assert all("file" in line for line in by_source[str(folder)])
    greens = by_source[str(folder / "green_*.png")]
    assert len(greens) == 2 and all(g["classes"][0]["label"] == "green" for g in greens)
    video = by_source[str(fixtures / "video" / "colors.avi")]
    assert [v["frame"] for v in video] == list(range(12))
    assert [v["classes"][0]["label"] for v in video] == ["red"] * 4 + ["green"] * 4 + ["blue"] * 4


def test_threshold_labels_and_table(fixtures: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("rouge\nvert\nbleu\n")
    image = str(fixtures / "images" / "blue_1.png")
    r = run_cli("infer", str(fixtures / "colors_int8.tflite"), image, "--labels", str(labels), "--threshold", "0.5")
    assert r.rc == 0, r.err
    (line,) = _lines(r.out)
    assert [c["label"] for c in line["classes"]] == ["bleu"]
    t = run_cli("infer", str(fixtures / "colors_int8.json"), image, "--format", "table")
    assert t.rc == 0, t.err
    header, row = t.out.splitlines()
    assert header.split()[:3] == ["SOURCE", "FRAME", "MS"] and "blue" in row


def test_inspect_reports_tensors_quantization_ops_and_task(fixtures: Path, backend: str) -> None:
    r = run_cli("inspect", str(fixtures / "colors_int8.json"), "--format", "json")
    assert r.rc == 0, r.err
    info = json.loads(r.out)
    assert info["backend"]["name"] == backend
    assert info["int8"] is True and info["float_ops"] == []
    assert info["task"] == "classify" and info["task_source"] == "manifest"
    assert info["inputs"][0]["dtype"] == "int8" and info["inputs"][0]["shape"] == [1, 32, 32, 3]
    assert set(info["inputs"][0]["quantization"]) == {"scale", "zero_point"}
    assert info["size_bytes"] == (fixtures / "colors_int8.tflite").stat().st_size
    assert "SOFTMAX" in info["ops"]
    text = run_cli("inspect", str(fixtures / "colors_int8.tflite"))
    assert text.rc == 0 and "int8       yes" in text.out and "task       classify (recognised" in text.out


BENCH_KEYS = {"model", "backend", "threads", "invoke_ms", "pipeline_ms", "items"}


def test_bench_json_has_exactly_the_documented_keys(fixtures: Path) -> None:
    r = run_cli("bench", str(fixtures / "colors_int8.json"), str(fixtures / "images" / "red_1.png"),
                "--runs", "20", "--threads", "1")
    assert r.rc == 0, r.err
    report = json.loads(r.out)
    assert set(report) == BENCH_KEYS
    assert report["threads"] == 1 and report["items"] == 20
    for key in ("invoke_ms", "pipeline_ms"):
        assert set(report[key]) == {"p50", "p95"} and 0 < report[key]["p50"] <= report[key]["p95"]
    assert report["pipeline_ms"]["p50"] >= report["invoke_ms"]["p50"] * 0.5


def test_python_dash_m_and_fleet_model_inspect(fixtures: Path) -> None:
    r = run_cli("--version")
    m = re.fullmatch(r"lepton-agent (\S+) \(backend (\S+) (\S+)\)\n", r.out)
    assert r.rc == 0 and m, r.out + r.err
    assert m[1] == agent.__version__ and m[2] == load_backend().name and m[3] == load_backend().version
    missing = subprocess.run([sys.executable, "-m", "agent", "--version"], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "LEPTON_BACKEND": "tensorflow"}, timeout=60, check=False)
    assert (missing.returncode, missing.stdout) == (0, f"lepton-agent {agent.__version__} (backend 'tensorflow' is "
                                                       "not installed)\n"), missing.stderr
    f = run_cli("model", "inspect", str(fixtures / "shapes_int8.json"), "--format", "json", prog="fleet")
    assert f.rc == 0, f.err
    assert json.loads(f.out)["inputs"][0]["shape"] == [1, 48, 48, 1]


def test_inference_in_process_matches_the_cli(fixtures: Path) -> None:
    spec = load_spec(fixtures / "colors_int8.json")
    model = Model(spec.path, threads=1)
    inference = Inference(model, create_task(model, spec))
    import cv2

    result = inference.run(cv2.imread(str(fixtures / "images" / "red_2.png")))
    assert result["classes"][0]["label"] == "red"
    assert inference.latency.invoke > 0


def test_infer_copes_with_a_folder_holding_one_bad_image(fixtures: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(fixtures / "images" / "red_1.png", folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    shutil.copy(fixtures / "images" / "blue_1.png", folder / "c.png")
    r = run_cli("infer", str(fixtures / "colors_int8.json"), str(folder))
    assert r.rc == 2
    assert [line["classes"][0]["label"] for line in _lines(r.out)] == ["red", "blue"]  # nothing lost
    assert len(r.err_lines) == 1 and "b.png: cannot decode image" in r.err_lines[0]


def test_synthetic_bench_input_needs_no_files(fixtures: Path) -> None:
    spec = load_spec(fixtures / "colors_float.json")
    model = Model(spec.path, threads=1)
    task = create_task(model, spec)
    frame = task.synthetic_item()
    assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
