"""Live frame capture in its own thread, with latest-frame semantics, an fps cap and self-healing.

A `LiveSource` runs one capture thread per device. The thread grabs every frame
the device produces (so the device's own queue never fills and latency stays
low), decodes only the frames the fps cap lets through, and puts each into the
*latest* slot. A frame nobody read before the next one arrived is dropped and
counted in `stats.dropped`; the pipeline always gets the newest frame with its
own capture time. A device that fails (open error, read errors, end of a
stream) is closed, reopened after a backoff and counted in `stats.restarts`;
every wait is on the one stop event, so `close()` is prompt.

The backoff grows with the outage, not with the attempts: the wait before the
next probe is a twentieth of how long the device has been gone (between
`backoff_initial` and `backoff_max`). A camera that stays away for an hour is
probed every 30 s; one back after a 20 s outage is found within about a second.
`status()` says what the device is doing (connecting, connected, reconnecting
since when, failed for a reason the retries will not fix by themselves).

Frames live in a small pool of buffers (triple buffering: one being written, the
latest, the one the reader holds), so a steady stream allocates nothing per
frame. An `Item` read from a live source stays valid until the next `read()`;
copy it to keep it longer.
"""

from __future__ import annotations

import abc
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import BadInput
from agent.sources.source import EndOfStream, Item, Source, SourceStats

logger = logging.getLogger(__name__)

Frame = np.ndarray[Any, Any]

# Consecutive failed reads before the device is considered gone and reopened.
MAX_READ_FAILURES = 5

PROBE_FRACTION = 0.05
"""The wait before the next reopen attempt, as a fraction of the outage so far (see the module doc)."""

SourceState = Literal["stopped", "connecting", "connected", "reconnecting", "failed", "ended"]


class FrameOptions(BaseModel):
    """Options of a frame source (config `pipelines.*.source_options`, or defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int | None = Field(default=None, ge=16, le=8192)
    """Capture width asked of the device (None: the device's default)."""
    height: int | None = Field(default=None, ge=16, le=8192)
    """Capture height asked of the device."""
    fps: float | None = Field(default=None, gt=0, le=1000)
    """Frame rate asked of the device."""
    fourcc: str | None = Field(default=None, pattern=r"^[A-Za-z0-9 ]{4}$")
    """Pixel format asked of a V4L2 camera, e.g. `MJPG` (lets USB cameras deliver full resolution at speed)."""
    max_fps: float | None = Field(default=None, gt=0, le=1000)
    """Cap on the frames handed to the pipeline; frames in between are grabbed and skipped, not decoded."""
    retry_open: bool = False
    """Keep retrying with backoff when the device cannot be opened at start (the daemon), instead of
    failing at once (the command line)."""
    backoff_initial: float = Field(default=0.5, gt=0, le=60)
    """Shortest wait before reopening a failed device, in seconds; the wait grows with the outage."""
    backoff_max: float = Field(default=30.0, gt=0, le=3600)
    """Longest wait between reopen attempts, in seconds (reached after `backoff_max / 0.05` s of outage)."""
    timeout: float = Field(default=10.0, gt=0, le=600)
    """Seconds a stream may take to open or to deliver the next frame before it counts as stalled."""
    realtime: bool = False
    """Video files: play at the file's frame rate through the capture thread (like a camera) instead
    of handing over every frame as fast as the reader takes them."""
    loop: bool = False
    """Video files: start again at the end instead of ending the stream."""
    transport: Literal["tcp", "udp"] | None = None
    """RTSP streams: the lower transport (None: FFmpeg's default through OpenCV, TCP)."""
    decode_threads: int | None = Field(default=None, ge=1, le=64)
    """Network streams: FFmpeg's decoder threads (None: FFmpeg's choice, one per core). Frame threading
    holds back a frame per extra thread: 1 gives the freshest frames if one core keeps up with the stream."""
    username: str | None = Field(default=None, min_length=1)
    """Network streams: the user name (instead of `user@` in the URI)."""
    password_file: Path | None = None
    """Network streams: a file whose first line is the password (kept out of the URI and the config)."""
    password_env: str | None = Field(default=None, min_length=1)
    """Network streams: the environment variable holding the password."""


# `scheme://user:password@…`, up to the *last* `@`: a password with an unescaped `@`, `/` or `:` is still
# all hidden, and an `@` later in the path hides more than needed rather than less.
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*):.*@(?P<tail>[^@]*)$", re.DOTALL)
# Cheap cameras take credentials in the query (`video.cgi?user=admin&pwd=…`).
_SECRET_PARAM = re.compile(r"(?P<key>(?:^|[?&;])(?:pass|passwd|password|pwd|pw|token|key|auth|secret)=)[^&;#]*",
                           re.IGNORECASE)


def redact(uri: str) -> str:
    """The URI without its password (in the authority or a query parameter), for everything shown."""
    m = _USERINFO.match(uri)
    if m is not None:
        uri = f"{m['head']}:***@{m['tail']}"
    return _SECRET_PARAM.sub(lambda p: f"{p['key']}***", uri) if "=" in uri else uri


def frame_options(uri: str, options: dict[str, Any]) -> FrameOptions:
    try:
        return FrameOptions.model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "options"
        raise BadInput(f"{redact(uri)}: source option {loc}: {err['msg']}") from None


class DeviceError(Exception):
    """The device cannot be opened or has gone away; the message says why, in one line."""

    def __init__(self, message: str, *, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting
        """A refusal retrying will not fix by itself (wrong credentials): the source reports `failed`."""


class Device(abc.ABC):
    """One opened capture device: grab a frame, then decode it only if it is wanted."""

    @abc.abstractmethod
    def grab(self) -> bool:
        """Wait for the next frame; False when none came (error, timeout, end of stream)."""

    @abc.abstractmethod
    def retrieve(self, buffer: Frame | None) -> Frame | None:
        """Decode the grabbed frame, into `buffer` when it fits; None when it cannot be decoded."""

    def media_time(self) -> float | None:
        """Seconds into the media of the last grabbed frame, when the device knows it (files)."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...


class LiveSource(Source):
    """A source whose frames come from a capture thread (cameras, streams, paced video)."""

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, options)
        self.name = redact(uri)
        """The URI as logs and messages show it (no password)."""
        self.settings = frame_options(uri, self.options)
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._latest: tuple[Frame, int, float, float] | None = None
        self._held: Frame | None = None
        self._spare: list[Frame] = []
        self._ended = False
        self._captured = 0
        self._decoded = 0
        self._t0 = 0.0
        self.connected = False
        """Whether a device is open right now."""
        self.fps_cap: float | None = self.settings.max_fps
        """Cap on the frames decoded and handed over (the pipeline sets it to its own fps); read per frame."""
        self.state: SourceState = "stopped"
        self._state_since = time.time()
        self._down_since: float | None = None
        self.last_error: str | None = None

    # -- what each kind provides ------------------------------------------------

    @abc.abstractmethod
    def connect(self) -> Device:
        """Open the device; raise DeviceError (one line) when it cannot be opened."""

    def check(self) -> None:
        """Refuse, with BadInput, what no retry can fix (a missing library, an impossible URI)."""

    def at_end(self, device: Device) -> bool:
        """Whether a failed grab means the stream is over (a video file played once), not a fault."""
        return False

    @property
    def stop_event(self) -> threading.Event:
        """Set when the source closes; devices wait on it instead of sleeping."""
        return self._stop

    def status(self) -> dict[str, Any]:
        """What the device is doing, for status and telemetry: state, since (Unix s), reopens, errors, and
        the frames grabbed and decoded since open (fewer decoded than grabbed: the fps cap at work)."""
        return {"state": self.state, "since": round(self._state_since, 3), "reopens": self.stats.restarts,
                "errors": self.stats.errors, "last_error": self.last_error, "grabbed": self._captured,
                "decoded": self._decoded}

    def limit_fps(self, fps: float | None) -> None:
        """Decode no more than about `fps` frames a second (the pipeline's own cap; None: every frame).

        With headroom: the loop's own pacing then still finds a fresh frame at each of its turns."""
        caps = [c for c in (self.settings.max_fps, None if fps is None else fps * 1.5) if c is not None]
        self.fps_cap = min(caps) if caps else None

    def _set_state(self, state: SourceState, error: str | None = None) -> None:
        if state != self.state:
            self.state, self._state_since = state, time.time()
        if error is not None:
            self.last_error = error

    def _probe_delay(self) -> float:
        """The wait before the next reopen: a fraction of the outage so far, within the configured bounds."""
        s = self.settings
        down = 0.0 if self._down_since is None else time.monotonic() - self._down_since
        return min(s.backoff_max, max(s.backoff_initial, down * PROBE_FRACTION))

    # -- the Source interface ---------------------------------------------------

    def open(self) -> None:
        if self._thread is not None:
            return
        self.check()
        device: Device | None = None
        self._down_since = None
        self._set_state("connecting")
        if not self.settings.retry_open:
            try:
                device = self.connect()
            except DeviceError as exc:
                self._set_state("failed", str(exc))
                raise BadInput(f"{self.name}: {exc}") from None
            self.connected = True
            self._set_state("connected")
        self._stop.clear()
        with self._changed:
            self._ended, self._latest, self._captured, self._decoded = False, None, 0, 0
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(device,), name=f"capture {self.name}", daemon=True)
        self._thread.start()

    def read(self, timeout: float) -> Item | None:
        with self._changed:
            if not self._changed.wait_for(lambda: self._latest is not None or self._ended or self._stop.is_set(),
                                          timeout):
                return None
            if self._latest is None:
                raise EndOfStream(self.name)
            frame, index, t, ts = self._latest
            self._latest = None
            if self._held is not None:
                self._spare.append(self._held)
            self._held = frame
            self.stats.items += 1
        return Item(frame, index, t, ts)

    def close(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.settings.timeout + 1.0)
            if thread.is_alive():
                # Blocked inside the device's own read; it releases the device when that returns.
                logger.warning("%s: capture thread still in a device call; leaving it to finish", self.name)
        self._set_state("stopped")

    def wait_for(self, condition: Callable[[SourceStats], bool], timeout: float) -> bool:
        """Wait until `condition(stats)` holds (checked whenever the capture thread changes them)."""
        with self._changed:
            return self._changed.wait_for(lambda: condition(self.stats), timeout)

    @property
    def captured(self) -> int:
        """Frames grabbed from the device since open (read, dropped or skipped by the fps cap)."""
        return self._captured

    # -- the capture thread -----------------------------------------------------

    def _run(self, device: Device | None) -> None:
        failures = 0
        next_due = 0.0
        writing: Frame | None = None
        try:
            while not self._stop.is_set():
                if device is None:
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                    try:
                        device = self.connect()
                    except DeviceError as exc:
                        self._count_restart(f"cannot open: {exc}", failed=exc.lasting)
                        if self._stop.wait(self._probe_delay()):
                            break
                        continue
                    except Exception:
                        logger.exception("%s: opening the device failed unexpectedly", self.name)
                        self._count_restart("unexpected error while opening")
                        if self._stop.wait(self._probe_delay()):
                            break
                        continue
                    self.connected = True
                    failures = 0
                    self._set_state("connected")
                    logger.info("%s: connected", self.name)
                started = time.monotonic()
                try:
                    grabbed = device.grab()
                except Exception:
                    logger.exception("%s: grab failed", self.name)
                    grabbed = False
                if self._stop.is_set():
                    break
                if not grabbed:
                    if self.at_end(device):
                        self._set_state("ended")
                        break
                    failures += 1
                    with self._changed:
                        self.stats.errors += 1
                        self._changed.notify_all()
                    # A failure that took the whole timeout is a stall: the device is gone, reopen now.
                    # One that came at once is a corrupt frame: skip it, unless they keep coming.
                    stalled = time.monotonic() - started >= self.settings.timeout * 0.8
                    if stalled or failures >= MAX_READ_FAILURES:
                        self._release(device)
                        device = None
                        if self._down_since is None:  # else: opened, but no frame since; the outage goes on
                            self._down_since = time.monotonic()
                        self._count_restart("stalled" if stalled else f"{failures} failed reads in a row")
                        if self._stop.wait(self._probe_delay()):
                            break
                    continue
                self._captured += 1
                now, ts = time.monotonic() - self._t0, time.time()
                cap = self.fps_cap
                interval = 1.0 / cap if cap else 0.0
                if interval and now < next_due:
                    continue  # the fps cap: grabbed to keep the device's queue short, not decoded
                frame = device.retrieve(writing)
                self._decoded += 1
                if frame is None or frame.dtype != np.uint8 or frame.ndim not in (2, 3) or frame.size == 0:
                    failures += 1
                    with self._changed:
                        self.stats.errors += 1  # a corrupt frame: counted and skipped
                        self._changed.notify_all()
                    continue
                failures = 0
                self._down_since = None
                if interval:
                    # A rate cap that forgives up to half an interval of jitter but never lets frames bunch up.
                    next_due = max(next_due, now - interval / 2) + interval
                media = device.media_time()
                writing = self._publish(frame, self._captured - 1, media if media is not None else now, ts)
        finally:
            if device is not None:
                self._release(device)
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def _publish(self, frame: Frame, index: int, t: float, ts: float) -> Frame | None:
        """Make `frame` the latest; return the buffer to decode the next frame into."""
        with self._changed:
            if self._latest is not None:
                self.stats.dropped += 1
                stale = self._latest[0]
                if stale is not frame:
                    self._spare.append(stale)
            self._latest = (frame, index, t, ts)
            self._changed.notify_all()
            while self._spare:
                spare = self._spare.pop()
                if spare.shape == frame.shape:
                    return spare
            return None

    def _release(self, device: Device) -> None:
        self.connected = False
        try:
            device.close()
        except Exception:
            logger.exception("%s: closing the device failed", self.name)

    def _count_restart(self, why: str, failed: bool = False) -> None:
        with self._changed:
            self.stats.restarts += 1
            self._set_state("failed" if failed else "connecting" if self.state == "connecting" else "reconnecting", why)
            self._changed.notify_all()
        logger.warning("%s: %s; reopening (restart %d)", self.name, why, self.stats.restarts)
