"""IP cameras as they behave in the field: a real RTSP server (GStreamer's gst-rtsp-server, tests/rtsp_server.py)
serving H.264 of real photos on a free loopback port, behind Basic auth.

- infer finds the astronaut's face where it is, with the password from a file, over TCP and UDP;
  a wrong password is named as such (exit 2); `--frames` ends (exit 1) when the camera dies.
- the daemon: the camera is down at start (status says so, the pipeline waits instead of failing),
  comes up (faces found), goes away for 8 s (telemetry shows the outage while it lasts, fps 0),
  comes back (results again); the password is in no byte published on the broker (all topics)
  and in nothing the agent prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import Broker, Watcher, free_port
from conftest import ROOT, run_cli
from rtsp_camera import RtspCamera, face_box, server_available
from test_daemon import Daemon, fleet
from test_homeassistant import home_assistant

from agent.sources.capture import LiveSource, redact
from agent.sources.network import ffmpeg_options, with_credentials
from agent.sources.source import open_source
from agent.vision.nms import iou_one_to_many

USER, PASSWORD = "admin", "Gr33n-Fr0g!sec"
FACE = face_box()
OUTAGE_S = 8.0
"""Long enough for several reopen attempts (0.5 s apart at first) and telemetry seconds frozen at fps 0."""


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    problem = server_available()
    if problem is not None:
        pytest.fail(problem)
    return tmp_path_factory.mktemp("rtsp")


@pytest.fixture(scope="module")
def camera(clip_dir: Path) -> Iterator[RtspCamera]:
    with RtspCamera(clip_dir, free_port(), USER, PASSWORD) as cam:
        yield cam


@pytest.fixture
def short_range(models_dir: Path) -> Path:
    return models_dir / "face" / "face_detection_short_range.tflite"


def faces(detections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in detections if d["label"] == "face"]


def assert_right_faces(lines: list[dict[str, Any]]) -> None:
    """Every face found is the astronaut's (IoU >= 0.5 with where the photo puts it), and it is found."""
    found = [d for line in lines for d in faces(line["detections"])]
    assert found, "no face found in the stream"
    for d in found:
        assert iou_one_to_many(np.array(d["box"]), np.array([FACE]))[0] >= 0.5, d
    # One face per frame at most: the coffee cup has none, the astronaut one.
    assert all(len(faces(line["detections"])) <= 1 for line in lines)


def assert_no_secret(*texts: str | bytes) -> None:
    for text in texts:
        raw = text.encode() if isinstance(text, str) else text
        assert PASSWORD.encode() not in raw


@pytest.mark.parametrize(("uri", "shown"), [
    ("rtsp://user:secret@host:554/x", "rtsp://user:***@host:554/x"),
    ("rtsp://u:se@cr/et:x@10.0.0.1/cam", "rtsp://u:***@10.0.0.1/cam"),  # unescaped @ / : in the password
    ("rtsp://u:secret@host:notaport/", "rtsp://u:***@host:notaport/"),
    ("rtsp://u:se%40cret@h/x", "rtsp://u:***@h/x"),
    ("http://cam/video.cgi?user=admin&pwd=secret&res=1", "http://cam/video.cgi?user=admin&pwd=***&res=1"),
    ("rtsp://admin@host/cam", "rtsp://admin@host/cam"),
    ("rtsp://host/a:b@c", "rtsp://host/a:b@c"),
    ("camera:0", "camera:0"),
])
def test_redact(uri: str, shown: str) -> None:
    assert redact(uri) == shown


def test_credentials_and_transport_reach_ffmpeg_only() -> None:
    assert with_credentials("rtsp://host:8554/cam", "ad min", "p@ss:w/rd") == \
        "rtsp://ad%20min:p%40ss%3Aw%2Frd@host:8554/cam"
    assert with_credentials("rtsp://admin@host/cam", None, "pw") == "rtsp://admin:pw@host/cam"
    assert with_credentials("rtsp://host/cam", None, None) == "rtsp://host/cam"
    assert ffmpeg_options(None, "udp") == "rtsp_transport;udp"
    assert ffmpeg_options("stimeout;5000000|rtsp_transport;tcp", "udp") == "stimeout;5000000|rtsp_transport;udp"


def test_probes_grow_with_the_outage_not_with_the_attempts() -> None:
    # A camera back after a short outage is found at once; one that stays away is probed rarely.
    source = open_source("rtsp://127.0.0.1:9/cam", {"backoff_initial": 0.5, "backoff_max": 30})
    assert isinstance(source, LiveSource)
    now = time.monotonic()
    delays = []
    for outage in (0.0, 5.0, 20.0, 60.0, 600.0, 3600.0):
        source._down_since = now - outage
        delays.append(source._probe_delay())
    assert delays[0] == 0.5 and delays[-1] == 30.0 and delays == sorted(delays)
    assert delays[2] == pytest.approx(1.0, abs=0.05)  # 5 % of a 20 s outage


def test_infer_finds_the_face_with_the_password_from_a_file(tmp_path: Path, camera: RtspCamera,
                                                             short_range: Path) -> None:
    secret = tmp_path / "camera-password"
    secret.write_text(PASSWORD + "\n")
    # 30 frames read in order span at least 2 s of the 15 fps clip: the astronaut's second and the cup's.
    r = run_cli("infer", str(short_range), camera.url(), "--frames", "30", "--username", USER,
                "--password-file", str(secret))
    assert r.rc == 0, r.err
    lines = [json.loads(x) for x in r.out.splitlines()]
    assert len(lines) == 30
    assert {line["source"] for line in lines} == {f"rtsp://{USER}@127.0.0.1:{camera.port}/cam"}
    assert_right_faces(lines)
    assert any(not faces(line["detections"]) for line in lines)  # the cup's frames: no face
    assert_no_secret(r.out, r.err)


def test_the_password_in_the_url_is_shown_nowhere(camera: RtspCamera, short_range: Path) -> None:
    r = run_cli("infer", str(short_range), camera.url(USER, PASSWORD), "--frames", "3", "--format", "table")
    assert r.rc == 0, r.err
    assert f"{USER}:***@" in r.out
    assert_no_secret(r.out, r.err)


def test_a_wrong_password_is_named(camera: RtspCamera, short_range: Path) -> None:
    r = run_cli("infer", str(short_range), camera.url(USER, "not-it"), "--frames", "3")
    assert r.rc == 2 and r.out == ""
    assert r.err_lines == [f"lepton-agent: rtsp://{USER}:***@127.0.0.1:{camera.port}/cam: cannot open stream: "
                           "authorisation failed: wrong user name or password (401)"]
    assert "not-it" not in r.err
    r = run_cli("infer", str(short_range), camera.url(), "--frames", "3")
    assert r.rc == 2 and "asks for a user name and password (401)" in r.err
    r = run_cli("infer", str(short_range), camera.url(USER, PASSWORD).replace("/cam", "/nope"), "--frames", "3")
    assert r.rc == 2 and "no such stream on 127.0.0.1" in r.err and PASSWORD not in r.err


def test_a_wrong_password_in_the_daemon_is_failed_not_reconnecting(camera: RtspCamera) -> None:
    # The daemon keeps retrying (the camera's password may be changed back), but says why it cannot stream.
    source = open_source(camera.url(USER, "not-it"), {"retry_open": True, "backoff_initial": 0.1})
    assert isinstance(source, LiveSource)
    source.open()
    try:
        assert source.wait_for(lambda st: st.restarts >= 2, timeout=30)
        status = source.status()
    finally:
        source.close()
    assert status["state"] == "failed" and status["reopens"] >= 2
    assert status["last_error"] == "cannot open: cannot open stream: authorisation failed: wrong user name or " \
                                   "password (401)"


@pytest.mark.parametrize(("args", "env", "error"), [
    (["--username", USER, "--password-file", "/nonexistent/pw"], {},
     "source option password_file: /nonexistent/pw: cannot read (No such file or directory)"),
    (["--username", USER, "--password-env", "CAM_PW"], {}, "source option password_env: CAM_PW is not set"),
    (["--password-env", "CAM_PW"], {"CAM_PW": PASSWORD},
     "rtsp://127.0.0.1:9/cam: a password needs a user name (user@ in the URI, or the username option)"),
    (["--username", "other"], {}, "rtsp://admin:***@127.0.0.1:9/cam: the user name is both in the URI and the "
                                  "username option"),
    (["--timeout", "0"], {}, "rtsp://127.0.0.1:9/cam: source option timeout: Input should be greater than 0"),
])
def test_bad_stream_options(short_range: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                            env: dict[str, str], error: str) -> None:
    monkeypatch.delenv("CAM_PW", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    url = f"rtsp://{USER}:{PASSWORD}@127.0.0.1:9/cam" if "--username" in args and "other" in args \
        else "rtsp://127.0.0.1:9/cam"
    r = run_cli("infer", str(short_range), url, "--frames", "1", *args)
    assert r.rc == 2 and r.out == ""
    assert r.err_lines[-1].endswith(error), r.err
    assert "Traceback" not in r.err and PASSWORD not in r.err


def test_bad_stream_config(tmp_path: Path, broker: Broker, short_range: Path) -> None:
    config = _write_config(tmp_path, broker.port, f"http://{USER}:{PASSWORD}@127.0.0.1:9/cam", short_range)
    r = run_cli("check-config", "--config", str(config))
    assert r.rc == 0 and PASSWORD not in r.out and f"http://{USER}:***@127.0.0.1:9/cam" in r.out
    config.write_text(config.read_text().replace("timeout = 2", 'timeout = 2\ntransport = "udp"'))
    r = run_cli("check-config", "--config", str(config))
    assert r.rc == 2 and r.err_lines == [
        f"lepton-agent: {config}: pipelines[0] (door): http://{USER}:***@127.0.0.1:9/cam: source option transport "
        "applies to rtsp:// streams only"]
    config.write_text(config.read_text().replace('"udp"', '"quic"'))
    r = run_cli("check-config", "--config", str(config))
    assert r.rc == 2 and len(r.err_lines) == 1 and "source option transport: Input should be 'tcp' or 'udp'" in r.err
    assert PASSWORD not in r.err


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_transport(clip_dir: Path, short_range: Path, transport: str) -> None:
    # The server offers this transport only: the one asked for must be the one used.
    other = "tcp" if transport == "udp" else "udp"
    with RtspCamera(clip_dir, free_port(), transport=transport) as cam:
        r = run_cli("infer", str(short_range), cam.url(), "--frames", "20", "--transport", transport)
        assert r.rc == 0, r.err
        assert_right_faces([json.loads(x) for x in r.out.splitlines()])
        r = run_cli("infer", str(short_range), cam.url(), "--frames", "3", "--transport", other, "--timeout", "3")
        assert r.rc == 2 and "cannot open stream" in r.err


def test_infer_frames_ends_when_the_camera_dies(clip_dir: Path, short_range: Path) -> None:
    with RtspCamera(clip_dir, free_port()) as cam:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "infer", str(short_range), cam.url(), "--frames",
                                 "100000", "--timeout", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # a frame came: the stream is up
        assert json.loads(first)["frame"] >= 0
        cam.stop()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == f"lepton-agent: rtsp://127.0.0.1:{cam.port}/cam: no frame for 3 s"


def _write_config(tmp: Path, port: int, url: str, model: Path) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
device_id = "d-rtsp"
state_dir = "{tmp / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
[profile]
telemetry_interval_s = 1
[homeassistant]
enabled = true
[prometheus]
enabled = true
port = {free_port()}
[[pipelines]]
name = "door"
source = "{url}"
model = "{model}"
threshold = 0.5
fps = 3
[pipelines.source_options]
timeout = 2
[pipelines.policy]
on_change = false
max_rate = 100
""")
    return path


def _scrape(config: Path) -> dict[str, float]:
    """The Prometheus endpoint's samples for pipeline `door`."""
    from prometheus_client.parser import text_string_to_metric_families

    port = next(line.split("=")[1].strip() for line in config.read_text().splitlines() if line.startswith("port"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.labels.get("pipeline") == "door"}


def _source(telemetry: dict[str, Any]) -> dict[str, Any]:
    src: dict[str, Any] = telemetry["pipelines"]["door"]["source"] or {}
    return src


def test_daemon_camera_down_at_start_outage_and_return(tmp_path: Path, clip_dir: Path, broker: Broker,
                                                       short_range: Path) -> None:
    cam = RtspCamera(clip_dir, free_port(), USER, PASSWORD)  # down when the agent starts
    # The worst case for leaks: the password in the URL of the config.
    config = _write_config(tmp_path, broker.port, cam.url(USER, PASSWORD), short_range)
    try:
        with Watcher(broker.port, ["#"]) as w, Daemon(config) as daemon:
            down = w.wait_json("d-rtsp/telemetry", lambda m: any(_source(t).get("reopens", 0) >= 2 for t in m),
                               timeout=60)[-1]
            assert down["pipelines"]["door"]["state"] == "running"  # waiting for its camera, not failed
            assert _source(down)["state"] == "connecting" and down["pipelines"]["door"]["fps"] == 0
            assert "connection refused" in _source(down)["last_error"]

            cam.start()
            up = time.time()
            results = w.wait_json("/results/door", lambda m: any(faces(r["detections"]) for r in m), timeout=60)
            print(f"\nfirst face {results[-1]['ts'] - up:.2f} s after the camera came up")
            assert_right_faces(results)
            rc, (status,) = fleet(broker.port, "cmd", "d-rtsp", "status")
            assert rc == 0
            assert status["result"]["pipeline_stats"]["door"]["source"]["state"] == "connected"
            assert status["result"]["pipelines"][0]["source"] == f"rtsp://{USER}:***@127.0.0.1:{cam.port}/cam"
            # The loop's fps (3) reaches the capture thread: of the camera's 15 fps, most are never converted.
            src = status["result"]["pipeline_stats"]["door"]["source"]
            assert 0 < src["decoded"] < src["grabbed"]

            gone = time.time()  # taken before: the agent may notice while the server is still exiting
            cam.stop()

            def outage(m: list[dict[str, Any]]) -> bool:
                return any(_source(t)["state"] == "reconnecting" and t["ts"] - gone >= OUTAGE_S for t in m
                           if t["ts"] > gone)

            during = [t for t in w.wait_json("d-rtsp/telemetry", outage, timeout=OUTAGE_S + 30) if t["ts"] > gone]
            late = during[-1]
            metrics = _scrape(config)
            assert metrics["lepton_source_connected"] == 0 and metrics["lepton_source_reopens_total"] >= 2
            assert late["pipelines"]["door"]["fps"] == 0 and late["pipelines"]["door"]["state"] == "running"
            assert _source(late)["reopens"] >= 2 and _source(late)["since"] >= gone
            frames_during = {t["pipelines"]["door"]["frames"] for t in during[-3:]}
            assert len(frames_during) == 1  # frozen: nothing processed while the camera is gone

            cam.start()
            back = time.time()
            seen = len(w.json("/results/door"))
            again = w.wait_json("/results/door", lambda m: len(m) > seen and m[-1]["ts"] > back, timeout=60)
            print(f"results again {again[-1]['ts'] - back:.2f} s after the camera came back "
                  f"(outage {back - gone:.1f} s)")
            assert_right_faces(again[seen:])
            after = w.wait_json("d-rtsp/telemetry", lambda m: _source(m[-1])["state"] == "connected", timeout=30)
            assert _source(after[-1])["reopens"] >= _source(late)["reopens"]
            assert _scrape(config)["lepton_source_connected"] == 1
            assert daemon.terminate() == 0
            published = list(w.messages)
    finally:
        cam.stop()
    # Home Assistant (2024.3.3 itself: tests/ha_check.py) takes the camera's config and renders its state.
    topic = "homeassistant/sensor/lepton_d-rtsp/door_camera/config"
    (camera,) = [json.loads(p) for t, p, _ in published if t == topic]
    assert camera["state_topic"] == "lepton/d-rtsp/telemetry" and camera["name"] == "door camera"
    outage_payload = next(p for t, p, _ in published if t == "lepton/d-rtsp/telemetry"
                          and json.loads(p)["ts"] == late["ts"])
    verdict = home_assistant({topic: json.dumps(camera)}, {camera["state_topic"]: outage_payload.decode()})
    assert verdict["configs"][topic] == {"error": None, "dropped": [], "value": "reconnecting",
                                         "availability": [["online", "offline", "offline", "offline"]]}
    assert any(t.endswith("/status") for t, _, _ in published)
    for topic, payload, _ in published:
        assert_no_secret(topic, payload)
    assert_no_secret(daemon.log.read_bytes())
    assert b"***@127.0.0.1" in daemon.log.read_bytes()  # the logs name the camera, redacted
