"""PCM in any layout → 16 kHz mono int16, and the WAV header that says which layout a file has.

The models take 16 kHz mono 16-bit audio. Anything else (8/24/32-bit integer,
32/64-bit float, several channels, 8-192 kHz) is mixed down to mono and
resampled with soxr, the resampler of the field (streaming, so a long file or a
live device never needs its whole audio in memory). Audio that already is 16 kHz
mono int16 passes through untouched: not one sample changes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.errors import BadInput

TARGET_RATE = 16000

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_INT_WIDTHS = frozenset({1, 2, 3, 4})
_FLOAT_WIDTHS = frozenset({4, 8})


@dataclass(frozen=True)
class PcmFormat:
    """How interleaved samples are laid out."""

    rate: int
    """Frames per second."""
    channels: int
    width: int
    """Bytes per sample: 1 (unsigned), 2, 3, 4 (signed little-endian), or 4/8 for float."""
    encoding: Literal["int", "float"] = "int"

    @property
    def frame_bytes(self) -> int:
        return self.width * self.channels

    @property
    def is_target(self) -> bool:
        return self.rate == TARGET_RATE and self.channels == 1 and self.width == 2 and self.encoding == "int"

    def describe(self) -> str:
        kind = "float" if self.encoding == "float" else "bit"
        return f"{self.rate} Hz, {self.channels} ch, {self.width * 8}-{kind}"


S16_MONO_16K = PcmFormat(TARGET_RATE, 1, 2)


class PcmConverter:
    """Streaming conversion of raw interleaved PCM bytes to 16 kHz mono int16 samples."""

    def __init__(self, fmt: PcmFormat) -> None:
        self.format = fmt
        self._resampler: Any = None
        if fmt.rate != TARGET_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(fmt.rate, TARGET_RATE, 1, dtype="float32", quality="HQ")

    def convert(self, raw: bytes, last: bool = False) -> np.ndarray[Any, np.dtype[np.int16]]:
        """Convert whole frames (`len(raw)` a multiple of the frame size); `last` flushes the resampler."""
        fmt = self.format
        if fmt.is_target:
            return np.frombuffer(raw, dtype="<i2").astype(np.int16, copy=False)
        if fmt.rate == TARGET_RATE and fmt.width == 2 and fmt.encoding == "int":
            # Integer mixdown: no float round trip for the common stereo 16 kHz case.
            frames = np.frombuffer(raw, dtype="<i2").reshape(-1, fmt.channels).astype(np.int32)
            return np.floor_divide(frames.sum(axis=1) + fmt.channels // 2, fmt.channels).astype(np.int16)
        mono = self._to_float_mono(raw)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono, last=last)
        out = np.rint(mono * 32768.0)
        np.clip(out, -32768, 32767, out=out)
        return out.astype(np.int16)

    def _to_float_mono(self, raw: bytes) -> np.ndarray[Any, np.dtype[np.float32]]:
        fmt = self.format
        if fmt.encoding == "float":
            x = np.frombuffer(raw, dtype="<f4" if fmt.width == 4 else "<f8").astype(np.float32)
        elif fmt.width == 1:
            x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
        elif fmt.width == 2:
            x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        elif fmt.width == 3:
            b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
            v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
            v -= (v & 0x800000) << 1
            x = v.astype(np.float32) / 8388608.0
        else:
            x = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
        if fmt.channels > 1:
            x = x.reshape(-1, fmt.channels).mean(axis=1, dtype=np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class WavInfo:
    """Where a WAV file's samples are and how they are laid out."""

    format: PcmFormat
    data_offset: int
    data_bytes: int
    """Whole frames of audio actually in the file."""
    truncated: str | None = None
    """What is missing when the file ends before its header says it should."""

    @property
    def duration_s(self) -> float:
        return self.data_bytes / self.format.frame_bytes / self.format.rate


def read_wav_info(path: Path) -> WavInfo:
    """Parse the RIFF/WAVE header; BadInput naming the file when it is not audio we can read."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            return _parse_wav(path, fh, size)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: not a regular file") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror})") from None


def _parse_wav(path: Path, fh: Any, size: int) -> WavInfo:
    head = fh.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise BadInput(f"{path}: not a WAV file (no RIFF/WAVE header)")
    fmt: PcmFormat | None = None
    pos = 12
    while True:
        header = fh.read(8)
        if len(header) < 8:
            missing = "fmt and data chunks" if fmt is None else "data chunk"
            raise BadInput(f"{path}: truncated WAV: no {missing}")
        chunk_id, chunk_size = header[:4], struct.unpack("<I", header[4:])[0]
        pos += 8
        if chunk_id == b"fmt ":
            fmt = _parse_fmt(path, fh.read(min(chunk_size, 64)))
            fh.seek(pos + chunk_size + (chunk_size & 1))
        elif chunk_id == b"data":
            if fmt is None:
                raise BadInput(f"{path}: invalid WAV: data chunk before fmt chunk")
            available = size - pos
            whole = min(chunk_size, available) // fmt.frame_bytes * fmt.frame_bytes
            truncated = None
            if chunk_size > available:
                truncated = f"truncated WAV: header says {chunk_size} bytes of audio, the file has {available}"
            return WavInfo(fmt, pos, whole, truncated)
        else:
            fh.seek(pos + chunk_size + (chunk_size & 1))
        pos += chunk_size + (chunk_size & 1)
        if pos > size:
            raise BadInput(f"{path}: truncated WAV: chunk {chunk_id!r} runs past the end of the file")


def _parse_fmt(path: Path, body: bytes) -> PcmFormat:
    if len(body) < 16:
        raise BadInput(f"{path}: invalid WAV: fmt chunk is {len(body)} bytes")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
        tag = struct.unpack("<H", body[24:26])[0]
    if tag not in (_WAVE_FORMAT_PCM, _WAVE_FORMAT_IEEE_FLOAT):
        raise BadInput(f"{path}: unsupported WAV encoding (format tag {tag:#06x}); PCM or IEEE float only")
    encoding: Literal["int", "float"] = "float" if tag == _WAVE_FORMAT_IEEE_FLOAT else "int"
    width = (bits + 7) // 8
    if channels < 1 or channels > 32:
        raise BadInput(f"{path}: invalid WAV: {channels} channels")
    if not 1000 <= rate <= 768000:
        raise BadInput(f"{path}: invalid WAV: sample rate {rate} Hz")
    if width not in (_FLOAT_WIDTHS if encoding == "float" else _INT_WIDTHS):
        raise BadInput(f"{path}: unsupported WAV sample width: {bits}-bit {encoding}")
    return PcmFormat(rate, channels, width, encoding)
