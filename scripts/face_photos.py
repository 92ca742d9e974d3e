"""The photos the BlazeFace acceptance runs on, built the same way wherever they are needed.

scikit-image's sample photos (shipped inside its wheel, no download) plus a few
arrangements of them, made with plain numpy so that the peer package's venv
(`scripts/make_face_reference.py`) and the test suite get identical pixels.
Every photo is RGB uint8, shape (H, W, 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Photo = np.ndarray[Any, Any]


def _rgb(image: Photo) -> Photo:
    return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3])


def _astronaut() -> Photo:
    from skimage import data

    return _rgb(data.astronaut())


def _camera() -> Photo:
    from skimage import data

    return _rgb(data.camera())


def _named(name: str) -> Callable[[], Photo]:
    def load() -> Photo:
        from skimage import data

        return _rgb(getattr(data, name)())

    return load


def _astronaut_pair() -> Photo:
    """The astronaut beside its mirror image: two faces in a wide frame (letterboxed)."""
    a = _astronaut()
    return np.ascontiguousarray(np.concatenate([a, a[:, ::-1]], axis=1))


def _astronaut_small() -> Photo:
    """Half size (2x2 means): a smaller face."""
    a = _astronaut().astype(np.float32)
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    small = a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    return np.round(small).astype(np.uint8)


def _enlarge(image: Photo, factor: int) -> Photo:
    """Bilinear enlargement (pixel centres aligned), separable, in plain numpy."""
    h, w = image.shape
    ys = np.clip((np.arange(h * factor) + 0.5) / factor - 0.5, 0, h - 1)
    xs = np.clip((np.arange(w * factor) + 0.5) / factor - 0.5, 0, w - 1)
    rows = np.stack([np.interp(xs, np.arange(w), row) for row in image])
    return np.stack([np.interp(ys, np.arange(h), col) for col in rows.T], axis=1)


def _lfw_grid() -> Photo:
    """Six faces from scikit-image's LFW subset, 4x enlarged, on a grey 3x2 grid."""
    from skimage import data

    faces = data.lfw_subset()[:6]  # (6, 25, 25) floats 0..1
    cell, size = 160, 100
    canvas = np.full((2 * cell, 3 * cell), 128, np.uint8)
    for k, face in enumerate(faces):
        big = _enlarge(face, 4)
        row, col = divmod(k, 3)
        y, x = row * cell + (cell - size) // 2, col * cell + (cell - size) // 2
        canvas[y : y + size, x : x + size] = np.round(big * 255).astype(np.uint8)
    return _rgb(canvas)


PHOTOS: dict[str, Callable[[], Photo]] = {
    "astronaut": _astronaut,
    "camera": _camera,
    "coffee": _named("coffee"),
    "chelsea": _named("chelsea"),
    "rocket": _named("rocket"),
    "astronaut_pair": _astronaut_pair,
    "astronaut_small": _astronaut_small,
    "lfw_grid": _lfw_grid,
}
