"""Microphone captures: raw PCM bytes from a device, through `arecord` or through `sounddevice`.

A capture is one opening of one device. `start()` fails with BadInput when the
device is not there; `read()` hands out one block of bytes or None on a timeout,
counts overruns, and raises `DeviceLost` when the device goes away mid-stream (the
source then reopens it with backoff). `arecord` (alsa-utils) works on any Pi
without PortAudio; `sounddevice` (the `audio` extra) needs PortAudio and offers
device names and indexes across host APIs.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import queue
import re
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from agent.audio.pcm import PcmFormat
from agent.errors import BadInput, LeptonError

logger = logging.getLogger(__name__)


class DeviceLost(LeptonError):
    """The device stopped delivering audio (unplugged, driver reset, capture process died)."""


@dataclass(frozen=True)
class CaptureSettings:
    """How to open a microphone."""

    device: str | int | None
    """ALSA PCM name (arecord), PortAudio device name or index (sounddevice); None: the default."""
    rate: int | None = None
    """Capture rate; None: 16 kHz, or the device's default rate when it does not offer 16 kHz."""
    channels: int = 1
    """Channels to capture (mixed down to mono)."""
    block_ms: int = 100
    """Audio per block handed out. 100 ms: the loop wakes ten times a second, which costs a
    third of the CPU that 30 ms blocks cost (caches stay warm across the block's inferences),
    and a wake word is reported at most 100 ms later."""
    open_timeout_s: float = 2.0
    """How long `start()` waits for the device to deliver or fail."""


class Capture(abc.ABC):
    """One opening of a microphone."""

    format: PcmFormat

    def __init__(self, settings: CaptureSettings) -> None:
        self.settings = settings
        self.overruns = 0
        """Times the device had data we did not take in time (audio lost)."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def read(self, timeout: float) -> bytes | None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def block_bytes(self) -> int:
        frames = max(1, self.format.rate * self.settings.block_ms // 1000)
        return frames * self.format.frame_bytes


# Source locations in arecord's and alsa-lib's messages say nothing to a user.
_ALSA_NOISE = re.compile(r"^(ALSA lib \S+ |arecord: \w+:\d+: )")


def is_overrun_message(line: str) -> bool:
    """arecord's xrun report: `overrun!!! (at least 12.345 ms long)`."""
    return line.startswith("overrun!!!")


class ArecordCapture(Capture):
    """`arecord -t raw` as a child process; its stdout is the audio, its stderr the overrun reports."""

    def __init__(self, settings: CaptureSettings) -> None:
        super().__init__(settings)
        self.format = PcmFormat(settings.rate or 16000, settings.channels, 2)
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = bytearray()
        self._err_tail = bytearray()
        self._started = False
        self.errors: list[str] = []
        """What arecord said on stderr, overrun reports aside (the last few lines)."""

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _command(self) -> list[str]:
        device = self.settings.device
        if device is None or device == "":
            name = "default"
        elif isinstance(device, int):
            name = f"plughw:{device}"
        else:
            name = device
        # About 0.5 s of device buffer: enough to ride out a busy moment, small enough to stay current.
        return ["arecord", "-D", name, "-t", "raw", "-f", "S16_LE", "-r", str(self.format.rate),
                "-c", str(self.format.channels), "--buffer-time=500000"]

    def start(self) -> None:
        if shutil.which("arecord") is None:
            raise BadInput("arecord not found: install alsa-utils, or use the sounddevice backend")
        cmd = self._command()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        os.set_blocking(self._proc.stderr.fileno(), False)
        deadline = time.monotonic() + self.settings.open_timeout_s
        # Wait for the first audio or for arecord to give up, whichever comes first.
        while not self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._pump(remaining)
            except DeviceLost:
                self.stop()
                detail = "; ".join(self.errors) or "arecord exited"
                raise BadInput(f"cannot open ALSA device {cmd[2]!r}: {detail}") from None
        self._started = True

    def _pump(self, timeout: float) -> None:
        """Wait up to `timeout` for output; take what arrived on stdout and stderr."""
        proc = self._proc
        if proc is None or proc.stdout is None or proc.stderr is None:
            raise DeviceLost("capture is not running")
        out, err = proc.stdout.fileno(), proc.stderr.fileno()
        ready, _, _ = select.select([out, err], [], [], max(0.0, timeout))
        if err in ready:
            self._take_stderr(err)
        if out in ready:
            data = os.read(out, 65536)
            if not data:
                proc.wait()
                self._take_stderr(err)
                raise DeviceLost("; ".join(self.errors[-1:]) or f"arecord exited with status {proc.returncode}")
            self._buffer += data

    def _take_stderr(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        self._err_tail += chunk
        *lines, rest = self._err_tail.split(b"\n")
        self._err_tail = bytearray(rest)
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if is_overrun_message(line):
                self.overruns += 1
                logger.debug("arecord: %s", line)
            elif line and not line.startswith("Recording "):
                line = _ALSA_NOISE.sub("", line)
                self.errors = [*self.errors[-3:], line]
                if self._started:
                    # Before that, start() reports it as the reason the device cannot be opened.
                    logger.warning("arecord: %s", line)

    def read(self, timeout: float) -> bytes | None:
        want = self.block_bytes()
        deadline = time.monotonic() + timeout
        while len(self._buffer) < want:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._pump(remaining)
        block = bytes(self._buffer[:want])
        del self._buffer[:want]
        return block

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        self._buffer.clear()


def import_sounddevice() -> Any:
    """The sounddevice module, or BadInput saying what to install."""
    try:
        import sounddevice
    except ImportError:
        raise BadInput(
            "the sounddevice backend needs the audio extra: pip install 'lepton-agent[audio]' "
            "(or use the arecord backend)"
        ) from None
    except OSError as exc:
        raise BadInput(f"the sounddevice backend needs PortAudio: {exc} (install libportaudio2)") from None
    return sounddevice


class SounddeviceCapture(Capture):
    """A PortAudio input stream; its callback queues blocks, `read()` takes them."""

    QUEUE_BLOCKS = 32
    """About 3 s of audio at 100 ms blocks; older blocks are dropped (and counted) beyond that."""

    def __init__(self, settings: CaptureSettings) -> None:
        super().__init__(settings)
        self._sd = import_sounddevice()
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=self.QUEUE_BLOCKS)
        self._stream: Any = None
        self.dropped = 0
        """Blocks discarded because nobody read them in time."""
        self.format = PcmFormat(16000, settings.channels, 2)

    def start(self) -> None:
        sd = self._sd
        device = self.settings.device if self.settings.device not in ("", None) else None
        try:
            info = sd.query_devices(device, "input")
        except (ValueError, sd.PortAudioError) as exc:
            raise BadInput(f"mic {device if device is not None else 'default'}: no such input device ({exc})") from None
        name = info["name"]
        rate = self.settings.rate
        if rate is None:
            try:
                sd.check_input_settings(device=info["index"], channels=self.settings.channels, dtype="int16",
                                        samplerate=16000)
                rate = 16000
            except (ValueError, sd.PortAudioError):
                # Many USB and HDMI devices only do 44.1/48 kHz: capture at their rate, resample ourselves.
                rate = int(info["default_samplerate"])
                logger.info("mic %s: no 16 kHz capture, recording at %d Hz and resampling", name, rate)
        self.format = PcmFormat(rate, self.settings.channels, 2)
        try:
            self._stream = sd.RawInputStream(
                device=info["index"], samplerate=rate, channels=self.settings.channels, dtype="int16",
                blocksize=self.block_bytes() // self.format.frame_bytes, callback=self._callback,
            )
            self._stream.start()
        except (ValueError, sd.PortAudioError) as exc:
            self._stream = None
            raise BadInput(f"mic {name}: cannot open: {exc}") from None

    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        if status.input_overflow:
            self.overruns += 1
        block = bytes(indata)
        try:
            self._queue.put_nowait(block)
        except queue.Full:
            # Keep the newest audio: a wake word said now matters more than one said two seconds ago.
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
            self.dropped += 1
            self._queue.put_nowait(block)

    def read(self, timeout: float) -> bytes | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            stream = self._stream
            if stream is None or not stream.active:
                raise DeviceLost("input stream stopped") from None
            return None

    def stop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.abort()
                stream.close()
            except self._sd.PortAudioError as exc:
                logger.debug("closing input stream: %s", exc)


CAPTURES: dict[str, type[Capture]] = {"arecord": ArecordCapture, "sounddevice": SounddeviceCapture}
