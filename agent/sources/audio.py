"""Audio sources: microphones (`mic:`, `mic:NAME`, `mic:INDEX`), `.wav` files, raw PCM on stdin (`-`).

Every item is a chunk of 16 kHz mono int16 samples; `Item.t` is the chunk's start
in seconds of audio into the source. Nothing here imports OpenCV.

Microphone options (the pipeline's source options, or the URI's defaults):
`backend` (`arecord` default, or `sounddevice`), `rate`, `channels`, `block_ms`,
`backoff_s`/`backoff_max_s` (reopening a device that went away).
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.audio.pcm import S16_MONO_16K, TARGET_RATE, PcmConverter, WavInfo, read_wav_info
from agent.errors import BadInput
from agent.sources.microphone import CAPTURES, Capture, CaptureSettings, DeviceLost
from agent.sources.source import EndOfStream, Item, Source, register_source

logger = logging.getLogger(__name__)

FILE_CHUNK_S = 0.5
"""Audio per item from files and stdin: large enough that per-chunk overhead vanishes."""


class WavOptions(BaseModel):
    """Source options of a `.wav` file (a pipeline's `source_options`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    loop: bool = False
    """Start again at the end (a recording standing in for a microphone, e.g. the demo)."""
    realtime: bool = False
    """Release each chunk when its audio would have been heard, as a microphone does."""
    gap_s: Annotated[float, Field(ge=0, le=60)] = 0.0
    """Silence between loops, in seconds."""


class WavSource(Source):
    """A `.wav` file of any rate, width and channel count, converted as it is read."""

    kind = "audio"

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, options)
        try:
            self.settings = WavOptions.model_validate(self.options)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            raise BadInput(f"{uri}: source_options.{loc}: {msg}") from None
        self._closed = threading.Event()
        self._t0 = 0.0
        self._pending: Item | None = None
        self.path = Path(uri)
        self.info: WavInfo | None = None
        self.problem: str | None = None
        """Set when the file is damaged (truncated); what could be read was still delivered."""
        self._fh: BinaryIO | None = None
        self._left = 0
        self._samples = 0
        self._converter: PcmConverter | None = None
        self._flushed = False

    def open(self) -> None:
        self.info = read_wav_info(self.path)
        if self.info.truncated:
            self.problem = f"{self.path}: {self.info.truncated}"
        self._converter = PcmConverter(self.info.format)
        fh = self.path.open("rb")
        fh.seek(self.info.data_offset)
        self._fh = fh
        self._left = self.info.data_bytes
        self._flushed = False
        self._closed.clear()
        self._t0 = time.monotonic()

    def _rewind(self) -> None:
        assert self._fh is not None and self.info is not None
        self._fh.seek(self.info.data_offset)
        self._left = self.info.data_bytes
        self._flushed = False
        self._converter = PcmConverter(self.info.format)

    def read(self, timeout: float) -> Item | None:
        if not self.settings.realtime:
            return self._next()
        # Paced: hand out a chunk once its last sample would have been heard.
        if self._pending is None:
            self._pending = self._next()
        item = self._pending
        due = self._t0 + item.t + item.data.size / TARGET_RATE
        wait = due - time.monotonic()
        if wait > timeout:
            self._closed.wait(timeout)
            return None
        if wait > 0 and self._closed.wait(wait):
            raise EndOfStream(f"{self.uri}: closed")
        self._pending = None
        return item

    def _next(self) -> Item:
        while True:
            try:
                return self._read_chunk()
            except EndOfStream:
                if not self.settings.loop or self._closed.is_set() or self._samples == 0:
                    raise
                self._rewind()
                if self.settings.gap_s:
                    return self._item(np.zeros(int(self.settings.gap_s * TARGET_RATE), np.int16))

    def _read_chunk(self) -> Item:
        if self._fh is None or self._converter is None or self.info is None:
            raise EndOfStream(self.uri)
        frame = self.info.format.frame_bytes
        chunk = int(self.info.format.rate * FILE_CHUNK_S) * frame
        while not self._flushed:
            want = min(self._left, chunk)
            raw = self._fh.read(want) if want else b""
            if len(raw) < want:
                self._left = len(raw)  # the file changed under us: take what is there
            raw = raw[: len(raw) // frame * frame]
            self._left -= len(raw)
            self._flushed = self._left <= 0
            samples = self._converter.convert(raw, last=self._flushed)
            if samples.size:
                return self._item(samples)
        raise EndOfStream(self.uri)

    def _item(self, samples: np.ndarray[Any, Any]) -> Item:
        item = Item(samples, self.stats.items, self._samples / TARGET_RATE, time.time())
        self._samples += samples.size
        self.stats.items += 1
        return item

    def close(self) -> None:
        self._closed.set()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class StdinSource(Source):
    """Raw 16 kHz mono S16_LE PCM on standard input (`-`), e.g. `arecord -t raw ... | lepton-agent infer M -`."""

    kind = "audio"

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, options)
        self._fd = -1
        self._carry = b""
        self._samples = 0
        self._eof = False

    def open(self) -> None:
        stream = self.options.get("stream") or sys.stdin.buffer
        self._fd = stream.fileno()
        self._eof = False

    def read(self, timeout: float) -> Item | None:
        if self._eof:
            raise EndOfStream(self.uri)
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not ready:
            return None
        data = os.read(self._fd, int(TARGET_RATE * FILE_CHUNK_S) * 2)
        if not data:
            self._eof = True
            if len(self._carry):
                logger.warning("%s: odd trailing byte ignored (input is 16-bit samples)", self.uri)
            raise EndOfStream(self.uri)
        data = self._carry + data
        whole = len(data) // 2 * 2
        self._carry = data[whole:]
        if not whole:
            return None
        samples = np.frombuffer(data[:whole], dtype="<i2").astype(np.int16, copy=False)
        item = Item(samples, self.stats.items, self._samples / TARGET_RATE, time.time())
        self._samples += samples.size
        self.stats.items += 1
        return item

    def close(self) -> None:
        self._eof = True


def parse_mic_uri(uri: str) -> str | int | None:
    """`mic:` / `mic` → the default device, `mic:2` → index 2, `mic:NAME` → NAME."""
    rest = uri[4:] if uri.startswith("mic:") else ""
    if rest == "":
        return None
    return int(rest) if rest.isdigit() else rest


def _option(options: dict[str, Any], key: str, kind: type, default: Any, low: float, high: float) -> Any:
    value = options.get(key, default)
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise BadInput(f"source option {key}: {value!r} is not a number") from None
    if not low <= number <= high:
        raise BadInput(f"source option {key}: {value} is outside {low}..{high}")
    return number


class MicSource(Source):
    """A live microphone through `arecord` or `sounddevice`, reopened with backoff when it goes away."""

    kind = "audio"

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, options)
        opts = self.options
        self.backend = str(opts.get("backend", "arecord"))
        if self.backend not in CAPTURES:
            raise BadInput(f"{uri}: source option backend: {self.backend!r} is not one of {', '.join(CAPTURES)}")
        self.settings = CaptureSettings(
            device=parse_mic_uri(uri),
            rate=_option(opts, "rate", int, None, 8000, 192000),
            channels=_option(opts, "channels", int, 1, 1, 32),
            block_ms=_option(opts, "block_ms", int, 100, 10, 1000),
            open_timeout_s=_option(opts, "open_timeout_s", float, 2.0, 0.1, 60.0),
        )
        self.backoff_s = _option(opts, "backoff_s", float, 0.5, 0.01, 60.0)
        self.backoff_max_s = _option(opts, "backoff_max_s", float, 30.0, 0.01, 3600.0)
        self.capture: Capture | None = None
        self._converter: PcmConverter | None = None
        self._closed = threading.Event()
        self._retry_at = 0.0
        self._delay = self.backoff_s
        self._samples = 0
        self._overruns_before = 0
        self._clean_samples = 0

    def _new_capture(self) -> Capture:
        """The capture for this device (tests and the daemon may swap the factory)."""
        return CAPTURES[self.backend](self.settings)

    def _start(self) -> None:
        capture = self._new_capture()
        capture.start()
        self.capture = capture
        fmt = capture.format
        self._converter = PcmConverter(fmt) if fmt != S16_MONO_16K else None

    def open(self) -> None:
        self._closed.clear()
        try:
            self._start()
        except BadInput as exc:
            raise BadInput(f"{self.uri}: {exc}") from None

    def read(self, timeout: float) -> Item | None:
        if self._closed.is_set():
            raise EndOfStream(self.uri)
        if self.capture is None and not self._reopen(timeout):
            return None
        capture = self.capture
        assert capture is not None
        try:
            raw = capture.read(timeout)
        except DeviceLost as exc:
            self._lost(str(exc))
            return None
        self._count_drops(capture)
        if raw is None:
            return None
        samples = self._converter.convert(raw) if self._converter is not None else np.frombuffer(raw, "<i2")
        if samples.size == 0:
            return None
        self._clean_samples += samples.size
        if self._clean_samples >= 10 * TARGET_RATE:
            self._delay = self.backoff_s
        item = Item(samples, self.stats.items, self._samples / TARGET_RATE, time.time())
        self._samples += samples.size
        self.stats.items += 1
        return item

    def _count_drops(self, capture: Capture) -> None:
        lost = capture.overruns + getattr(capture, "dropped", 0)
        if lost != self._overruns_before:
            self.stats.dropped += lost - self._overruns_before
            self._overruns_before = lost

    def _lost(self, reason: str) -> None:
        logger.warning("%s: device lost (%s); reopening in %.1f s", self.uri, reason, self._delay)
        self.stats.errors += 1
        self._drop_capture()
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.backoff_max_s)

    def _drop_capture(self) -> None:
        capture, self.capture = self.capture, None
        if capture is not None:
            self._count_drops(capture)
            capture.stop()
        self._overruns_before = 0
        self._clean_samples = 0

    def _reopen(self, timeout: float) -> bool:
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            # Interruptible: close() sets the event.
            self._closed.wait(min(wait, timeout))
            if self._closed.is_set() or time.monotonic() < self._retry_at:
                return False
        try:
            self._start()
        except (BadInput, DeviceLost) as exc:
            self._lost(str(exc))
            return False
        self.stats.restarts += 1
        logger.info("%s: device reopened", self.uri)
        return True

    def close(self) -> None:
        self._closed.set()
        self._drop_capture()


def _is_mic(uri: str) -> bool:
    return uri == "mic" or uri.startswith("mic:")


def _is_wav(uri: str) -> bool:
    return uri.lower().endswith((".wav", ".wave"))


register_source(_is_mic)(MicSource)
register_source(lambda uri: uri == "-")(StdinSource)
register_source(_is_wav)(WavSource)
