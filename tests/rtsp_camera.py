"""The RTSP camera of the tests and scripts/bench_rtsp.py, from the agent's side: the clip of real photos,
the server process (tests/rtsp_server.py under the system Python), stopped and started for outages,
and the frame stamp it writes (to tell a decoded frame's age)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
WIDTH, HEIGHT, FPS = 640, 480, 15
STAMP_BITS, STAMP_BLOCK = 40, 16
PHOTO_SIZE = 448
"""The photos are scaled to this square, centred below the stamp row."""
PHOTO_XY = ((WIDTH - PHOTO_SIZE) // 2, 24)

sys.path.insert(0, str(ROOT / "scripts"))
from face_photos import PHOTOS  # noqa: E402


def server_available() -> str | None:
    """None when the system Python has the GStreamer RTSP server and x264, else why not."""
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "assert Gst.ElementFactory.find('x264enc'), 'no x264enc'")
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} is missing"
    proc = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return "the GStreamer RTSP server is not installed (scripts/test installs it: ensure_rtsp_server)"
    return None


def clip_photos() -> list[str]:
    """The clip: 1 s of the astronaut (one face), 1 s of the coffee cup (none), looping."""
    return ["astronaut"] * FPS + ["coffee"] * FPS


def face_box() -> tuple[float, float, float, float]:
    """Where the astronaut's face is in the 640x480 frame (normalised x1, y1, x2, y2), from the
    reference detections of the photo (tests/fixtures/face_reference.json, short-range model)."""
    import json

    ref = json.loads((ROOT / "tests" / "fixtures" / "face_reference.json").read_text())
    x1, y1, x2, y2 = ref["images"]["astronaut"]["short"][0]["box"]
    px, py = PHOTO_XY
    return ((px + x1 * PHOTO_SIZE) / WIDTH, (py + y1 * PHOTO_SIZE) / HEIGHT,
            (px + x2 * PHOTO_SIZE) / WIDTH, (py + y2 * PHOTO_SIZE) / HEIGHT)


def write_clip(path: Path) -> Path:
    """Raw I420 640x480 frames of the clip (each photo scaled into a grey frame)."""
    import cv2

    rendered: dict[str, bytes] = {}
    with path.open("wb") as f:
        for name in clip_photos():
            if name not in rendered:
                rgb = PHOTOS[name]()
                canvas = np.full((HEIGHT, WIDTH, 3), 96, np.uint8)
                px, py = PHOTO_XY
                canvas[py:py + PHOTO_SIZE, px:px + PHOTO_SIZE] = cv2.resize(
                    rgb[:, :, ::-1], (PHOTO_SIZE, PHOTO_SIZE), interpolation=cv2.INTER_AREA)
                rendered[name] = cv2.cvtColor(canvas, cv2.COLOR_BGR2YUV_I420).tobytes()
            f.write(rendered[name])
    return path


def read_stamp(frame: Any) -> float | None:
    """The server's push time (Unix seconds) written into a decoded BGR frame; None if unreadable."""
    if frame is None or frame.shape[0] < STAMP_BLOCK or frame.shape[1] < STAMP_BITS * STAMP_BLOCK:
        return None
    row = frame[4:STAMP_BLOCK - 4, :STAMP_BITS * STAMP_BLOCK].astype(np.float32).mean(axis=(0, 2))
    blocks = row.reshape(STAMP_BITS, STAMP_BLOCK)[:, 4:-4].mean(axis=1)
    if np.any((blocks > 90) & (blocks < 170)):
        return None  # not a clean black/white row (a damaged frame)
    ms = 0
    for bright in blocks > 128:
        ms = (ms << 1) | int(bright)
    now_ms = int(time.time() * 1000)
    ms |= now_ms & ~((1 << STAMP_BITS) - 1)
    return ms / 1000.0


class RtspCamera:
    """tests/rtsp_server.py on 127.0.0.1:`port`; `stop()` and `start()` again for an outage."""

    def __init__(self, folder: Path, port: int, user: str | None = None, password: str | None = None,
                 transport: str = "any") -> None:
        self.folder = folder
        self.transport = transport
        self.port = port
        self.user = user
        self.password = password
        self.clip = folder / "clip.i420"
        if not self.clip.exists():
            write_clip(self.clip)
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: list[str] = []

    def url(self, user: str | None = None, password: str | None = None) -> str:
        cred = f"{user}:{password}@" if user is not None else ""
        return f"rtsp://{cred}127.0.0.1:{self.port}/cam"

    def start(self, timeout: float = 15.0) -> RtspCamera:
        cmd = [SYSTEM_PYTHON, str(ROOT / "tests" / "rtsp_server.py"), "--port", str(self.port), "--clip",
               str(self.clip), "--transport", self.transport]
        if self.user is not None:
            secret = self.folder / "server-password"
            secret.write_text(self.password or "")
            cmd += ["--user", self.user, "--password-file", str(secret)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()
        proc = self.proc

        def drain_out() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip() == "ready":
                    ready.set()

        def drain_err() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.stderr.append(line.rstrip())

        threading.Thread(target=drain_out, daemon=True).start()
        threading.Thread(target=drain_err, daemon=True).start()
        if not ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"the RTSP server did not start: {' | '.join(self.stderr[-5:])}")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def __enter__(self) -> RtspCamera:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def have_system_python() -> bool:
    return shutil.which(SYSTEM_PYTHON) is not None
