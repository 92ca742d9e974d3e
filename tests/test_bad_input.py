"""Bad input: exit code 2 and one clear line naming the file and the problem, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import Run, run_cli


def _one_line(r: Run, *fragments: str) -> None:
    assert r.rc == 2, (r.rc, r.out, r.err)
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("lepton-agent: ") and "Traceback" not in r.err
    for fragment in fragments:
        assert fragment in line, line


def test_not_a_tflite_file(tmp_path: Path, fixtures: Path) -> None:
    bad = tmp_path / "photo.tflite"
    shutil.copy(fixtures / "images" / "red_1.png", bad)
    _one_line(run_cli("inspect", str(bad)), str(bad), "not a TFLite model")


def test_truncated_model(tmp_path: Path, fixtures: Path) -> None:
    data = (fixtures / "colors_int8.tflite").read_bytes()
    bad = tmp_path / "cut.tflite"
    bad.write_bytes(data[: len(data) // 2])
    _one_line(run_cli("infer", str(bad), str(fixtures / "images" / "red_1.png")), str(bad), "truncated or corrupt")


def test_empty_model(tmp_path: Path) -> None:
    bad = tmp_path / "empty.tflite"
    bad.write_bytes(b"")
    _one_line(run_cli("bench", str(bad)), str(bad), "not a TFLite model")


def test_unsupported_op(fixtures: Path) -> None:
    _one_line(run_cli("inspect", str(fixtures / "flex_op.tflite")), "flex_op.tflite", "op not supported", "Flex")


def test_missing_model(tmp_path: Path) -> None:
    _one_line(run_cli("inspect", str(tmp_path / "nope.tflite")), "nope.tflite", "no such model file")


def test_unreadable_image(tmp_path: Path, fixtures: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    _one_line(run_cli("infer", str(fixtures / "colors_int8.json"), str(bad)), str(bad), "cannot decode image")


def test_missing_input(tmp_path: Path, fixtures: Path) -> None:
    r = run_cli("infer", str(fixtures / "colors_int8.json"), str(tmp_path / "gone.png"))
    _one_line(r, "gone.png", "no such file")
    assert r.out == ""


def test_glob_matching_nothing(tmp_path: Path, fixtures: Path) -> None:
    _one_line(run_cli("infer", str(fixtures / "colors_int8.json"), str(tmp_path / "*.png")), "no image or video")


def test_empty_folder(tmp_path: Path, fixtures: Path) -> None:
    _one_line(run_cli("infer", str(fixtures / "colors_int8.json"), str(tmp_path)), str(tmp_path), "no image files")


def test_video_that_is_not_a_video(tmp_path: Path, fixtures: Path) -> None:
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00" * 1000)
    _one_line(run_cli("infer", str(fixtures / "colors_int8.json"), str(bad)), "clip.mp4")


def _manifest(tmp_path: Path, fixtures: Path, **changes: object) -> Path:
    data = json.loads((fixtures / "colors_int8.json").read_text())
    data.update(changes)
    shutil.copy(fixtures / "colors_int8.tflite", tmp_path / "colors_int8.tflite")
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"colour": "RGB"}, "colour: Extra inputs are not permitted"),
        ({"version": [1]}, "version"),
        ({"file": "../../etc/passwd"}, "file: Value error, must be a plain file name"),
        ({"file": "missing.tflite"}, "'missing.tflite' named by the manifest does not exist"),
        ({"size": 3}, "the manifest says 3"),
        ({"sha256": "0" * 64}, "does not match the manifest's sha256"),
        ({"labels": ["a", "b"]}, "2 labels for 3 model outputs"),
        ({"labels": "nolabels.txt"}, "no such labels file"),
        ({"preprocess": {"std": [0, 1, 1]}}, "preprocess.std"),
        ({"postprocess": {"threshold": 2}}, "postprocess.threshold"),
        ({"task": "teleport"}, "task 'teleport' is not available"),
    ],
)
def test_invalid_manifest(tmp_path: Path, fixtures: Path, changes: dict, fragment: str) -> None:
    path = _manifest(tmp_path, fixtures, **changes)
    r = run_cli("infer", str(path), str(fixtures / "images" / "red_1.png"))
    _one_line(r, fragment)
    if "labels" not in fragment and "task" not in fragment and "outputs" not in fragment:
        assert str(path) in r.err_lines[0]


def test_manifest_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('{"name": "x",\n "version": }')
    _one_line(run_cli("inspect", str(path)), str(path), "invalid manifest: line 2 column")


def test_manifest_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text("[" * 100000)
    _one_line(run_cli("inspect", str(path)), str(path), "invalid manifest")


def test_micro_manifest_with_missing_model(tmp_path: Path, models_dir: Path) -> None:
    path = tmp_path / "alexa.json"
    shutil.copy(models_dir / "wakeword" / "alexa.json", path)
    _one_line(run_cli("inspect", str(path)), str(path), "'alexa.tflite' named by the manifest does not exist")


def test_bad_arguments_exit_2() -> None:
    r = run_cli("infer", "m.tflite", "x.png", "--threshold", "7")
    assert r.rc == 2 and "not between 0 and 1" in r.err


def test_unknown_backend(fixtures: Path) -> None:
    _one_line(run_cli("inspect", str(fixtures / "colors_int8.tflite"), "--backend", "onnx"), "backend 'onnx'")


def test_missing_delegate(fixtures: Path) -> None:
    r = run_cli("inspect", str(fixtures / "colors_int8.tflite"), "--delegate", "edgetpu")
    _one_line(r, "libedgetpu.so.1", "cannot be loaded")
