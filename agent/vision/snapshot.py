"""A JPEG of a frame with its detections drawn, no larger than a byte budget (for result snapshots).

Called by the result policy when a result carries a snapshot, not per frame:
it draws on a copy, never on the frame the pipeline holds. Quality goes down
first, then the picture is halved, until the JPEG fits `max_bytes`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.vision.cv import cv2

QUALITIES = (90, 80, 70, 60, 50, 40, 30, 20)
MIN_SIDE = 32
"""Below this the picture says nothing; give up instead."""

_PALETTE = ((0, 200, 255), (255, 128, 0), (0, 220, 0), (255, 0, 200), (0, 64, 255), (200, 200, 0))


def _colour(label: str) -> tuple[int, int, int]:
    return _PALETTE[sum(label.encode()) % len(_PALETTE)]


def draw_detections(frame: np.ndarray[Any, Any], detections: list[dict[str, Any]]) -> np.ndarray[Any, Any]:
    """A BGR copy of `frame` with each detection's box (normalised xyxy) and `label score` drawn."""
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or frame.size == 0:
        raise ValueError(f"frame of shape {frame.shape} and dtype {frame.dtype} is not an 8-bit image")
    if frame.ndim == 2 or frame.shape[2] == 1:
        canvas = cv2.cvtColor(frame.reshape(frame.shape[:2]), cv2.COLOR_GRAY2BGR)
    elif frame.shape[2] == 4:
        canvas = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    elif frame.shape[2] == 3:
        canvas = frame.copy()
    else:
        raise ValueError(f"frame with {frame.shape[2]} channels is not an image")
    h, w = canvas.shape[:2]
    thickness = max(1, round(min(h, w) / 240))
    scale = max(0.35, min(h, w) / 800)
    for d in detections:
        x0, y0, x1, y1 = (float(v) for v in d["box"])
        p0 = (int(np.clip(x0, 0, 1) * (w - 1)), int(np.clip(y0, 0, 1) * (h - 1)))
        p1 = (int(np.clip(x1, 0, 1) * (w - 1)), int(np.clip(y1, 0, 1) * (h - 1)))
        colour = _colour(str(d.get("label", "")))
        cv2.rectangle(canvas, p0, p1, colour, thickness)
        text = f"{d.get('label', '')} {float(d.get('score', 0.0)):.2f}".strip()
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        ty = p0[1] - 2 if p0[1] - th - base - 2 >= 0 else min(h - 1, p0[1] + th + 2)
        cv2.rectangle(canvas, (p0[0], ty - th - 2), (p0[0] + tw + 2, ty + base - 2), colour, -1)
        cv2.putText(canvas, text, (p0[0] + 1, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness,
                    cv2.LINE_AA)
    return canvas


def snapshot_jpeg(frame: np.ndarray[Any, Any], detections: list[dict[str, Any]], max_bytes: int) -> bytes:
    """The frame with its detections drawn, as a JPEG of at most `max_bytes`.

    Raises ValueError when the frame is not an image, or when even a small,
    low-quality JPEG does not fit.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    picture = draw_detections(frame, detections)
    while True:
        for quality in QUALITIES:
            ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise ValueError("JPEG encoding failed")
            if encoded.size <= max_bytes:
                return encoded.tobytes()
        h, w = picture.shape[:2]
        if min(h, w) // 2 < MIN_SIDE:
            raise ValueError(f"a snapshot does not fit in {max_bytes} bytes (smallest was {encoded.size} bytes)")
        picture = cv2.resize(picture, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
