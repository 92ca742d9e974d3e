"""The README's demo command, run non-interactively: results must arrive over MQTT."""

from __future__ import annotations

import os
import subprocess

from conftest import ROOT


def test_demo_shows_live_results() -> None:
    # The demo runs the default lane's venv; the tflite lane's LEPTON_BACKEND must not follow it there.
    env = {k: v for k, v in os.environ.items() if k != "LEPTON_BACKEND"}
    env["DEMO_SECONDS"] = "90"
    proc = subprocess.run([str(ROOT / "scripts" / "demo")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # BlazeFace on real photos: the astronaut's face is found, the coffee cup has none.
    lines = [line for line in proc.stdout.splitlines() if " faces #" in line]
    assert len(lines) >= 2, proc.stdout
    assert any("face" in line.split("#", 1)[1] for line in lines), proc.stdout
    assert "status online" in proc.stdout
    assert "page    http://127.0.0.1:" in proc.stdout  # the fleet dashboard's address
    # The wake word pipeline hears "hey jarvis" in the looping real recording.
    assert any(" wakeword #" in line for line in proc.stdout.splitlines()), proc.stdout
