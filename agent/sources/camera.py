"""Cameras and network streams, each read by a capture thread (see `agent.sources.capture`).

- `camera:N`, `/dev/videoN`: a USB/V4L2 camera through OpenCV; `width`, `height`,
  `fps` and `fourcc` (e.g. `MJPG`) are asked of the driver.
- `csi:` / `csi:0`: the Raspberry Pi CSI camera through a libcamera GStreamer
  pipeline (needs an OpenCV built with GStreamer, e.g. Debian's python3-opencv).
- `picamera2:N`: the CSI camera through Picamera2 (the optional `picamera2` extra).
- network streams (`rtsp://`, …) are in `agent.sources.network`.

OpenCV is imported when a device is first opened, never at registration.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BadInput
from agent.sources.capture import Device, DeviceError, LiveSource
from agent.sources.source import register_source

logger = logging.getLogger(__name__)

Frame = np.ndarray[Any, Any]

_CAMERA = re.compile(r"^camera:(\d+)$")
_DEV_VIDEO = re.compile(r"^/dev/video(\d+)$")
_CSI = re.compile(r"^csi:(\d*)$")
_PICAMERA2 = re.compile(r"^picamera2:(\d*)$")


class OpenCVDevice(Device):
    """A `cv2.VideoCapture` that is open."""

    def __init__(self, cap: Any) -> None:
        self.cap = cap

    def grab(self) -> bool:
        return bool(self.cap.grab())

    def retrieve(self, buffer: Frame | None) -> Frame | None:
        ok, frame = self.cap.retrieve(buffer) if buffer is not None else self.cap.retrieve()
        return frame if ok else None

    def close(self) -> None:
        self.cap.release()


def _quiet_cv2() -> Any:
    from agent.vision.cv import cv2

    return cv2


@register_source(lambda uri: bool(_CAMERA.match(uri) or _DEV_VIDEO.match(uri)))
class V4L2Camera(LiveSource):
    """A USB (UVC) or other V4L2 camera."""

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, options)
        m = _CAMERA.match(uri) or _DEV_VIDEO.match(uri)
        if m is None:
            raise BadInput(f"{uri}: not a camera (use camera:N or /dev/videoN)")
        self.index = int(m.group(1))
        self.device_path = Path(f"/dev/video{self.index}")

    def connect(self) -> Device:
        cv2 = _quiet_cv2()
        linux = sys.platform.startswith("linux")
        if linux and not self.device_path.exists():
            raise DeviceError(f"no such camera ({self.device_path} does not exist)")
        cap = cv2.VideoCapture(self.index, cv2.CAP_V4L2 if linux else cv2.CAP_ANY)
        if not cap.isOpened():
            cap.release()
            raise DeviceError(f"cannot open camera {self.device_path} (busy, or not a capture device)")
        s = self.settings
        # The pixel format first: some drivers only offer large sizes or high rates in MJPG.
        if s.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*s.fourcc))
        if s.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, s.width)
        if s.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, s.height)
        if s.fps:
            cap.set(cv2.CAP_PROP_FPS, s.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of old ones
        got = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
               float(cap.get(cv2.CAP_PROP_FPS)))
        if (s.width and got[0] != s.width) or (s.height and got[1] != s.height):
            logger.warning("%s: asked for %sx%s, the camera gives %dx%d", self.uri, s.width, s.height, *got[:2])
        logger.info("%s: open at %dx%d, %.1f fps", self.uri, *got)
        return OpenCVDevice(cap)


def libcamera_pipeline(width: int, height: int, fps: float) -> str:
    """A GStreamer pipeline from libcamerasrc to BGR frames for OpenCV's appsink.

    `drop=true max-buffers=1` makes the sink keep only the newest frame, so a slow
    reader never sees a backlog; `sync=false` hands frames over as they come.
    """
    rate = f"{round(fps * 1000)}/1000"
    return (
        f"libcamerasrc ! video/x-raw,width={width},height={height},framerate={rate} ! "
        "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false"
    )


def opencv_has_gstreamer(cv2: Any) -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


@register_source(lambda uri: bool(_CSI.match(uri)))
class LibcameraCamera(LiveSource):
    """The Pi CSI camera through libcamera's GStreamer element (first camera)."""

    def check(self) -> None:
        m = _CSI.match(self.uri)
        if m is None or m.group(1) not in ("", "0"):
            raise BadInput(f"{self.uri}: the GStreamer pipeline opens the first CSI camera only; "
                           "use csi:0, or picamera2:N for another one")
        if not opencv_has_gstreamer(_quiet_cv2()):
            raise BadInput(f"{self.uri}: this OpenCV has no GStreamer support (PyPI wheels never do); install "
                           "Debian's python3-opencv with gstreamer1.0-libcamera, or use picamera2:0")

    @property
    def pipeline(self) -> str:
        s = self.settings
        return libcamera_pipeline(s.width or 640, s.height or 480, s.fps or 30.0)

    def connect(self) -> Device:
        cv2 = _quiet_cv2()
        cap = cv2.VideoCapture(self.pipeline, cv2.CAP_GSTREAMER)
        if not cap.isOpened():
            cap.release()
            raise DeviceError("cannot start the libcamera pipeline (camera missing, or in use by another program)")
        return OpenCVDevice(cap)


class Picamera2Device(Device):
    """A started Picamera2; `capture_array` blocks until the next frame."""

    def __init__(self, camera: Any) -> None:
        self.camera = camera
        self._frame: Frame | None = None

    def grab(self) -> bool:
        try:
            self._frame = self.camera.capture_array("main")
        except (RuntimeError, OSError) as exc:
            logger.warning("picamera2: capture failed: %s", exc)
            return False
        return True

    def retrieve(self, buffer: Frame | None) -> Frame | None:
        return self._frame

    def close(self) -> None:
        try:
            self.camera.stop()
        finally:
            self.camera.close()


@register_source(lambda uri: bool(_PICAMERA2.match(uri)))
class Picamera2Camera(LiveSource):
    """The Pi CSI camera through Picamera2 (optional extra `picamera2`, imported only here)."""

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, options)
        m = _PICAMERA2.match(uri)
        self.camera_num = int(m.group(1) or 0) if m else 0

    def check(self) -> None:
        try:
            import picamera2  # noqa: F401
        except ImportError:
            raise BadInput(f"{self.uri}: the picamera2 package is not installed (pip install "
                           "'lepton-agent[picamera2]', or apt install python3-picamera2)") from None

    def connect(self) -> Device:
        from picamera2 import Picamera2

        s = self.settings
        try:
            camera = Picamera2(camera_num=self.camera_num)
        except (RuntimeError, IndexError, OSError) as exc:
            raise DeviceError(f"cannot open CSI camera {self.camera_num}: {exc}") from None
        try:
            # libcamera's "RGB888" is stored B, G, R in memory: OpenCV's BGR order, no conversion needed.
            main = {"size": (s.width or 640, s.height or 480), "format": "RGB888"}
            controls = {"FrameRate": s.fps} if s.fps else {}
            camera.configure(camera.create_video_configuration(main=main, controls=controls, buffer_count=2))
            camera.start()
        except Exception as exc:
            camera.close()
            raise DeviceError(f"cannot start CSI camera {self.camera_num}: {exc}") from None
        return Picamera2Device(camera)
