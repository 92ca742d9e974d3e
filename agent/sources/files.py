"""Image files, folders, globs and video files as a stream of decoded frames (for `infer` and `bench`)."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.errors import BadInput

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mjpg", ".mjpeg"})
_GLOB_CHARS = frozenset("*?[")

# FFmpeg prints its own complaints about a broken file straight to stderr; we say it in one line instead.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


@dataclass(frozen=True)
class Frame:
    """One decoded frame; `image` is None when it could not be decoded (`error` says why)."""

    source: str
    index: int
    image: np.ndarray[Any, Any] | None
    error: str | None = None
    file: str | None = None
    """The file, when `source` is a folder or glob."""


@dataclass(frozen=True)
class FileInput:
    """One INPUT argument resolved to files: `source` is the argument as given."""

    source: str
    paths: tuple[Path, ...]
    video: bool


def resolve_inputs(args: list[str]) -> list[FileInput]:
    """Check every INPUT before any work starts; BadInput names the first that is wrong."""
    resolved = []
    for arg in args:
        path = Path(arg)
        if any(c in arg for c in _GLOB_CHARS) and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(arg, recursive=True))
            files = tuple(p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            if not files:
                raise BadInput(f"{arg}: no image or video files match")
            resolved.extend(_expand(arg, files))
        elif path.is_dir():
            files = tuple(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
            if not files:
                raise BadInput(f"{arg}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            resolved.append(FileInput(arg, files, video=False))
        elif path.is_file():
            resolved.append(FileInput(arg, (path,), video=path.suffix.lower() in VIDEO_SUFFIXES))
        elif path.exists():
            raise BadInput(f"{arg}: not a regular file")
        else:
            raise BadInput(f"{arg}: no such file")
    return resolved


def _expand(arg: str, files: tuple[Path, ...]) -> list[FileInput]:
    images = tuple(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
    out = [FileInput(arg, images, video=False)] if images else []
    out.extend(FileInput(arg, (p,), video=True) for p in files if p.suffix.lower() in VIDEO_SUFFIXES)
    return out


def read_image(path: Path) -> np.ndarray[Any, Any]:
    """Decode an image file as BGR (or gray) uint8; BadInput when it is not an image."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror})") from None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise BadInput(f"{path}: cannot decode image (not an image, or truncated)")
    if image.dtype != np.uint8:
        # 16-bit PNG/TIFF: keep the high byte, the models take 8-bit pixels.
        image = np.right_shift(image, 8).astype(np.uint8) if image.dtype == np.uint16 else None
        if image is None:
            raise BadInput(f"{path}: unsupported pixel type")
    if image.ndim == 3 and image.shape[2] == 2:
        raise BadInput(f"{path}: unsupported image with 2 channels")
    return image


def iter_frames(inputs: list[FileInput]) -> Iterator[Frame]:
    """Frames of every input in order; `index` counts images within a folder/glob, or frames in a video."""
    for item in inputs:
        if item.video:
            yield from _video_frames(item.source, item.paths[0])
            continue
        many = len(item.paths) > 1 or Path(item.source) != item.paths[0]
        for index, path in enumerate(item.paths):
            file = str(path) if many else None
            try:
                yield Frame(item.source, index, read_image(path), file=file)
            except BadInput as exc:
                yield Frame(item.source, index, None, str(exc), file=file)


def _video_frames(source: str, path: Path) -> Iterator[Frame]:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            yield Frame(source, 0, None, f"{path}: cannot open video (unsupported container or codec)")
            return
        index = 0
        while True:
            ok, image = cap.read()
            if not ok:
                break
            yield Frame(source, index, image)
            index += 1
        if index == 0:
            yield Frame(source, 0, None, f"{path}: video has no decodable frames")
    finally:
        cap.release()
