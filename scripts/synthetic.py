"""Procedural test pictures: the colour and shape images the fixture models are trained on.

Kept apart from `make_test_models.py` (which needs TensorFlow) so that tests can draw
fresh evaluation images from the same distribution with numpy and OpenCV only.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

UInt8Array = npt.NDArray[np.uint8]
Float32Array = npt.NDArray[np.float32]


def smooth_field(
    rng: np.random.Generator, height: int, width: int, channels: int, amplitude: float
) -> Float32Array:
    """Return a smooth random texture in [-amplitude, amplitude], shape (H, W, C)."""
    coarse = rng.uniform(-1.0, 1.0, size=(4, 4, channels)).astype(np.float32)
    planes = [
        cv2.resize(coarse[:, :, c], (width, height), interpolation=cv2.INTER_CUBIC)
        for c in range(channels)
    ]
    field = np.stack(planes, axis=-1) * np.float32(amplitude)
    return field.astype(np.float32)


def _shift4(value: float) -> int:
    """Convert a pixel coordinate to cv2's 4-bit fixed point (``shift=4``)."""
    return round(value * 16.0)


def ellipse_mask(
    height: int,
    width: int,
    center: tuple[float, float],
    axes: tuple[float, float],
    angle: float,
) -> Float32Array:
    """Anti-aliased filled ellipse as a float mask in [0, 1], shape (H, W)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.ellipse(
        mask,
        (_shift4(center[0]), _shift4(center[1])),
        (_shift4(axes[0]), _shift4(axes[1])),
        angle,
        0.0,
        360.0,
        255,
        -1,
        cv2.LINE_AA,
        4,
    )
    return (mask.astype(np.float32) / 255.0).astype(np.float32)


def polygon_mask(height: int, width: int, points: Float32Array) -> Float32Array:
    """Anti-aliased filled polygon (points in pixels, shape (N, 2)) as a [0, 1] mask."""
    mask = np.zeros((height, width), dtype=np.uint8)
    fixed = np.round(points * 16.0).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [fixed], 255, cv2.LINE_AA, 4)
    return (mask.astype(np.float32) / 255.0).astype(np.float32)


def make_color_image(
    rng: np.random.Generator,
    label: int,
    height: int,
    width: int,
    noise_max: float,
    texture_max: float = 30.0,
) -> UInt8Array:
    """RGB image whose dominant colour is channel ``label`` (0=R, 1=G, 2=B).

    A textured background in the class colour (other channels at random lower
    levels), a few random blobs (some of arbitrary colour), random brightness
    and per-pixel Gaussian noise with sigma up to ``noise_max``. The smooth
    background texture has an amplitude up to ``texture_max``.
    """
    dominant = rng.uniform(150.0, 255.0)
    base = (rng.uniform(0.0, 0.55, size=3) * dominant).astype(np.float32)
    base[label] = dominant
    image = base[None, None, :] + smooth_field(
        rng, height, width, 3, rng.uniform(0.0, texture_max)
    )
    size = min(height, width)
    for _ in range(int(rng.integers(0, 4))):
        # Half the blobs have an arbitrary colour, half a shade of the class colour.
        shade = rng.uniform(0.0, 255.0, size=3) if rng.random() < 0.5 else base * rng.uniform(0.6, 1.2)
        colour = shade.astype(np.float32)
        mask = ellipse_mask(
            height,
            width,
            (rng.uniform(0.0, width), rng.uniform(0.0, height)),
            (rng.uniform(0.04, 0.18) * size, rng.uniform(0.04, 0.18) * size),
            rng.uniform(0.0, 180.0),
        )[:, :, None]
        image = image * (1.0 - mask) + colour * mask
    image = image * rng.uniform(0.6, 1.15)
    sigma = rng.uniform(0.0, noise_max)
    if sigma > 0.0:
        image = image + rng.normal(0.0, sigma, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_shape_image(
    rng: np.random.Generator, label: int, height: int, width: int, noise_max: float
) -> UInt8Array:
    """Grayscale image (H, W) with one filled bright shape on a dark noisy background.

    ``label``: 0=circle, 1=square, 2=triangle; random size, position, rotation,
    brightness, background level, texture and Gaussian noise.
    """
    background = rng.uniform(0.0, 70.0) + smooth_field(
        rng, height, width, 1, rng.uniform(0.0, 20.0)
    )[:, :, 0]
    radius = rng.uniform(0.18, 0.42) * min(height, width)
    center = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    if label == 0:
        mask = ellipse_mask(height, width, center, (radius, radius), 0.0)
    else:
        corners = 4 if label == 1 else 3
        start = rng.uniform(0.0, 2.0 * math.pi)
        angles = start + np.arange(corners) * (2.0 * math.pi / corners)
        points = np.stack(
            [center[0] + radius * np.cos(angles), center[1] + radius * np.sin(angles)],
            axis=-1,
        ).astype(np.float32)
        mask = polygon_mask(height, width, points)
    foreground = rng.uniform(170.0, 255.0)
    image = background * (1.0 - mask) + foreground * mask
    sigma = rng.uniform(0.0, noise_max)
    if sigma > 0.0:
        image = image + rng.normal(0.0, sigma, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
