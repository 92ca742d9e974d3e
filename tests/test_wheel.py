"""The built wheel on its own (issue 17): scripts/test-wheel builds the sdist and the wheel once, installs the
wheel into a fresh venv with no other step, and runs profile, check-config, inspect and infer on real models
from outside the checkout. Before: the wheel had no profiles (`available: none`, and generic-arm64 asked
for on x86_64) and no interpreter."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LEPTON_BACKEND") == "tflite-runtime",
                       reason="builds its own venv with the wheel's default runtime; one lane is enough"),
]


def test_the_wheel_works_on_its_own_in_a_fresh_venv() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LEPTON_PROFILES_DIR", "WHEEL")}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "test-wheel")], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=900, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1].endswith(" passed, 0 failed") and int(lines[-1].split()[0]) >= 10, r.stdout
    assert not [line for line in lines if line.startswith("FAIL")]
