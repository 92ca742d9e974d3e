"""`model quantize --calib` on WAV clips: a float streaming wake word model (Hey Mycroft's real weights,
tests/float_wakeword.py) calibrated on the real recordings through the runtime's own micro frontend becomes a
fully int8 model that `model compare --eval` finds deciding every clip as the published int8 model does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from float_wakeword import float_wakeword
from wavs import RECORDINGS, pcm16, write_wav

pytest.importorskip("ai_edge_quantizer", reason="ai-edge-quantizer (the compress extra) quantizes; the "
                    "tflite-runtime lane does not have it")

WAVS = Path(__file__).resolve().parent / "fixtures" / "wakeword"
WORDS = ("alexa", "hey_jarvis", "hey_mycroft")


def fleet(*args: str) -> tuple[int, str, str]:
    r = run_cli(*args, prog="fleet", timeout=600)
    return r.rc, r.out, "\n".join(r.err_lines) + "\n"  # without the runtime's own INFO lines


def test_a_wake_word_model_calibrated_on_wav_clips(tmp_path: Path, models_dir: Path) -> None:
    source = float_wakeword(models_dir, tmp_path / "float")
    out = tmp_path / "hey_mycroft_int8.tflite"
    calib = [str(WAVS / "alexa"), str(WAVS / "hey_jarvis"), str(WAVS / "hey_mycroft" / "1.wav")]
    rc, stdout, err = fleet("model", "quantize", str(source), "--calib", *calib, "-o", str(out), "--format", "json")
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["float_ops"] == [] and result["calibration_items"] > 100
    manifest = json.loads(out.with_suffix(".json").read_text())  # still a microWakeWord manifest, for ESPHome too
    assert manifest["type"] == "micro" and manifest["model"] == out.name
    assert manifest["micro"]["probability_cutoff"] == 0.95
    assert manifest["metrics"]["quantization"]["calibration_items"] == result["calibration_items"]
    rc, stdout, err = fleet("model", "compare", str(models_dir / "wakeword" / "hey_mycroft.json"),
                            str(out.with_suffix(".json")), "--eval", *[str(WAVS / w) for w in WORDS],
                            "--runs", "1", "--format", "json")
    assert rc == 0, err
    agreement = json.loads(stdout)["models"][1]["agreement"]
    assert agreement["items"] == len(RECORDINGS)
    assert agreement["decision_agreement"] == 1.0 and agreement["base_detections"] == 3 == agreement[
        "variant_detections"]


def _bad_inputs(tmp: Path, fixtures: Path) -> list[tuple[list[str], str]]:
    alexa = pcm16(WAVS / "alexa" / "1.wav")
    narrow = write_wav(tmp / "8k.wav", alexa[::2], 8000, 2)
    short = write_wav(tmp / "short.wav", alexa[:400], 16000, 2)
    return [([str(narrow)], f"--calib {narrow}: want 16 kHz mono 16-bit WAV"),
            ([str(short)], "too short for one window of 3 feature rows"),
            ([str(fixtures / "images")], f"--calib {fixtures / 'images'}: no WAV clips")]


def test_bad_wav_calibration_inputs(tmp_path: Path, models_dir: Path, fixtures: Path) -> None:
    source = float_wakeword(models_dir, tmp_path / "float")
    for calib, message in _bad_inputs(tmp_path, fixtures):
        rc, _, err = fleet("model", "quantize", str(source), "--calib", *calib, "-o", str(tmp_path / "q.tflite"))
        assert rc == 2 and message in err and err.count("\n") == 1, (calib, err)
    # WAV clips for an image model: said plainly, not fed to it.
    wav = str(WAVS / "alexa" / "1.wav")
    rc, _, err = fleet("model", "quantize", str(fixtures / "colors_float.json"), "--calib", wav, "-o",
                       str(tmp_path / "c.tflite"))
    assert rc == 2 and f"--calib {wav}: WAV clips calibrate a wake word model" in err and err.count("\n") == 1
    assert not (tmp_path / "q.tflite").exists() and not (tmp_path / "c.tflite").exists()
