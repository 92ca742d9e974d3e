"""Bad input to `lepton-fleet model quantize`: one clear line, exit 2, and nothing (half-)written at OUT."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

HAVE_QUANTIZER = importlib.util.find_spec("ai_edge_quantizer") is not None
needs_quantizer = pytest.mark.skipif(
    not HAVE_QUANTIZER,
    reason="ai-edge-quantizer (the compress extra) needs ai-edge-litert; the tflite-runtime lane does not have it",
)


def _refused(out: Path, *args: str, fragments: tuple[str, ...]) -> None:
    r = run_cli("model", "quantize", *args, "-o", str(out), prog="fleet")
    assert r.rc == 2, (r.rc, r.out, r.err)
    assert len(r.err_lines) == 1 and "Traceback" not in r.err, r.err
    line = r.err_lines[0]
    assert line.startswith("lepton-fleet: "), line
    for fragment in fragments:
        assert fragment in line, line
    assert r.out == ""
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


@needs_quantizer
def test_unsupported_op(fixtures: Path, tmp_path: Path) -> None:
    _refused(tmp_path / "q.tflite", str(fixtures / "flex_op.tflite"), "--calib", str(fixtures / "images"),
             fragments=(str(fixtures / "flex_op.tflite"), "op not supported", "FlexMatrixDeterminant"))


@needs_quantizer
def test_images_for_a_model_that_takes_no_image(fixtures: Path, tmp_path: Path) -> None:
    _refused(tmp_path / "q.tflite", str(fixtures / "counter_stateful.tflite"), "--calib", str(fixtures / "images"),
             fragments=("images do not fit the model's input", "[1, 4]"))


@needs_quantizer
def test_arrays_of_the_wrong_shape(fixtures: Path, tmp_path: Path) -> None:
    arrays = tmp_path / "calib.npy"
    np.save(arrays, np.zeros((4, 1, 28, 28, 3), np.float32))
    _refused(tmp_path / "q.tflite", str(fixtures / "colors_float.json"), "--calib", str(arrays),
             fragments=(str(arrays), "does not fit the model's input [1, 32, 32, 3]"))


@needs_quantizer
def test_arrays_that_are_not_numbers(fixtures: Path, tmp_path: Path) -> None:
    arrays = tmp_path / "calib.npy"
    np.save(arrays, np.full((1, 32, 32, 3), np.nan, np.float32))
    _refused(tmp_path / "q.tflite", str(fixtures / "colors_float.json"), "--calib", str(arrays),
             fragments=(str(arrays), "finite numbers"))


@needs_quantizer
def test_empty_calibration_folder(fixtures: Path, tmp_path: Path) -> None:
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "notes.txt").write_text("no pictures here")
    _refused(tmp_path / "q.tflite", str(fixtures / "colors_float.json"), "--calib", str(tmp_path / "calib"),
             fragments=("--calib", "calibration set is empty"))


@needs_quantizer
def test_empty_calibration_arrays(fixtures: Path, tmp_path: Path) -> None:
    arrays = tmp_path / "none.npy"
    np.save(arrays, np.zeros((0, 32, 32, 3), np.float32))
    _refused(tmp_path / "q.tflite", str(fixtures / "colors_float.json"), "--calib", str(arrays),
             fragments=(str(arrays), "calibration set is empty"))


@needs_quantizer
def test_undecodable_calibration_image(fixtures: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(fixtures / "images" / "red_1.png", calib / "a.png")
    (calib / "b.png").write_bytes(b"\x89PNG not really")
    _refused(tmp_path / "q.tflite", str(fixtures / "colors_float.json"), "--calib", str(calib),
             fragments=(str(calib / "b.png"), "cannot decode image"))


@needs_quantizer
def test_already_quantized(fixtures: Path, tmp_path: Path) -> None:
    _refused(tmp_path / "q.tflite", str(fixtures / "colors_int8.json"), "--calib", str(fixtures / "images"),
             fragments=("colors_int8.tflite", "already quantized"))


@needs_quantizer
def test_truncated_model(fixtures: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tflite"
    data = (fixtures / "colors_float.tflite").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "q.tflite", str(cut), "--calib", str(fixtures / "images"),
             fragments=(str(cut), "truncated or corrupt"))


@needs_quantizer
def test_sparse_weights(models_dir: Path, fixtures: Path, tmp_path: Path) -> None:
    source = models_dir / "face" / "face_detection_full_range_sparse.tflite"
    _refused(tmp_path / "q.tflite", str(source), "--calib", str(fixtures / "images"),
             fragments=(str(source), "sparse weights (DENSIFY ops) are not supported"))


@needs_quantizer
def test_failure_leaves_an_existing_output_alone(fixtures: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.tflite"
    out.write_bytes(b"the model that was there before")
    r = run_cli("model", "quantize", str(fixtures / "flex_op.tflite"), "--calib", str(fixtures / "images"),
                "-o", str(out), prog="fleet")
    assert r.rc == 2 and len(r.err_lines) == 1, r.err
    assert out.read_bytes() == b"the model that was there before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.tflite"]


def test_output_must_be_a_tflite(fixtures: Path, tmp_path: Path) -> None:
    _refused(tmp_path / "q.bin", str(fixtures / "colors_float.json"), "--calib", str(fixtures / "images"),
             fragments=("q.bin", "must be a .tflite"))


def test_int8_needs_calibration(fixtures: Path, tmp_path: Path) -> None:
    _refused(tmp_path / "q.tflite", str(fixtures / "colors_float.json"), fragments=("--calib", "int8 needs"))


@pytest.mark.skipif(HAVE_QUANTIZER, reason="this lane has the quantizer")
def test_lane_without_the_quantizer_says_so(fixtures: Path, tmp_path: Path) -> None:
    _refused(tmp_path / "q.tflite", str(fixtures / "colors_float.json"), "--calib", str(fixtures / "images"),
             fragments=("needs ai-edge-quantizer", "lepton-agent[compress]"))


def test_output_would_overwrite_the_source(fixtures: Path, tmp_path: Path) -> None:
    shutil.copy(fixtures / "colors_float.json", tmp_path / "m.json")  # names colors_float.tflite
    shutil.copy(fixtures / "colors_float.tflite", tmp_path / "colors_float.tflite")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for out in ("colors_float.tflite", "m.tflite"):  # the model itself; a model whose manifest is m.json
        r = run_cli("model", "quantize", str(tmp_path / "m.json"), "--calib", str(fixtures / "images"),
                    "-o", str(tmp_path / out), prog="fleet")
        assert r.rc == 2 and len(r.err_lines) == 1 and "would overwrite" in r.err_lines[0], r.err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
