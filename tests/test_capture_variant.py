"""The governor's cheaper variant disagreeing with the base as a capture reason, on a real `lepton-agent run`:
a hot SoC (a fake thermal zone) makes the governor swap BlazeFace full range for its short range variant,
the base is checked against it a few times a second, and only the frames they answer differently on are
kept, each sidecar holding both answers: the base's as the pre-labels (`results`), the variant's beside them
(`variant_results`). The operator's pull then pre-labels them with the base's answer, also when the sidecar
is in an older agent's shape (version 1: the variant's as `results`, the base's as `base_results`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from broker import Broker, Watcher, wait_until
from conftest import run_cli
from test_daemon import Daemon, fleet
from test_telemetry_daemon import _fake_root

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from face_photos import PHOTOS

from agent.samples.dataset import write_labels

FULL, SHORT = "face_detection_full_range.tflite", "face_detection_short_range.tflite"
FRAME = (512, 512)
PHOTO_ORDER = ["astronaut", "lfw_grid", "camera", "coffee"]
"""At 512x512 and threshold 0.5 both models find the one face of astronaut and camera and none on coffee; on the
LFW grid the full range model finds 4 faces, the short range one 5: the only frame they disagree on."""


def _models(folder: Path, models_dir: Path) -> Path:
    folder.mkdir()
    for name in (FULL, SHORT):
        shutil.copy(models_dir / "face" / name, folder / name)
    manifest = folder / "faces.json"
    manifest.write_text(json.dumps({"name": "faces", "version": 1, "task": "detect", "file": FULL, "labels": ["face"],
                                    "postprocess": {"threshold": 0.5},
                                    "variants": [{"file": SHORT, "cost_rank": 1}]}))
    return manifest


def _video(path: Path) -> None:
    from agent.vision.cv import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"FFV1"), 5, FRAME)
    assert writer.isOpened()
    for name in PHOTO_ORDER:
        frame = cv2.resize(np.ascontiguousarray(PHOTOS[name]()[:, :, ::-1]), FRAME, interpolation=cv2.INTER_AREA)
        for _ in range(2):
            writer.write(frame)
    writer.release()


def _status(port: int) -> dict[str, Any]:
    rc, replies = fleet(port, "cmd", "var1", "status")
    return replies[0]["result"] if rc == 0 and replies else {}


def _faces_capture(status: dict[str, Any]) -> dict[str, Any]:
    return status.get("capture", {}).get("pipelines", {}).get("faces", {})


def test_the_base_checks_the_variant_and_keeps_only_disagreements(tmp_path: Path, broker: Broker,
                                                                   models_dir: Path) -> None:
    root = _fake_root(tmp_path, 65.0)  # over the soft limit from the start: level 1, the variant
    video = tmp_path / "photos.mkv"
    _video(video)
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "var1"
state_dir = "{tmp_path / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{broker.port}"
keepalive_s = 5
[profile]
telemetry_interval_s = 1
thermal_soft_c = 60
thermal_hard_c = 90
cpu_budget_percent = 100
[telemetry]
root = "{root}"
[governor]
interval_s = 0.2
step_s = 0
max_level = 1
variant_level = 1
[[pipelines]]
name = "faces"
source = "{video}"
model = "{_models(tmp_path / 'model', models_dir)}"
threshold = 0.5
[pipelines.source_options]
realtime = true
loop = true
[pipelines.capture]
enabled = true
variant_checks_per_minute = 600
max_per_minute = 600
""")
    with Watcher(broker.port, ["lepton/var1/telemetry"]) as w, Daemon(config) as daemon:
        w.wait_json("/telemetry", lambda m: bool(m) and m[-1]["governor"]["pipelines"].get("faces", {})
                    .get("variant") == SHORT, timeout=120)
        # Two kept frames, and checks beyond them (the photos they agree on) so that "only those" can fail.
        assert wait_until(lambda: (c := _faces_capture(_status(broker.port))).get("reasons", {}).get("variant", 0)
                          >= 2 and c["variant_checks"] > c["variant_disagreed"], timeout=180, step=0.5)
        stored = tmp_path / "state" / "samples"
        assert wait_until(lambda: len(list(stored.glob("*.json"))) >= 2, timeout=60)  # the writer is behind the count
        device_sidecars = [json.loads(p.read_text()) for p in sorted(stored.glob("*.json"))]
        out = tmp_path / "dataset"
        r = run_cli("samples", "pull", "var1", "--out", str(out), "--broker", f"mqtt://127.0.0.1:{broker.port}",
                    "--format", "json", "--timeout", "20", prog="fleet", timeout=300)
        assert r.rc == 0, r.err
        assert daemon.terminate() == 0
    assert len(device_sidecars) >= 2
    for sidecar in device_sidecars:
        assert sidecar["reason"] == "variant" and sidecar["kind"] == "image" and sidecar["v"] == 2
        assert sidecar["model"] == {"name": "faces", "version": 1, "variant": SHORT}
        # The LFW grid and only it: the base's 4 faces are the pre-labels, the variant's 5 kept beside them.
        assert len(sidecar["results"][0]["detections"]) == 4, sidecar["results"]
        assert len(sidecar["variant_results"][0]["detections"]) == 5, sidecar["variant_results"]
        assert "base_results" not in sidecar
        assert [sidecar["width"], sidecar["height"]] == list(FRAME)

    labels = (out / "labels.jsonl").read_text()
    lines = [json.loads(line) for line in labels.splitlines()]
    assert len(lines) >= 2 and all(x["reason"] == "variant" for x in lines)
    assert all(len(x["detections"]) == 4 for x in lines), lines  # the base's answer, not the variant's 5
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["annotations"]) == 4 * len(coco["images"]) == 4 * len(lines)
    pulled = json.loads((out / "samples" / f"{lines[0]['id']}.json").read_text())
    assert len(pulled["variant_results"][0]["detections"]) == 5 and "base_results" not in pulled

    # A folder holding a version 1 sidecar (an older agent's, or an older pull's) is labelled the same way.
    old = {k: v for k, v in pulled.items() if k != "variant_results"}
    old |= {"v": 1, "results": pulled["variant_results"], "base_results": pulled["results"]}
    (out / "samples" / f"{lines[0]['id']}.json").write_text(json.dumps(old))
    write_labels(out)
    assert (out / "labels.jsonl").read_text() == labels
    assert json.loads((out / "coco.json").read_text()) == coco
