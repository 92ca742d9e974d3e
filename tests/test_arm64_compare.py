"""scripts/arm64_compare.py, the x86_64/arm64 comparison of scripts/test-arm64: it passes equal outputs and
fails on what would be a real difference (a box moved, a face or a wake word decision lost, a missing file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "arm64_compare.py"

FACE = [
    {"source": "/x/photos/astronaut.png", "frame": 0, "task": "detect",
     "detections": [{"label": "face", "score": 0.92, "box": [0.35, 0.16, 0.53, 0.34]}]},
    {"source": "/x/photos/camera.png", "frame": 0, "task": "detect", "detections": []},
]
WAKE = [{"source": "/x/wakeword/alexa/1.wav", "t": 1.22, "task": "wakeword", "event": "detected",
         "label": "Alexa", "score": 0.974}]


def _write(folder: Path, name: str, records: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


Records = list[dict[str, Any]]


def _compare(tmp_path: Path, face: Records, wake: Records) -> subprocess.CompletedProcess[str]:
    _write(tmp_path / "ref", "face", FACE)
    _write(tmp_path / "ref", "alexa", WAKE)
    other = tmp_path / "other"
    # The other machine names its inputs from another root: only folder and file name must agree.
    for name, records in (("face", face), ("alexa", wake)):
        _write(other, name, [{**r, "source": r["source"].replace("/x/", "/tmp/compare/")} for r in records])
    return subprocess.run([sys.executable, str(SCRIPT), "compare", str(tmp_path / "ref"), str(other)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_equal_outputs_within_tolerance_pass(tmp_path: Path) -> None:
    face = json.loads(json.dumps(FACE))
    face[0]["detections"][0]["box"][0] += 0.001  # one int8 step of difference between kernels
    face[0]["detections"][0]["score"] -= 0.004
    proc = _compare(tmp_path, face, WAKE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "same  face: 2 photos, 1 detections, max box diff 0.0010" in proc.stdout


def test_a_moved_box_fails(tmp_path: Path) -> None:
    face = json.loads(json.dumps(FACE))
    face[0]["detections"][0]["box"][2] += 0.02
    proc = _compare(tmp_path, face, WAKE)
    assert proc.returncode == 1
    assert "DIFFERENT  face" in proc.stdout and "photos/astronaut.png: box diff 0.0200" in proc.stdout


def test_a_lost_face_fails(tmp_path: Path) -> None:
    face = json.loads(json.dumps(FACE))
    face[0]["detections"] = []
    proc = _compare(tmp_path, face, WAKE)
    assert proc.returncode == 1
    assert "photos/astronaut.png: 1 vs 0 detections" in proc.stdout


def test_a_different_wake_word_decision_fails(tmp_path: Path) -> None:
    proc = _compare(tmp_path, FACE, [{**WAKE[0], "t": 1.3}])
    assert proc.returncode == 1
    assert "DIFFERENT  alexa" in proc.stdout
    assert "only on the reference: ('alexa/1.wav', 'detected', 'Alexa', 1.22)" in proc.stdout


def test_a_missing_output_is_bad_input(tmp_path: Path) -> None:
    _write(tmp_path / "ref", "face", FACE)
    (tmp_path / "other").mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), "compare", str(tmp_path / "ref"), str(tmp_path / "other")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("arm64_compare: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
