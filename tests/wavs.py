"""Real recordings and WAV files of any layout made from them, for the audio tests."""

from __future__ import annotations

import struct
import wave
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WAKEWORD_DATA = ROOT / "tests" / "fixtures" / "wakeword"
WORDS = ("alexa", "hey_jarvis", "hey_mycroft")
LABELS = {"alexa": "Alexa", "hey_jarvis": "Hey Jarvis", "hey_mycroft": "Hey Mycroft"}
RECORDINGS = sorted(WAKEWORD_DATA.glob("*/*.wav"))


def word_of(path: Path) -> str:
    return path.parent.name


def pcm16(path: Path) -> np.ndarray[Any, np.dtype[np.int16]]:
    """The samples of a 16 kHz mono 16-bit recording, read with the standard library."""
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


def write_wav(path: Path, frames: np.ndarray[Any, Any], rate: int, width: int, encoding: str = "int",
              extensible: bool = False) -> Path:
    """Write interleaved `frames` (shape [n] or [n, channels]) as a WAV with the given layout."""
    data = frames if frames.ndim == 2 else frames[:, None]
    channels = data.shape[1]
    if encoding == "float":
        raw = data.astype("<f4" if width == 4 else "<f8").tobytes()
        tag = 3
    elif width == 1:
        raw = data.astype(np.uint8).tobytes()
        tag = 1
    elif width == 3:
        v = data.astype("<i4").reshape(-1)
        raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8).tobytes()
        tag = 1
    else:
        raw = data.astype(f"<i{width}").tobytes()
        tag = 1
    block = width * channels
    if extensible:
        guid = struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, width * 8, 22, width * 8,
                          0) + guid
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, width * 8)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"LIST" + struct.pack("<I", 4) + b"INFO"  # a chunk readers must skip
    body += b"data" + struct.pack("<I", len(raw)) + raw + (b"\x00" if len(raw) & 1 else b"")
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path
