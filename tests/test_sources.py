"""Frame sources on real files, a real HTTP MJPEG stream on loopback, and devices that are not there."""

from __future__ import annotations

import http.server
import json
import shutil
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli

from agent.errors import BadInput
from agent.sources.camera import libcamera_pipeline
from agent.sources.capture import LiveSource, redact
from agent.sources.source import EndOfStream, Item, Source, open_source

WAIT = 30.0  # generous upper bound for every wait; the tests never sleep


def _read(source: Source, timeout: float = WAIT) -> Item:
    item = source.read(timeout)
    assert item is not None, "no frame in time"
    return item


# -- a real MJPEG-over-HTTP camera on loopback ---------------------------------------------


@dataclass
class Script:
    """What the server does on each connection, in order: `frames` JPEGs, then `stall` or close."""

    plans: list[tuple[list[bytes], bool]]
    connections: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    sent_all: threading.Event = field(default_factory=threading.Event)  # a connection's frames all went out


class MjpegServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    script: Script


class _Handler(http.server.BaseHTTPRequestHandler):
    server: MjpegServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        script = self.server.script
        plan = script.plans[min(script.connections, len(script.plans) - 1)]
        script.connections += 1
        frames, stall = plan
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            for jpeg in frames:
                head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
                self.wfile.write(head + jpeg + b"\r\n")
                self.wfile.flush()
                if script.release.wait(0.01):  # pace like a camera; end at once when the test is over
                    return
            script.sent_all.set()
            if stall:
                script.release.wait(WAIT)  # connection open, nothing sent: a stalled camera
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def mjpeg() -> Iterator[tuple[str, Script]]:
    script = Script(plans=[])
    server = MjpegServer(("127.0.0.1", 0), _Handler)
    server.script = script
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg", script
    finally:
        script.release.set()
        server.shutdown()
        server.server_close()


def _jpegs(fixtures: Path, name: str, count: int) -> list[bytes]:
    frame = cv2.imread(str(fixtures / "images" / name))
    assert frame is not None
    ok, data = cv2.imencode(".jpg", frame)
    assert ok
    return [data.tobytes()] * count


def test_stream_frames_reach_infer_with_their_source(mjpeg: tuple[str, Script], fixtures: Path) -> None:
    url, script = mjpeg
    script.plans = [(_jpegs(fixtures, "red_1.png", 400), False)]
    r = run_cli("infer", str(fixtures / "colors_int8.json"), url, "--frames", "3")
    assert r.rc == 0, r.err
    lines = [json.loads(line) for line in r.out.splitlines()]
    assert len(lines) == 3 and all(line["source"] == url for line in lines)
    assert [line["classes"][0]["label"] for line in lines] == ["red"] * 3
    frames = [line["frame"] for line in lines]
    assert frames == sorted(set(frames))


def test_stalled_and_closed_streams_are_reopened(mjpeg: tuple[str, Script], fixtures: Path) -> None:
    url, script = mjpeg
    # 1st connection stalls, 2nd ends, 3rd streams on.
    script.plans = [(_jpegs(fixtures, "red_1.png", 5), True), (_jpegs(fixtures, "green_1.png", 5), False),
                    (_jpegs(fixtures, "blue_1.png", 2000), False)]
    source = open_source(url, {"timeout": 1.0, "backoff_initial": 0.05, "backoff_max": 0.1})
    assert isinstance(source, LiveSource)
    with source:
        first = _read(source)
        assert first.data.shape == (480, 640, 3)
        assert source.wait_for(lambda s: s.restarts >= 2, WAIT), source.stats
        blue = 0
        for _ in range(200):
            item = _read(source)
            if int(np.argmax(item.data.reshape(-1, 3).mean(axis=0))) == 0:  # BGR: blue
                blue += 1
                if blue == 3:
                    break
        assert blue == 3  # frames from the third connection: the loop lived on
        assert script.connections >= 3 and source.stats.errors >= 2


def test_a_corrupt_frame_does_not_break_the_stream(mjpeg: tuple[str, Script], fixtures: Path) -> None:
    # FFmpeg conceals or skips a truncated JPEG inside its own read (no failed grab reaches us, in either
    # lane's OpenCV), so what is checked is that the stream goes on past it on the same connection. The
    # stream stays open afterwards: its end would be failed reads of its own, racing the assertions.
    url, script = mjpeg
    good = _jpegs(fixtures, "red_1.png", 1)[0]
    script.plans = [([good] * 5 + [good[: len(good) // 3] + b"\x00" * 64] + [good] * 50, True)]
    source = open_source(url, {"timeout": 5.0})
    assert isinstance(source, LiveSource)
    with source:
        _read(source)
        assert source.wait_for(lambda s: source.captured >= 40, WAIT), source.stats
        assert source.stats.restarts == 0 and script.connections == 1  # not a reason to reconnect


def test_an_undecodable_frame_is_counted_and_skipped(mjpeg: tuple[str, Script], fixtures: Path) -> None:
    # A frame whose start was lost is no JPEG any more: FFmpeg cannot conceal it and the grab fails at once.
    url, script = mjpeg
    good = _jpegs(fixtures, "red_1.png", 1)[0]
    script.plans = [([good] * 5 + [good[len(good) // 2:]] + [good] * 500, False)]
    source = open_source(url, {"timeout": 5.0})
    assert isinstance(source, LiveSource)
    with source:
        _read(source)
        assert source.wait_for(lambda s: s.errors >= 1 and source.captured >= 12, WAIT), source.stats
        assert not script.sent_all.is_set()  # counted mid-stream, not at the stream's end
        assert source.stats.restarts == 0 and script.connections == 1  # skipped, not a reason to reconnect


@pytest.mark.parametrize("uri", ["camera:57", "/dev/video57"])
def test_camera_that_cannot_be_opened_is_bad_input_on_the_command_line(fixtures: Path, uri: str) -> None:
    r = run_cli("infer", str(fixtures / "colors_int8.json"), uri)
    assert r.rc == 2 and len(r.err_lines) == 1, r.err
    assert r.err_lines[0].startswith(f"lepton-agent: {uri}: no such camera"), r.err
    assert "Traceback" not in r.err and r.out == ""


def test_missing_camera_is_retried_with_backoff_and_counted() -> None:
    source = open_source("camera:57", {"retry_open": True, "backoff_initial": 0.01, "backoff_max": 0.02})
    assert isinstance(source, LiveSource)
    with source:
        assert source.read(0.01) is None  # the loop goes on: no frame, no exception
        assert source.wait_for(lambda s: s.restarts >= 3, WAIT), source.stats
        assert not source.connected
    assert source.stop_event.is_set()


def test_unreachable_stream_is_bad_input_and_password_is_hidden() -> None:
    r = run_cli("infer", "tests/fixtures/colors_int8.json", "rtsp://user:secret@127.0.0.1:9/cam",
                "--frames", "1")
    assert r.rc == 2 and len(r.err_lines) == 1, r.err
    assert "cannot open stream" in r.err_lines[0] and "secret" not in r.err
    assert redact("rtsp://user:secret@host:554/x") == "rtsp://user:***@host:554/x"
    assert redact("http://host/x") == "http://host/x"


def test_csi_and_picamera2_say_what_is_missing(fixtures: Path) -> None:
    r = run_cli("infer", str(fixtures / "colors_int8.json"), "csi:0")
    assert r.rc == 2 and len(r.err_lines) == 1 and "GStreamer" in r.err_lines[0], r.err
    r = run_cli("infer", str(fixtures / "colors_int8.json"), "picamera2:0")
    assert r.rc == 2 and len(r.err_lines) == 1, r.err
    assert "picamera2 package is not installed" in r.err_lines[0]
    pipeline = libcamera_pipeline(1280, 720, 30)
    assert pipeline.startswith("libcamerasrc ! video/x-raw,width=1280,height=720,framerate=30000/1000 ! ")
    assert pipeline.endswith("format=BGR ! appsink drop=true max-buffers=1 sync=false")


def test_bad_source_options_name_the_field() -> None:
    with pytest.raises(BadInput, match=r"camera:0: source option fps"):
        open_source("camera:0", {"fps": -1})
    with pytest.raises(BadInput, match=r"source option zoom: Extra inputs"):
        open_source("camera:0", {"zoom": 2})
    with pytest.raises(BadInput, match="no source kind takes this input"):
        open_source("gopher://x")


# -- files and paced video --------------------------------------------------------------------


def test_video_file_gives_every_frame_with_media_time(fixtures: Path) -> None:
    with open_source(str(fixtures / "video" / "colors.avi")) as source:
        items = []
        while True:
            try:
                item = source.read(1.0)
            except EndOfStream:
                break
            assert item is not None
            items.append((item.index, item.t))
    assert [i for i, _ in items] == list(range(12))
    assert [t for _, t in items] == pytest.approx([k / 10 for k in range(12)], abs=1e-3)


def test_realtime_video_keeps_the_latest_frame_and_counts_drops(fixtures: Path) -> None:
    source = open_source(str(fixtures / "video" / "colors.avi"), {"realtime": True, "loop": True})
    assert isinstance(source, LiveSource)
    addresses = set()
    with source:
        first = _read(source)
        # Let five more frames come without reading: all but the newest are dropped.
        assert source.wait_for(lambda s: source.captured >= first.index + 6, WAIT)
        second = _read(source)
        assert second.index >= first.index + 5
        assert source.stats.dropped >= 4
        assert second.ts > first.ts and second.t > first.t  # capture times kept, media time runs on
        for _ in range(20):  # past the end of the 12-frame file: it loops
            item = _read(source)
            addresses.add(item.data.ctypes.data)
        assert item.index >= 20 and item.t > 1.2
    assert len(addresses) <= 4  # a small pool of frame buffers, not one per frame


def test_realtime_video_ends_when_not_looping(fixtures: Path) -> None:
    source = open_source(str(fixtures / "video" / "colors.avi"), {"realtime": True})
    assert isinstance(source, LiveSource)
    with source:
        with pytest.raises(EndOfStream):
            for _ in range(100):
                source.read(WAIT)
        assert source.captured == 12
        assert source.stats.items + source.stats.dropped == 12
    with source:  # a closed source opens again from the start
        assert _read(source).index == 0


def test_fps_cap_spaces_the_frames_handed_over(fixtures: Path) -> None:
    interval = 0.25
    source = open_source(str(fixtures / "video" / "colors.avi"),
                         {"realtime": True, "loop": True, "max_fps": 1 / interval})
    assert isinstance(source, LiveSource)
    with source:
        stamps = [_read(source).ts for _ in range(4)]
    for k, ts in enumerate(stamps):
        # Guaranteed by construction (up to half an interval of forgiven jitter), not a speed claim.
        assert ts - stamps[0] >= k * interval - interval / 2 - 1e-3


def test_folder_with_a_corrupt_image_reports_it_and_goes_on(fixtures: Path, tmp_path: Path) -> None:
    shutil.copy(fixtures / "images" / "red_1.png", tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    shutil.copy(fixtures / "images" / "blue_1.png", tmp_path / "c.png")
    with open_source(str(tmp_path)) as source:
        a = _read(source, 1.0)
        with pytest.raises(BadInput, match=r"b\.png: cannot decode image"):
            source.read(1.0)
        c = _read(source, 1.0)
        with pytest.raises(EndOfStream):
            source.read(1.0)
    assert (a.index, a.file, c.index, c.file) == (0, str(tmp_path / "a.png"), 2, str(tmp_path / "c.png"))
    assert source.stats.errors == 1 and source.stats.items == 2


def test_glob_of_images_and_a_video(fixtures: Path, tmp_path: Path) -> None:
    shutil.copy(fixtures / "images" / "green_1.png", tmp_path / "a.png")
    shutil.copy(fixtures / "video" / "colors.avi", tmp_path / "b.avi")
    pattern = str(tmp_path / "*")
    r = run_cli("infer", str(fixtures / "colors_int8.json"), pattern)
    assert r.rc == 0, r.err
    lines = [json.loads(line) for line in r.out.splitlines()]
    assert len(lines) == 13 and all(line["source"] == pattern for line in lines)
    assert lines[0]["file"] == str(tmp_path / "a.png") and lines[0]["classes"][0]["label"] == "green"
    assert [line["frame"] for line in lines[1:]] == list(range(12))
    assert {line["file"] for line in lines[1:]} == {str(tmp_path / "b.avi")}


@pytest.mark.parametrize(("shape", "ok"), [((1, 1, 3), True), ((3, 999, 3), True), ((40, 30), True),
                                           ((40, 30, 4), True)])
def test_odd_image_sizes_and_channels_still_give_a_line(fixtures: Path, tmp_path: Path, shape: tuple,
                                                        ok: bool) -> None:
    path = tmp_path / "odd.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    r = run_cli("infer", str(fixtures / "squares_yolov8_int8.json"), str(path))
    assert r.rc == 0, r.err
    (line,) = [json.loads(x) for x in r.out.splitlines()]
    assert line["task"] == "detect" and isinstance(line["detections"], list)


def test_bench_takes_a_stream(mjpeg: tuple[str, Script], fixtures: Path) -> None:
    url, script = mjpeg
    script.plans = [(_jpegs(fixtures, "green_1.png", 400), False)]
    r = run_cli("bench", str(fixtures / "colors_int8.json"), url, "--runs", "5", "--warmup", "1")
    assert r.rc == 0, r.err
    report = json.loads(r.out)
    assert report["items"] == 5 and report["pipeline_ms"]["p50"] > 0
