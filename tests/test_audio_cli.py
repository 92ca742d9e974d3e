"""`infer` and `bench` on audio as a user runs them, bad audio input included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, Run, run_cli
from wavs import LABELS, RECORDINGS, WORDS, pcm16, word_of, write_wav

ALEXA = next(p for p in RECORDINGS if word_of(p) == "alexa")


def _manifest(models_dir: Path, name: str) -> str:
    return str(models_dir / "wakeword" / f"{name}.json")


def _lines(r: Run) -> list[dict]:
    assert r.rc == 0, (r.rc, r.err)
    assert r.err_lines == [], r.err
    return [json.loads(line) for line in r.out.splitlines()]


def _one_line(r: Run, *fragments: str) -> None:
    assert r.rc == 2, (r.rc, r.out, r.err)
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("lepton-agent: ") and "Traceback" not in r.err
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("name", WORDS)
def test_infer_reports_one_detection_per_recording_of_its_word(models_dir: Path, name: str) -> None:
    lines = _lines(run_cli("infer", _manifest(models_dir, name), *map(str, RECORDINGS), "--format", "jsonl"))
    own = [str(p) for p in RECORDINGS if word_of(p) == name]
    assert [line["source"] for line in lines] == own
    for line in lines:
        assert line["task"] == "wakeword" and line["event"] == "detected" and line["label"] == LABELS[name]
        assert 0.9 <= line["score"] <= 1.0 and 0.5 < line["t"] < 4.0
        assert line["model"] == {"name": name, "version": 2}
        assert set(line["latency_ms"]) == {"pre", "invoke", "post"}


def test_infer_reads_raw_pcm_on_stdin(models_dir: Path) -> None:
    cmd = [sys.executable, "-m", "agent", "infer", _manifest(models_dir, "alexa"), "-"]
    proc = subprocess.run(cmd, input=pcm16(ALEXA).tobytes(), capture_output=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [(line["source"], line["label"]) for line in lines] == [("-", "Alexa")]
    from_file = _lines(run_cli("infer", _manifest(models_dir, "alexa"), str(ALEXA)))
    assert lines[0]["t"] == from_file[0]["t"] and lines[0]["score"] == from_file[0]["score"]


def test_refractory_and_threshold_options(models_dir: Path) -> None:
    mycroft = next(str(p) for p in RECORDINGS if word_of(p) == "hey_mycroft")
    default = _lines(run_cli("infer", _manifest(models_dir, "hey_mycroft"), mycroft))
    every = _lines(run_cli("infer", _manifest(models_dir, "hey_mycroft"), mycroft, "--refractory", "0"))
    strict = _lines(run_cli("infer", _manifest(models_dir, "hey_mycroft"), mycroft, "--threshold", "0.999"))
    assert len(default) == 1 and len(every) > 1
    assert (every[0]["t"], every[0]["score"]) == (default[0]["t"], default[0]["score"])
    assert all(line["score"] > 0.999 for line in strict) and len(strict) <= len(default)


def test_table_format(models_dir: Path) -> None:
    r = run_cli("infer", _manifest(models_dir, "alexa"), str(ALEXA), "--format", "table")
    assert r.rc == 0 and r.out.splitlines()[0].split() == ["SOURCE", "T", "RESULT"]
    assert "Alexa" in r.out.splitlines()[1]


def test_bench_on_audio_reports_realtime_factor(models_dir: Path, backend: str) -> None:
    files = [str(p) for p in RECORDINGS]
    started = time.monotonic()
    r = run_cli("bench", _manifest(models_dir, "hey_jarvis"), *files, "--runs", "50", "--format", "json")
    wall_s = time.monotonic() - started
    assert r.rc == 0, r.err
    report = json.loads(r.out)
    assert set(report) == {"model", "backend", "threads", "invoke_ms", "pipeline_ms", "items", "audio_s",
                           "elapsed_s", "realtime_factor"}
    total = sum(len(pcm16(p)) for p in RECORDINGS) / 16000
    assert report["backend"] == backend and report["threads"] == 1
    assert report["audio_s"] == pytest.approx(total, abs=0.01) and report["items"] >= 50
    # Not the report's own division again: a bound from outside. The pipeline time it sums cannot exceed
    # the whole process's wall time, so the factor is at least audio / wall (less the report's rounding).
    assert 0 < report["elapsed_s"] <= wall_s
    assert report["realtime_factor"] >= report["audio_s"] / wall_s - 0.05
    synthetic = json.loads(run_cli("bench", _manifest(models_dir, "alexa"), "--runs", "20").out)
    assert synthetic["audio_s"] == pytest.approx(10.0, abs=0.05) and synthetic["realtime_factor"] > 0


_NO_OPENCV = """
import io, json, sys
from agent.cli import agent_main
out = {}
for argv in (["infer", sys.argv[1], sys.argv[2]], ["bench", sys.argv[1], sys.argv[2], "--runs", "5"]):
    real, sys.stdout = sys.stdout, io.StringIO()
    try:
        out[argv[0]] = agent_main(argv)
    finally:
        captured, sys.stdout = sys.stdout.getvalue(), real
    out[argv[0] + "_out"] = captured
visual = ("cv2", "agent.vision", "agent.sources.files")
out["cv2"] = sorted(m for m in sys.modules if m.startswith(visual))
print(json.dumps(out))
"""


def test_the_audio_path_never_imports_opencv(models_dir: Path) -> None:
    cmd = [sys.executable, "-c", _NO_OPENCV, _manifest(models_dir, "alexa"), str(ALEXA)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["infer"] == 0 and '"label": "Alexa"' in out["infer_out"]
    assert out["bench"] == 0 and "realtime_factor" in out["bench_out"]
    assert out["cv2"] == []


# -- bad input -------------------------------------------------------------------------


def test_a_wav_that_is_not_a_wav(tmp_path: Path, models_dir: Path) -> None:
    bad = tmp_path / "song.wav"
    bad.write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00 this is an mp3" * 20)
    r = run_cli("infer", _manifest(models_dir, "alexa"), str(bad), str(ALEXA))
    _one_line(r, str(bad), "not a WAV file")
    # The good file after it was still run.
    assert [json.loads(line)["source"] for line in r.out.splitlines()] == [str(ALEXA)]


def test_a_truncated_wav_keeps_what_was_heard(tmp_path: Path, models_dir: Path) -> None:
    data = ALEXA.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: int(len(data) * 0.8)])  # the word is in the first 80 %
    r = run_cli("infer", _manifest(models_dir, "alexa"), str(cut))
    _one_line(r, str(cut), "truncated WAV: header says")
    assert [json.loads(line)["label"] for line in r.out.splitlines()] == ["Alexa"]


def test_silence_is_quiet(tmp_path: Path, models_dir: Path) -> None:
    silent = write_wav(tmp_path / "silence.wav", np.zeros(16000 * 5, np.int16), 16000, 2)
    for name in (*WORDS, "okay_nabu"):
        assert _lines(run_cli("infer", _manifest(models_dir, name), str(silent))) == []


def test_clipping_does_not_wake_anything(tmp_path: Path, models_dir: Path) -> None:
    # A full-scale square wave and a recording driven 20x into clipping.
    t = np.arange(16000 * 3)
    square = np.where((t // 40) % 2 == 0, 32767, -32768).astype(np.int16)
    hot = np.clip(pcm16(RECORDINGS[0]).astype(np.int32) * 20, -32768, 32767)
    clipped = write_wav(tmp_path / "clipped.wav", np.concatenate([square, hot]), 16000, 2)
    for name in ("hey_jarvis", "hey_mycroft", "okay_nabu"):
        assert _lines(run_cli("infer", _manifest(models_dir, name), str(clipped))) == []


def test_manifest_whose_model_is_missing(tmp_path: Path, models_dir: Path) -> None:
    path = tmp_path / "alexa.json"
    shutil.copy(models_dir / "wakeword" / "alexa.json", path)
    _one_line(run_cli("infer", str(path), str(ALEXA)), str(path), "'alexa.tflite' named by the manifest does not exist")


def test_manifest_whose_input_does_not_fit_the_frontend(tmp_path: Path, models_dir: Path, fixtures: Path) -> None:
    data = json.loads((models_dir / "wakeword" / "alexa.json").read_text())
    data["model"] = "colors_int8.tflite"
    shutil.copy(fixtures / "colors_int8.tflite", tmp_path / "colors_int8.tflite")
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(data))
    _one_line(run_cli("infer", str(path), str(ALEXA)), str(path), "does not fit the micro frontend")


def test_a_mic_that_does_not_exist(models_dir: Path) -> None:
    r = run_cli("infer", _manifest(models_dir, "alexa"), "mic:no_such_device")
    _one_line(r, "mic:no_such_device", "cannot open")


def test_a_missing_wav(tmp_path: Path, models_dir: Path) -> None:
    _one_line(run_cli("infer", _manifest(models_dir, "alexa"), str(tmp_path / "gone.wav")), "gone.wav", "no such file")


def test_a_non_audio_input(models_dir: Path, fixtures: Path) -> None:
    image = str(fixtures / "images" / "red_1.png")
    _one_line(run_cli("infer", _manifest(models_dir, "alexa"), image), image, "no source kind takes this input")


def test_bench_refuses_a_live_mic(models_dir: Path) -> None:
    _one_line(run_cli("bench", _manifest(models_dir, "alexa"), "mic:"), "bench takes audio files")


def test_an_image_model_on_audio(fixtures: Path) -> None:
    _one_line(run_cli("infer", str(fixtures / "colors_int8.json"), str(ALEXA)), "does not take audio")
