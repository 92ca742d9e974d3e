"""Calibration and evaluation inputs for the compression tests and scripts/bench_compress.py.

Calibration and evaluation never share a picture: BlazeFace calibrates on scikit-image's
photos without people plus mosaics of the first 48 LFW faces it ships, and is evaluated on
the astronaut, the cameraman and mosaics of the next 48 faces; the colour classifier
calibrates on the fixture pictures and video, and is evaluated on pictures drawn fresh
from the distribution it was trained on (scripts/synthetic.py) with their own seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from synthetic import make_color_image

COLOR_LABELS = ("red", "green", "blue")
EVAL_SEED = 4040
EVAL_PER_CLASS = 50

# Scenes a camera might see. Not the colour chart or the retina scan: calibration ranges are the
# min/max over every sample, and on those two BlazeFace back-camera's face logits reach -9136,
# which leaves no int8 step to tell a face from a wall (raw-output SNR -7 dB instead of +10).
_CALIBRATION_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
                       "ihc.png", "horse.png")
_EVALUATION_PHOTOS = ("astronaut.png", "camera.png")


def _skimage_folder() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def _face_mosaic(faces: np.ndarray[Any, Any], size: int = 400) -> np.ndarray[Any, Any]:
    """16 LFW faces (25x25 gray, 0..1) as a 4x4 grid, upscaled to a BGR picture."""
    rows = [np.hstack(list(faces[r * 4 : (r + 1) * 4])) for r in range(4)]
    gray = (np.vstack(rows) * 255).round().astype(np.uint8)
    return cv2.cvtColor(cv2.resize(gray, (size, size), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2BGR)


def face_photos(folder: Path) -> tuple[Path, Path]:
    """Write the calibration and evaluation folders for the face detectors; (calib, eval)."""
    data = _skimage_folder()
    calib, evaluation = folder / "calib", folder / "eval"
    calib.mkdir(parents=True, exist_ok=True)
    evaluation.mkdir(parents=True, exist_ok=True)
    for names, target in ((_CALIBRATION_PHOTOS, calib), (_EVALUATION_PHOTOS, evaluation)):
        for name in names:
            image = cv2.imread(str(data / name), cv2.IMREAD_COLOR)
            assert image is not None, name
            cv2.imwrite(str(target / (Path(name).stem + ".png")), image)
    faces = np.load(data / "lfw_subset.npy")[:100]  # the first 100 are faces, the rest are not
    for k in range(3):
        cv2.imwrite(str(calib / f"lfw_{k}.png"), _face_mosaic(faces[16 * k : 16 * (k + 1)]))
        cv2.imwrite(str(evaluation / f"lfw_{k}.png"), _face_mosaic(faces[48 + 16 * k : 48 + 16 * (k + 1)]))
    return calib, evaluation


def colour_pictures(folder: Path) -> list[int]:
    """Write EVAL_PER_CLASS pictures per colour of random size; their labels in file-name order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(EVAL_SEED)
    labels = []
    for k in range(EVAL_PER_CLASS * len(COLOR_LABELS)):
        label = k % len(COLOR_LABELS)
        height = int(rng.integers(24, 97))
        width = round(height * rng.uniform(0.75, 1.4))
        rgb = make_color_image(rng, label, height, width, noise_max=12.0)
        cv2.imwrite(str(folder / f"{k:03d}_{COLOR_LABELS[label]}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        labels.append(label)
    return labels
