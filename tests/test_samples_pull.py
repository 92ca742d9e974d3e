"""The field data loop end to end, on a real mosquitto and a real `lepton-agent run`: BlazeFace on real
photos keeps the borderline frame, Hey Mycroft's model on real recordings keeps the near miss ("Alexa"),
the operator pulls both into a dataset folder over MQTT (the device deleting what was acknowledged), and
`model quantize --calib` / `model compare --eval` run on that folder."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import Broker, Watcher
from conftest import run_cli
from float_wakeword import float_wakeword
from test_capture import face_model
from test_daemon import Daemon
from wavs import RECORDINGS, pcm16, write_wav

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from face_photos import PHOTOS

FRAME = (512, 512)
"""The photos as frames of one video (a camera gives one size); at this size BlazeFace short range scores
astronaut 0.92, camera 0.73, chelsea (the cat) 0.41, coffee and rocket nothing."""
BAND = [0.35, 0.6]


def photo_video(path: Path) -> list[str]:
    """A lossless 5 fps video of the photos, each held for 2 frames; the names in order."""
    from agent.vision.cv import cv2

    names = ["astronaut", "camera", "coffee", "chelsea", "rocket"]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"FFV1"), 5, FRAME)
    assert writer.isOpened()
    for name in names:
        frame = cv2.resize(np.ascontiguousarray(PHOTOS[name]()[:, :, ::-1]), FRAME, interpolation=cv2.INTER_AREA)
        for _ in range(2):
            writer.write(frame)
    writer.release()
    return names


def near_miss_stream(path: Path) -> Path:
    def rec(word: str, n: str) -> np.ndarray:
        return pcm16(next(p for p in RECORDINGS if p.parent.name == word and p.stem == n))

    silence = np.zeros(16000, np.int16)
    stream = np.concatenate([rec("hey_jarvis", "1"), silence, rec("alexa", "3"), silence, rec("hey_jarvis", "2")])
    return write_wav(path, stream, 16000, 2)


def write_config(tmp: Path, port: int, models_dir: Path, device: str) -> Path:
    video = tmp / "photos.mkv"
    photo_video(video)
    wav = near_miss_stream(tmp / "stream.wav")
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
device_id = "{device}"
state_dir = "{tmp / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
keepalive_s = 5
[[pipelines]]
name = "faces"
source = "{video}"
model = "{face_model(tmp / 'model', models_dir)}"
threshold = 0.5
[pipelines.source_options]
realtime = true
[pipelines.capture]
enabled = true
band = {BAND}
[[pipelines]]
name = "wake"
source = "{wav}"
model = "{models_dir / 'wakeword' / 'hey_mycroft.json'}"
[pipelines.capture]
enabled = true
band = [0.5, 0.94]
""")
    return path


def fleet(port: int, *args: str, timeout: str = "20") -> tuple[int, list[dict[str, Any]], str]:
    r = run_cli(*args, "--broker", f"mqtt://127.0.0.1:{port}", "--format", "json", "--timeout", timeout,
                prog="fleet", timeout=300)
    return r.rc, [json.loads(line) for line in r.out.splitlines() if line.strip()], r.err


def _finished(status: list[dict[str, Any]]) -> bool:
    return bool(status) and all(p["state"] == "finished" for p in status[-1].get("pipelines", [])) \
        and len(status[-1].get("pipelines", [])) == 2


def test_capture_pull_calibrate_compare(tmp_path: Path, broker: Broker, models_dir: Path) -> None:
    config = write_config(tmp_path, broker.port, models_dir, "cap1")
    out = tmp_path / "dataset"
    with Watcher(broker.port, ["lepton/cap1/status"]) as w, Daemon(config):
        w.wait_json("/status", _finished, timeout=120)
        rc, (listed,), err = fleet(broker.port, "samples", "list", "cap1")
        assert rc == 0, err
        reasons = sorted((s["pipeline"], s["reason"]) for s in listed["samples"])
        assert ("faces", "band") in reasons and ("wake", "band") in reasons
        assert {p for p, _ in reasons} == {"faces", "wake"}

        rc, lines, err = fleet(broker.port, "samples", "pull", "cap1", "--out", str(out))
        assert rc == 0, err
        assert lines[0] == {"device": "cap1", "pulled": len(listed["samples"]), "deleted": len(listed["samples"]),
                            "resumed_chunks": 0}
        rc, (after,), _ = fleet(broker.port, "samples", "list", "cap1")
        assert after["samples"] == [] and after["total"] == 0  # acknowledged, so deleted on the device

        # Commands: a capture request is taken; hostile sample requests get error replies.
        rc, (reply,), _ = fleet(broker.port, "cmd", "cap1", "capture", '{"pipeline": "wake", "count": 3}')
        assert rc == 0 and reply["result"] == {"pipeline": "wake", "count": 3, "duration_s": None}
        for args, code in (('{"op": "delete", "ids": ["../../etc/passwd"]}', "bad_request"),
                           ('{"op": "list", "limit": 100000000}', "bad_request"),
                           ('{"op": "offer", "ids": []}', "bad_request")):
            rc, (reply,), _ = fleet(broker.port, "cmd", "cap1", "samples", args)
            assert rc == 1 and reply["error"]["code"] == code, reply
        rc, (reply,), _ = fleet(broker.port, "cmd", "cap1", "capture", '{"pipeline": "nope", "count": 1}')
        assert rc == 1 and reply["error"]["code"] == "not_found"

    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    faces = [x for x in labels if x["pipeline"] == "faces"]
    assert faces and all(x["kind"] == "image" and x["file"].startswith("images/") for x in faces)
    assert all(BAND[0] <= x["score"] <= BAND[1] for x in faces)
    for x in faces:  # the borderline frame only: the cat, as its sidecar's pre-labels say
        assert [d["label"] for d in x["detections"]] == ["face"] and (out / x["file"]).is_file()
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["images"]) == len(faces) and coco["images"][0]["width"] == FRAME[0]
    assert coco["categories"] == [{"id": 1, "name": "face"}] and len(coco["annotations"]) == len(faces)
    (clip,) = [x for x in labels if x["pipeline"] == "wake"]
    assert clip["kind"] == "audio" and clip["events"] == [] and 0.5 <= clip["score"] <= 0.94
    sidecar = json.loads((out / "samples" / f"{clip['id']}.json").read_text())
    assert sidecar["duration_s"] == pytest.approx(2.0, abs=0.05) and sidecar["pre_roll_s"] == 1.5
    assert len(pcm16(out / clip["file"])) == round(sidecar["duration_s"] * 16000)

    # The loop closed: the pulled folder calibrates the next int8 model and judges it.
    base = models_dir / "face" / "face_detection_short_range.tflite"
    variant = tmp_path / "face_int8.tflite"
    if importlib.util.find_spec("ai_edge_quantizer") is not None:
        r = run_cli("model", "quantize", str(base), "--calib", str(out), "-o", str(variant), "--format", "json",
                    prog="fleet", timeout=600)
        assert r.rc == 0, r.err
        assert json.loads(r.out)["calibration_items"] == len(faces)
    else:  # the tflite-runtime lane has no quantizer: compare judges a copy of the model on the folder
        shutil.copy(base, variant)
    r = run_cli("model", "compare", str(base), str(variant), "--eval", str(out), "--runs", "3", "--format", "json",
                prog="fleet", timeout=600)
    assert r.rc == 0, r.err
    report = json.loads(r.out)
    assert report["eval_items"] == len(faces)
    assert report["models"][1]["agreement"]["kind"] == "detect"
    by_reason = report["models"][1]["agreement_by_reason"]
    assert list(by_reason) == ["band"] and by_reason["band"]["items"] == len(faces)
    assert by_reason["band"]["kind"] == "detect"

    # Wake word models are judged on the pulled clips: the decision per clip, per capture reason.
    # With the quantizer, the pulled clip calibrates a float Hey Mycroft into the variant judged.
    wake = tmp_path / "wake"
    if importlib.util.find_spec("ai_edge_quantizer") is not None:
        r = run_cli("model", "quantize", str(float_wakeword(models_dir, wake)), "--calib", str(out), "-o",
                    str(wake / "hey_mycroft.tflite"), "--format", "json", prog="fleet", timeout=600)
        assert r.rc == 0, r.err
        assert json.loads(r.out)["calibration_items"] > 0 and json.loads(r.out)["float_ops"] == []
    else:
        wake.mkdir()
        for suffix in (".json", ".tflite"):
            shutil.copy(models_dir / "wakeword" / f"hey_mycroft{suffix}", wake / f"hey_mycroft{suffix}")
    r = run_cli("model", "compare", str(models_dir / "wakeword" / "hey_mycroft.json"), str(wake / "hey_mycroft.json"),
                "--eval", str(out), "--runs", "2", "--format", "json", prog="fleet", timeout=600)
    assert r.rc == 0, r.err
    report = json.loads(r.out)
    assert report["kind"] == "wakeword" and report["eval_items"] == 1
    variant = report["models"][1]
    assert variant["agreement"]["decision_agreement"] == 1.0 and variant["agreement"]["base_detections"] == 0
    assert variant["agreement_by_reason"]["band"]["items"] == 1
    r = run_cli("model", "compare", str(models_dir / "wakeword" / "hey_mycroft.json"), str(wake / "hey_mycroft.json"),
                "--eval", str(wake / "hey_mycroft.json"), prog="fleet")
    assert r.rc == 2 and "not a readable WAV" in r.err and len(r.err_lines) == 1


def test_pull_refuses_all_without_yes_and_bad_targets(broker: Broker, tmp_path: Path) -> None:
    rc, _, err = fleet(broker.port, "samples", "pull", "all", "--out", str(tmp_path / "d"))
    assert rc == 2 and "needs --yes" in err and err.count("\n") == 1
    rc, _, err = fleet(broker.port, "samples", "pull", "lepton/#", "--out", str(tmp_path / "d"))
    assert rc == 2 and "TARGET" in err
    rc, _, err = fleet(broker.port, "samples", "pull", "dev1")
    assert rc == 2 and "--out" in err
    (tmp_path / "file").write_text("")
    rc, _, err = fleet(broker.port, "samples", "pull", "dev1", "--out", str(tmp_path / "file"))
    assert rc == 2 and "not a folder" in err and err.count("\n") == 1
    rc, _, err = fleet(broker.port, "samples", "purge", "group:lab")
    assert rc == 2 and "one device" in err


def test_want_requests_are_served_only_for_offered_samples_and_bounded(tmp_path: Path) -> None:
    """The device answers a pull's `want` (brokers without shared retained messages): the manifest and the chunks
    asked for, not retained; nothing for a sample not on offer, a bad request or too many chunks; and no more bytes
    than its rate, however many requests come."""
    import hashlib

    from agent.mqtt.topics import segment
    from agent.samples.offer import CHUNK_BYTES, WANT_CHUNKS, WantServer
    from agent.samples.sample_store import SampleStore

    store = SampleStore(tmp_path / "samples", 1 << 24, reserve_bytes=0)
    data = np.random.default_rng(1).integers(0, 256, 3 * CHUNK_BYTES + 5, dtype=np.uint8).tobytes()
    sid, other = "1700000000000-faces-0", "1700000000000-faces-1"
    for s in (sid, other):
        assert store.add(s, ".jpg", data, {"id": s, "sha256": hashlib.sha256(data).hexdigest()})
    sent: list[tuple[str, bytes, bool]] = []
    server = WantServer(store, lambda t, b, r: sent.append((t, b, r)), "lepton/dev1", {sid: len(data)},
                        bytes_per_s=4 * CHUNK_BYTES)
    topic = f"lepton/dev1/samples/{segment(sid)}/want"
    server.on_want(topic, json.dumps({"manifest": True, "chunks": [3, 1, 1]}).encode())
    assert [t.split("/", 4)[-1] for t, _, _ in sent] == ["manifest", "chunk/3", "chunk/1"]
    assert not any(r for _, _, r in sent) and sent[2][1] == data[CHUNK_BYTES:2 * CHUNK_BYTES]
    manifest = json.loads(sent[0][1])
    assert manifest["id"] == sid and manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(manifest["chunks"]) == 4
    sent.clear()
    for bad_topic, body in (
            (f"lepton/dev1/samples/{segment(other)}/want", b'{"chunks": [0]}'),  # stored, not offered
            ("lepton/dev1/samples/..%2F..%2Fetc/want", b'{"chunks": [0]}'),  # not a sample at all
            (topic, b'{"chunks": [4]}'),  # past the end
            (topic, b'{"chunks": [true]}'),
            (topic, b'{"chunks": "0"}'),
            (topic, json.dumps({"chunks": [0] * (WANT_CHUNKS + 1)}).encode()),
            (topic, b"not json"),
            (topic, b"{" * 5000)):
        server.on_want(bad_topic, body)
    assert sent == [] and server.ignored == 8
    # A flood: the rate bounds what goes out (the 4 chunks' worth it starts with, 4 a second since), whatever the
    # machine's speed; the rest is counted as limited.
    import time

    started = time.monotonic()
    for _ in range(100):
        server.on_want(topic, b'{"chunks": [0, 1, 2]}')
    elapsed = time.monotonic() - started
    assert len(sent) <= 4 + 4 * elapsed + 1 and server.limited > 0, (len(sent), elapsed)
