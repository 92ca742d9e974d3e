"""Audio sources on real audio: WAV of any layout, raw PCM on stdin, microphones through real ALSA.

The microphone is a real ALSA PCM (`type file`) that plays a recording into
`arecord` or PortAudio; the ALSA configuration lives in a temporary HOME.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from wavs import RECORDINGS, pcm16, word_of, write_wav

from agent.audio.pcm import PcmConverter, PcmFormat, read_wav_info
from agent.errors import BadInput
from agent.manifest import load_spec
from agent.runtime import Model
from agent.sources.audio import MicSource, StdinSource, WavSource, parse_mic_uri
from agent.sources.microphone import ArecordCapture, is_overrun_message
from agent.sources.source import EndOfStream, Item, Source, open_source
from agent.tasks.wakeword import MODEL_OPTIONS, WakeWordModel, WakeWordRunner

ALEXA = next(p for p in RECORDINGS if word_of(p) == "alexa")


def _drain(source: Source, limit_s: float = 60.0) -> list[Item]:
    items: list[Item] = []
    deadline = time.monotonic() + limit_s
    with source:
        while time.monotonic() < deadline:
            try:
                item = source.read(1.0)
            except EndOfStream:
                return items
            if item is not None:
                items.append(item)
    raise AssertionError(f"{source.uri}: did not end within {limit_s} s")


def _samples(items: list[Item]) -> np.ndarray:
    return np.concatenate([i.data for i in items]) if items else np.zeros(0, np.int16)


def _alexa_runner(models_dir: Path) -> WakeWordRunner:
    spec = load_spec(models_dir / "wakeword" / "alexa.json")
    return WakeWordRunner([WakeWordModel(Model(spec.path, **MODEL_OPTIONS), spec)])


def _labels(runner: WakeWordRunner, samples: np.ndarray) -> list[str]:
    runner.reset()
    return [r["label"] for r in runner.process(samples)]


# -- WAV files -------------------------------------------------------------------


def test_a_16k_mono_wav_passes_through_untouched() -> None:
    items = _drain(WavSource(str(ALEXA)))
    assert np.array_equal(_samples(items), pcm16(ALEXA))
    assert items[0].t == 0.0 and items[1].t == pytest.approx(len(items[0].data) / 16000)
    assert [i.index for i in items] == list(range(len(items)))


@pytest.mark.parametrize(("width", "encoding", "scale"), [
    (3, "int", 256), (4, "int", 65536), (4, "float", 1 / 32768), (8, "float", 1 / 32768),
])
def test_wider_samples_at_16k_convert_exactly(tmp_path: Path, width: int, encoding: str, scale: float) -> None:
    pcm = pcm16(ALEXA)
    stereo = np.stack([pcm, pcm], axis=1).astype(np.float64) * scale
    path = write_wav(tmp_path / "wide.wav", stereo, 16000, width, encoding, extensible=True)
    assert np.array_equal(_samples(_drain(WavSource(str(path)))), pcm)


@pytest.mark.parametrize(("rate", "channels", "width", "encoding"), [
    (48000, 2, 2, "int"), (44100, 1, 4, "float"), (22050, 1, 1, "int"), (8000, 1, 2, "int"), (32000, 6, 3, "int"),
])
def test_any_layout_is_resampled_and_still_wakes(tmp_path: Path, models_dir: Path, rate: int, channels: int,
                                                 width: int, encoding: str) -> None:
    pcm = pcm16(ALEXA).astype(np.float32) / 32768
    x = soxr.resample(pcm, 16000, rate) if rate != 16000 else pcm
    frames = np.repeat(x[:, None], channels, axis=1)
    if encoding == "float":
        data = frames
    elif width == 1:
        data = np.clip(np.rint(frames * 128 + 128), 0, 255)
    else:
        full = 2 ** (8 * width - 1)
        data = np.clip(np.rint(frames * full), -full, full - 1)
    path = write_wav(tmp_path / "any.wav", data, rate, width, encoding)
    out = _samples(_drain(WavSource(str(path))))
    assert abs(len(out) - len(pcm)) <= 16  # the same duration at 16 kHz
    if rate >= 16000:
        # A wideband copy of the recording still wakes its model (8 kHz has lost the band the model hears).
        assert _labels(_alexa_runner(models_dir), out) == ["Alexa"]
    else:
        assert np.corrcoef(out[: len(pcm)].astype(np.float64), pcm16(ALEXA)[: len(out)])[0, 1] > 0.5


def test_stereo_16bit_mixes_down_in_integers() -> None:
    conv = PcmConverter(PcmFormat(16000, 2, 2))
    frames = np.array([[100, 300], [-5, -6], [32767, 32767], [-32768, -32768]], "<i2")
    assert conv.convert(frames.tobytes()).tolist() == [200, -5, 32767, -32768]


def test_truncated_wav_delivers_what_is_there(tmp_path: Path) -> None:
    data = ALEXA.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2 + 1])
    source = WavSource(str(cut))
    out = _samples(_drain(source))
    assert source.problem is not None and "truncated WAV" in source.problem and str(cut) in source.problem
    assert np.array_equal(out, pcm16(ALEXA)[: len(out)]) and len(out) == (len(data) // 2 + 1 - 44) // 2


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "not a WAV file"),
    (b"ID3\x03\x00 an mp3 in disguise" * 10, "not a WAV file"),
    (b"RIFF\x10\x00\x00\x00WAVEfmt ", "truncated WAV"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + bytes.fromhex("0200010080bb0000000000000400100000"),
     "unsupported WAV encoding (format tag 0x0002)"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + bytes.fromhex("0100000080bb00000000000004001000"),
     "invalid WAV: 0 channels"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + bytes.fromhex("01000100803e0000000000000400ff00"),
     "unsupported WAV sample width"),
])
def test_files_that_are_not_usable_wavs(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(BadInput, match=r"bad\.wav: ") as err:
        read_wav_info(path)
    assert fragment in str(err.value)


def test_open_source_picks_audio_kinds(tmp_path: Path) -> None:
    assert isinstance(open_source(str(ALEXA)), WavSource)
    assert isinstance(open_source("-"), StdinSource)
    assert isinstance(open_source("mic:"), MicSource) and open_source("mic:").kind == "audio"
    assert parse_mic_uri("mic:") is None and parse_mic_uri("mic:2") == 2 and parse_mic_uri("mic:hw:1,0") == "hw:1,0"
    with pytest.raises(BadInput, match="backend"):
        open_source("mic:", {"backend": "pulse"})


# -- stdin ---------------------------------------------------------------------------


def test_raw_pcm_on_stdin_in_uneven_pieces() -> None:
    pcm = pcm16(ALEXA)
    read_fd, write_fd = os.pipe()
    raw = pcm.tobytes()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as w:
            for start in range(0, len(raw), 1001):  # odd sizes: samples split across writes
                w.write(raw[start : start + 1001])
                w.flush()

    writer = threading.Thread(target=feed)
    writer.start()
    with os.fdopen(read_fd, "rb") as r:
        out = _samples(_drain(StdinSource("-", {"stream": r})))
    writer.join(timeout=10)
    assert np.array_equal(out, pcm)


# -- microphones through real ALSA ----------------------------------------------------


@pytest.fixture(scope="module")
def alsa_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A HOME whose ~/.asoundrc defines file-backed capture devices playing the alexa recording."""
    if subprocess.run(["which", "arecord"], capture_output=True, check=False).returncode != 0:
        pytest.fail("arecord is missing: scripts/test installs alsa-utils")
    home = tmp_path_factory.mktemp("alsa")
    pcm = pcm16(ALEXA)
    silence = np.zeros(8000, np.int16)
    (home / "alexa16k.raw").write_bytes(np.concatenate([silence, pcm, silence]).tobytes())
    up = soxr.resample(np.concatenate([silence, pcm, silence]).astype(np.float32) / 32768, 16000, 48000)
    (home / "alexa48k.raw").write_bytes(np.clip(np.rint(up * 32768), -32768, 32767).astype("<i2").tobytes())
    pcms = []
    for name in ("alexa16k", "alexa48k"):
        pcms.append(textwrap.dedent(f"""
            pcm.lepton_{name} {{
                type file
                slave.pcm "null"
                file "/dev/null"
                infile "{home / (name + '.raw')}"
                format "raw"
                hint {{ show on description "Lepton test microphone {name}" }}
            }}
        """))
    (home / ".asoundrc").write_text("".join(pcms))
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    yield home
    if saved is None:
        del os.environ["HOME"]
    else:
        os.environ["HOME"] = saved


def _collect(source: MicSource, samples: int, limit_s: float = 30.0) -> np.ndarray:
    items: list[Any] = []
    have = 0
    deadline = time.monotonic() + limit_s
    while have < samples and time.monotonic() < deadline:
        item = source.read(1.0)
        if item is not None:
            items.append(item.data)
            have += len(item.data)
    assert have >= samples, f"only {have} of {samples} samples in {limit_s} s"
    return np.concatenate(items)[:samples]


def test_arecord_mic_delivers_the_device_audio(alsa_home: Path, models_dir: Path) -> None:
    expected = np.frombuffer((alsa_home / "alexa16k.raw").read_bytes(), "<i2")
    source = MicSource("mic:lepton_alexa16k", {"backend": "arecord"})
    with source:
        got = _collect(source, len(expected))
    # The device plays the file into arecord: every sample arrives unchanged.
    assert np.array_equal(got, expected)
    assert _labels(_alexa_runner(models_dir), got) == ["Alexa"]


def test_arecord_mic_at_48k_is_resampled(alsa_home: Path, models_dir: Path) -> None:
    expected = len(np.frombuffer((alsa_home / "alexa16k.raw").read_bytes(), "<i2"))
    source = MicSource("mic:lepton_alexa48k", {"backend": "arecord", "rate": 48000})
    with source:
        assert source.capture is not None and source.capture.format.rate == 48000
        got = _collect(source, expected)
    assert _labels(_alexa_runner(models_dir), got) == ["Alexa"]


def test_a_mic_that_goes_away_is_reopened_with_backoff(alsa_home: Path) -> None:
    source = MicSource("mic:lepton_alexa16k", {"backend": "arecord", "backoff_s": 0.05})
    with source:
        _collect(source, 1600)
        capture = source.capture
        assert isinstance(capture, ArecordCapture) and capture.pid is not None
        os.kill(capture.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while source.stats.restarts < 1 and time.monotonic() < deadline:
            source.read(0.5)
        assert source.stats.errors >= 1 and source.stats.restarts == 1
        assert source.capture is not None and source.capture is not capture
        # Back to the start of the device's audio: the reopened capture plays the file again.
        head = np.frombuffer((alsa_home / "alexa16k.raw").read_bytes()[:3200], "<i2")
        assert np.array_equal(_collect(source, 1600), head)


def test_a_mic_that_does_not_exist(alsa_home: Path) -> None:
    source = MicSource("mic:no_such_device", {"backend": "arecord"})
    expected = r"mic:no_such_device: cannot open ALSA device 'no_such_device': Unknown PCM no_such_device; audio open"
    with pytest.raises(BadInput, match=expected):
        source.open()


def test_arecord_overrun_reports_are_recognised() -> None:
    # arecord's own wording (alsa-utils aplay.c, xrun()).
    assert is_overrun_message("overrun!!! (at least 42.317 ms long)")
    assert not is_overrun_message("Recording raw data 'stdin' : Signed 16 bit Little Endian, Rate 16000 Hz, Mono")


_SOUNDDEVICE_SCRIPT = """
import json, sys, time
import numpy as np
from agent.sources.audio import MicSource
from agent.errors import BadInput
out = {}
try:
    MicSource("mic:no_such_device", {"backend": "sounddevice"}).open()
except BadInput as exc:
    out["missing"] = str(exc)
source = MicSource("mic:lepton_alexa16k", {"backend": "sounddevice"})
source.open()
got, deadline = [], time.monotonic() + 30
while sum(map(len, got)) < 16000 and time.monotonic() < deadline:
    item = source.read(1.0)
    if item is not None:
        got.append(item.data)
source.close()
out["samples"] = int(sum(map(len, got)))
out["rate"] = source.settings.rate
out["dtype"] = str(got[0].dtype) if got else None
out["stats"] = source.stats.__dict__
out["cv2"] = "cv2" in sys.modules
print(json.dumps(out))
"""


def test_sounddevice_mic_through_portaudio(alsa_home: Path) -> None:
    pytest.importorskip("sounddevice", reason="the audio extra (sounddevice) is installed in the litert lane only")
    # PortAudio reads the ALSA configuration when it starts: run in a fresh process with that HOME.
    proc = subprocess.run([sys.executable, "-c", _SOUNDDEVICE_SCRIPT], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HOME": str(alsa_home)}, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "no such input device" in out["missing"] and "no_such_device" in out["missing"]
    assert out["samples"] >= 16000 and out["dtype"] == "int16"
    assert out["stats"]["items"] > 0 and out["cv2"] is False


def test_looping_wav_stands_in_for_a_microphone(tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    samples = (np.arange(16_000 // 4, dtype=np.int64) % 200 - 100).astype(np.int16)  # 0.25 s
    write_wav(path, samples, 16_000, 2)
    source = WavSource(str(path), {"loop": True, "gap_s": 0.25})
    source.open()
    try:
        items = [source.read(1.0) for _ in range(6)]
    finally:
        source.close()
    got = [i for i in items if i is not None]
    assert len(got) == 6  # a 0.25 s file gives 6 chunks and more: it loops
    assert [round(i.t, 3) for i in got] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]  # media time runs on
    assert np.array_equal(got[0].data, samples) and not got[1].data.any() and np.array_equal(got[2].data, samples)


def test_realtime_wav_is_paced_and_closes_promptly(tmp_path: Path) -> None:
    path = tmp_path / "one.wav"
    write_wav(path, np.zeros(16_000, np.int16), 16_000, 2)
    source = WavSource(str(path), {"realtime": True})
    source.open()
    try:
        assert source.read(0.0) is None  # the first half second has not been "heard" yet
        item = None
        while item is None:
            item = source.read(1.0)
        assert item.t == 0.0
        closer = threading.Timer(0.2, source.close)
        closer.start()
        with pytest.raises(EndOfStream):
            while True:  # the second chunk is due later; close() interrupts the wait
                if source.read(5.0) is not None:
                    continue
        closer.join()
    finally:
        source.close()


def test_unknown_wav_option_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"source_options\.looping: unknown option"):
        WavSource(str(tmp_path / "x.wav"), {"looping": True})
