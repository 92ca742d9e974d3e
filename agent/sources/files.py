"""Image files, folders, globs and video files as frame sources.

`ImageFiles` takes an image, a folder of images or a glob (which may also match
videos, played in turn); `VideoFile` hands over every frame of a video in order
as fast as it is read; with the `realtime` option a video is played at its own
frame rate through a capture thread instead (`PacedVideoFile`), like a camera:
latest-frame semantics, drops counted, optionally looping. A file that cannot
be decoded is one `BadInput` from `read()` naming it; the next `read()` goes on
with the next file. OpenCV is imported when a file is first opened, so that
registering this kind costs an audio-only agent nothing.
"""

from __future__ import annotations

import glob
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BadInput
from agent.sources.capture import Device, DeviceError, LiveSource, frame_options
from agent.sources.source import EndOfStream, Item, Source, register_source

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mjpg", ".mjpeg"})
# Inputs another kind of source reads (audio); never claimed here.
_NOT_FRAMES = frozenset({".wav", ".flac", ".ogg", ".mp3", ".opus"})
_GLOB_CHARS = frozenset("*?[")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

Frame = np.ndarray[Any, Any]


def is_file_input(uri: str) -> bool:
    """A path or glob (no `scheme:` prefix, not a device node), and not an audio file."""
    if _SCHEME.match(uri) or uri.startswith("/dev/"):
        return False
    return Path(uri).suffix.lower() not in _NOT_FRAMES


@register_source(is_file_input)
def file_source(uri: str, options: dict[str, Any]) -> Source:
    """A video file (paced or not) or an image/folder/glob source."""
    path = Path(uri)
    if path.suffix.lower() in VIDEO_SUFFIXES and not any(c in uri for c in _GLOB_CHARS):
        if frame_options(uri, options).realtime:
            return PacedVideoFile(uri, options)
        return VideoFile(uri, options)
    return ImageFiles(uri, options)


def decoded_frames(uris: Sequence[str]) -> Iterator[Frame]:
    """Every frame of image, folder, glob and video file inputs, in order, as arrays of their own.

    For tools that collect frames (calibration, evaluation): all inputs are checked before the first
    frame, and the first frame that cannot be decoded raises BadInput.
    """
    sources = []
    for uri in uris:
        if not is_file_input(uri):
            raise BadInput(f"{uri}: not an image, folder, glob or video file")
        sources.append(file_source(uri, {}))
    for source in sources:
        source.open()
        try:
            while True:
                try:
                    item = source.read(1.0)
                except EndOfStream:
                    break
                if item is not None:
                    yield item.data.copy()  # sources reuse their frame buffers
        finally:
            source.close()


def read_image(path: Path) -> Frame:
    """Decode an image file as BGR (or gray, or BGRA) uint8; BadInput when it is not an image."""
    from agent.vision.cv import cv2

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
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise BadInput(f"{path}: unsupported image with {image.shape[2]} channels")
    return image


def _check_path(uri: str) -> Path:
    path = Path(uri)
    if not path.exists():
        raise BadInput(f"{uri}: no such file")
    if not path.is_file():
        raise BadInput(f"{uri}: not a regular file")
    return path


class VideoFile(Source):
    """Every frame of a video file, in order; `t` is the frame's media time."""

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, options)
        self.settings = frame_options(uri, self.options)
        self._cap: Any = None
        self._buffer: Frame | None = None
        self._index = 0
        self.file: str | None = None
        """Set by a glob source that plays this video as one of its files."""

    def open(self) -> None:
        from agent.vision.cv import cv2

        path = _check_path(self.uri)
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            cap.release()
            raise BadInput(f"{path}: cannot open video (unsupported container or codec)")
        self._cap = cap
        self._index = 0

    def read(self, timeout: float) -> Item | None:
        from agent.vision.cv import cv2

        if self._cap is None:
            raise EndOfStream(self.uri)
        ok, frame = self._cap.read(self._buffer) if self._buffer is not None else self._cap.read()
        if not ok and self.settings.loop and self._index > 0:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self._cap.read(self._buffer) if self._buffer is not None else self._cap.read()
        if not ok:
            self.close()
            if self._index == 0:
                raise BadInput(f"{self.uri}: video has no decodable frames")
            raise EndOfStream(self.uri)
        self._buffer = frame  # decoded into the same buffer next time (valid until the next read)
        t = float(self._cap.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0
        item = Item(frame, self._index, t, time.time(), file=self.file)
        self._index += 1
        self.stats.items += 1
        return item

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


@dataclass(frozen=True)
class _Entry:
    path: Path
    video: bool


class ImageFiles(Source):
    """An image, a folder of images, or a glob of images and videos, decoded one file per read.

    `index` counts images within the source, or frames within each video; `file`
    names the file when the source is a folder or a glob.
    """

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, options)
        frame_options(uri, self.options)
        self._entries: list[_Entry] = []
        self._next = 0
        self._images = 0
        self._video: VideoFile | None = None
        self._many = False

    def open(self) -> None:
        uri = self.uri
        path = Path(uri)
        if any(c in uri for c in _GLOB_CHARS) and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(uri, recursive=True))
            wanted = IMAGE_SUFFIXES | VIDEO_SUFFIXES
            files = [p for p in matches if p.is_file() and p.suffix.lower() in wanted]
            if not files:
                raise BadInput(f"{uri}: no image or video files match")
            self._entries = [_Entry(p, p.suffix.lower() in VIDEO_SUFFIXES) for p in files]
            self._many = True
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise BadInput(f"{uri}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            self._entries = [_Entry(p, False) for p in files]
            self._many = True
        else:
            self._entries = [_Entry(_check_path(uri), False)]
        self._next = 0
        self._images = 0

    def read(self, timeout: float) -> Item | None:
        while True:
            if self._video is not None:
                try:
                    item = self._video.read(timeout)
                    self.stats.items += 1
                    return item
                except EndOfStream:
                    self._video = None
                    continue
                except BadInput:
                    self._video = None
                    self.stats.errors += 1
                    raise
            if self._next >= len(self._entries):
                raise EndOfStream(self.uri)
            entry = self._entries[self._next]
            self._next += 1
            file = str(entry.path) if self._many else None
            if entry.video:
                video = VideoFile(str(entry.path))
                video.file = file
                try:
                    video.open()
                except BadInput:
                    self.stats.errors += 1
                    raise
                self._video = video
                continue
            index = self._images
            self._images += 1
            try:
                image = read_image(entry.path)
            except BadInput:
                self.stats.errors += 1
                raise
            self.stats.items += 1
            return Item(image, index, 0.0, time.time(), file=file)

    def close(self) -> None:
        if self._video is not None:
            self._video.close()
            self._video = None
        self._next = len(self._entries)


class _PacedVideo(Device):
    """A video file read at its own frame rate, on the source's stop event."""

    def __init__(self, cap: Any, source: PacedVideoFile) -> None:
        from agent.vision.cv import cv2

        self._cv2 = cv2
        self.cap = cap
        self.source = source
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.period = 1.0 / (source.settings.fps or (fps if 0 < fps <= 1000 else 30.0))
        self.started = time.monotonic()
        self.frames = 0
        self.offset = 0.0  # media time of the loops already played
        self.last_media = 0.0
        self.at_end = False

    def grab(self) -> bool:
        cv2 = self._cv2
        due = self.started + self.frames * self.period
        delay = due - time.monotonic()
        if delay > 0 and self.source.stop_event.wait(delay):
            return False
        ok = bool(self.cap.grab())
        if not ok and self.source.settings.loop and self.frames:
            self.offset = self.last_media + self.period
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok = bool(self.cap.grab())
        if not ok:
            self.at_end = True
            return False
        self.frames += 1
        self.last_media = self.offset + float(self.cap.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0
        return True

    def retrieve(self, buffer: Frame | None) -> Frame | None:
        ok, frame = self.cap.retrieve(buffer) if buffer is not None else self.cap.retrieve()
        return frame if ok else None

    def media_time(self) -> float | None:
        return self.last_media

    def close(self) -> None:
        self.cap.release()


class PacedVideoFile(LiveSource):
    """A video file played in real time through a capture thread (`realtime` option), like a camera."""

    def check(self) -> None:
        _check_path(self.uri)

    def connect(self) -> Device:
        from agent.vision.cv import cv2

        cap = cv2.VideoCapture(self.uri)
        if not cap.isOpened():
            cap.release()
            raise DeviceError("cannot open video (unsupported container or codec)")
        return _PacedVideo(cap, self)

    def at_end(self, device: Device) -> bool:
        return isinstance(device, _PacedVideo) and device.at_end
