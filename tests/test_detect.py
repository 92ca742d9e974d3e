"""The detect task on real detectors: SSD (TFLite_Detection_PostProcess), YOLOv5, YOLOv8 and BlazeFace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli
from face_paths import assert_both_paths_agree

from agent.errors import BadInput
from agent.manifest import load_spec
from agent.runtime import Model
from agent.tasks import Inference, create_task, recognise
from agent.vision import decoders
from agent.vision.anchors import BLAZEFACE_ANCHORS, ssd_anchors
from agent.vision.decoders import match_decoder
from agent.vision.nms import (
    iou_one_to_many,
    nms,
    weighted_nms,
    weighted_nms_few,
)
from agent.vision.snapshot import snapshot_jpeg

SQUARES = ("squares_ssd_uint8", "squares_yolov5_int8", "squares_yolov8_int8", "squares_yolov8_float")
LABELS = ("red", "green", "blue")


def _truth(fixtures: Path) -> dict[str, list[dict]]:
    return json.loads((fixtures / "images" / "squares_truth.json").read_text())


def _assert_same(found: list[dict], expected: list[dict], min_iou: float = 0.7) -> None:
    assert len(found) == len(expected), (found, expected)
    for want in expected:
        ious = iou_one_to_many(np.array(want["box"]), np.array([d["box"] for d in found]).reshape(-1, 4))
        best = int(np.argmax(ious))
        assert ious[best] >= min_iou and found[best]["label"] == want["label"], (want, found)
    for d in found:
        assert 0.0 <= d["box"][0] < d["box"][2] <= 1.0 and 0.0 <= d["box"][1] < d["box"][3] <= 1.0
        assert 0.5 <= d["score"] <= 1.0


@pytest.mark.parametrize("name", SQUARES)
def test_every_output_layout_finds_the_squares(fixtures: Path, name: str) -> None:
    images = [fixtures / "images" / f"squares_{k}.png" for k in (1, 2)]
    r = run_cli("infer", str(fixtures / f"{name}.json"), *map(str, images))
    assert r.rc == 0, r.err
    lines = [json.loads(line) for line in r.out.splitlines()]
    truth = _truth(fixtures)
    for line, image in zip(lines, images, strict=True):
        assert line["task"] == "detect" and line["source"] == str(image)
        assert set(line["latency_ms"]) == {"pre", "invoke", "post"}
        _assert_same(line["detections"], truth[image.name])


def test_letterbox_boxes_come_back_in_the_original_frame(fixtures: Path) -> None:
    image = fixtures / "images" / "squares_wide.png"
    r = run_cli("infer", str(fixtures / "squares_yolov8_int8.json"), str(image))
    assert r.rc == 0, r.err
    (line,) = [json.loads(x) for x in r.out.splitlines()]
    _assert_same(line["detections"], _truth(fixtures)["squares_wide.png"])


@pytest.mark.parametrize(("name", "detail"), [("squares_ssd_uint8", "SSD with TFLite_Detection_PostProcess"),
                                              ("squares_yolov5_int8", "YOLOv5 raw output [1,144,8]"),
                                              ("squares_yolov8_float", "YOLOv8 raw output [1,7,144]")])
def test_bare_models_are_recognised_and_run(fixtures: Path, name: str, detail: str) -> None:
    path = fixtures / f"{name}.tflite"
    info = run_cli("inspect", str(path), "--format", "json")
    assert info.rc == 0, info.err
    described = json.loads(info.out)
    assert described["task"] == "detect" and detail in described["task_detail"]
    # No manifest: the family's default preprocessing, class indices as labels.
    image = fixtures / "images" / ("squares_wide.png" if "yolo" in name else "squares_1.png")
    r = run_cli("infer", str(path), str(image), "--threshold", "0.5")
    assert r.rc == 0, r.err
    (line,) = [json.loads(x) for x in r.out.splitlines()]
    expected = [{**d, "label": str(LABELS.index(d["label"]))} for d in _truth(fixtures)[image.name]]
    _assert_same(line["detections"], expected)


def test_region_of_interest_sees_only_its_part_and_reports_frame_coordinates(fixtures: Path,
                                                                            tmp_path: Path) -> None:
    truth = _truth(fixtures)["squares_wide.png"]
    roi = None
    for split in (0.5, 0.55, 0.6, 0.65, 0.7):
        for candidate in ([0.0, 0.0, split, 1.0], [1.0 - split, 0.0, 1.0, 1.0]):
            inside = [d for d in truth if d["box"][0] >= candidate[0] and d["box"][2] <= candidate[2]]
            outside = [d for d in truth if d["box"][2] <= candidate[0] or d["box"][0] >= candidate[2]]
            if inside and outside and len(inside) + len(outside) == len(truth):
                roi, expected = candidate, inside
                break
        if roi:
            break
    assert roi is not None, truth
    manifest = json.loads((fixtures / "squares_yolov8_int8.json").read_text())
    manifest["preprocess"]["roi"] = roi
    shutil.copy(fixtures / "squares_yolov8_int8.tflite", tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    r = run_cli("infer", str(tmp_path / "m.json"), str(fixtures / "images" / "squares_wide.png"))
    assert r.rc == 0, r.err
    (line,) = [json.loads(x) for x in r.out.splitlines()]
    _assert_same(line["detections"], expected, min_iou=0.6)


def test_threshold_option_and_table_output(fixtures: Path) -> None:
    image = str(fixtures / "images" / "squares_1.png")
    r = run_cli("infer", str(fixtures / "squares_yolov5_int8.json"), image, "--threshold", "1.0")
    assert r.rc == 0, r.err
    assert json.loads(r.out)["detections"] == []  # nothing found still gets its line
    t = run_cli("infer", str(fixtures / "squares_yolov5_int8.json"), image, "--format", "table")
    assert t.rc == 0 and any(label in t.out.splitlines()[1] for label in LABELS)


def test_model_matching_no_decoder_is_bad_input(fixtures: Path, tmp_path: Path) -> None:
    image = str(fixtures / "images" / "red_1.png")
    r = run_cli("infer", str(fixtures / "colors_int8.tflite"), image, "--task", "detect")
    assert r.rc == 2 and len(r.err_lines) == 1, r.err
    assert "colors_int8.tflite: outputs [1, 3] match no detection decoder" in r.err_lines[0]
    manifest = json.loads((fixtures / "squares_yolov5_int8.json").read_text())
    manifest["postprocess"]["decoder"] = "retinanet"
    shutil.copy(fixtures / "squares_yolov5_int8.tflite", tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    r = run_cli("infer", str(tmp_path / "m.json"), image)
    assert r.rc == 2 and len(r.err_lines) == 1, r.err
    assert "postprocess.decoder 'retinanet' is not a detection decoder" in r.err_lines[0]


def test_decoder_that_does_not_fit_the_outputs_is_bad_input(fixtures: Path) -> None:
    spec = load_spec(fixtures / "squares_yolov8_float.json")
    spec = spec.model_copy(update={"postprocess": spec.postprocess.model_copy(update={"decoder": "blazeface"})})
    model = Model(spec.path, threads=1)
    with pytest.raises(BadInput, match="decoder 'blazeface' needs"):
        create_task(model, spec)


def test_recognition_and_decoder_matching_agree(fixtures: Path, models_dir: Path) -> None:
    paths = [fixtures / f"{n}.tflite" for n in SQUARES] + [fixtures / "colors_int8.tflite"]
    paths += sorted((models_dir / "face").glob("face_detection_*.tflite"))
    for path in paths:
        model = Model(path, threads=1)
        recognised = recognise(model)
        assert (recognised.task == "detect") == (match_decoder(model) is not None), path
        assert recognised.runnable_as == recognised.task, path


def test_every_blazeface_variant_runs_as_detect(models_dir: Path) -> None:
    frame = cv2.cvtColor(np.ascontiguousarray(_astronaut()), cv2.COLOR_RGB2BGR)
    for path in sorted((models_dir / "face").glob("face_detection_*.tflite")):
        spec = load_spec(path)
        model = Model(spec.path, threads=1)
        result = Inference(model, create_task(model, spec)).run(frame)
        assert result["task"] == "detect" and len(result["detections"]) == 1, (path.name, result)
        x0, y0, x1, y1 = result["detections"][0]["box"]
        assert 0.3 < (x0 + x1) / 2 < 0.6 and 0.1 < (y0 + y1) / 2 < 0.4  # the astronaut's face


def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def test_mediapipe_anchor_layouts() -> None:
    short, full, back = (ssd_anchors(BLAZEFACE_ANCHORS[s]) for s in (128, 192, 256))
    assert short.shape == (896, 4) and full.shape == (2304, 4) and back.shape == (896, 4)
    # short range: 16x16 positions x 2 anchors, then 8x8 x 6; centres at cell middles, fixed size 1
    assert np.allclose(short[0], [0.5 / 16, 0.5 / 16, 1, 1]) and np.allclose(short[1], short[0])
    assert np.allclose(short[512], [0.5 / 8, 0.5 / 8, 1, 1]) and np.allclose(short[517], short[512])
    assert np.allclose(full[2303], [47.5 / 48, 47.5 / 48, 1, 1])


def test_nms_per_class_and_weighted() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    assert nms(boxes, scores, 0.5, 10).tolist() == [0, 3]
    classes = np.array([0, 0, 1, 0])
    assert nms(boxes, scores, 0.5, 10, classes).tolist() == [0, 2, 3]  # another class is not suppressed
    assert nms(boxes, scores, 0.5, 1).tolist() == [0]
    merged, kept = weighted_nms(boxes[:2], scores[:2], 0.3, 10)
    assert kept.tolist() == pytest.approx([0.9])
    assert merged[0] == pytest.approx((boxes[0] * 0.9 + boxes[1] * 0.8) / 1.7)
    empty = nms(np.empty((0, 4), np.float32), np.empty(0, np.float32), 0.5, 10)
    assert empty.size == 0


def _weighted_nms_in_order(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[np.ndarray, list]:
    """MediaPipe's WeightedNonMaxSuppression, loop for loop: float32 sums of one candidate after the other."""
    f32 = np.float32
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    merged, kept = [], []
    while order:
        best = order[0]
        ious = iou_one_to_many(boxes[best], boxes)
        group = [j for j in order if ious[j] > threshold] or [best]
        order = [j for j in order[1:] if not ious[j] > threshold]
        total, acc = f32(0), np.zeros(4, f32)
        for j in group:
            total = f32(total + scores[j])
            acc = (acc + boxes[j] * scores[j]).astype(f32)
        merged.append(acc / total)
        kept.append(scores[best])
    return np.array(merged, f32), kept


def test_a_gated_detector_builds_its_result_only_when_wanted(models_dir: Path) -> None:
    # The pipeline's policy is asked (Runner.gate) with the labels and scores the result would carry; on no,
    # process() returns nothing, on yes the very result run() gives.
    spec = load_spec(models_dir / "face" / "face_detection_full_range.tflite")
    model = Model(spec.path, threads=1)
    inference = Inference(model, create_task(model, spec))
    from skimage import data

    frames = [cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), np.full((480, 640, 3), 90, np.uint8)]
    asked: list[tuple[list[str], list[float]]] = []
    answer = False

    def gate(labels: list[str], scores: list[float]) -> bool:
        asked.append((labels, scores))
        return answer

    inference.gate = gate
    for frame in frames:
        full = inference.run(frame)
        assert inference.process(frame) == []
        assert asked[-1] == ([d["label"] for d in full["detections"]], [d["score"] for d in full["detections"]])
        answer = True
        assert inference.process(frame) == [full]
        answer = False
    assert len(asked) == 4 and asked[0][0] == ["face"] and asked[2] == ([], [])


def _clustered_boxes(rng: np.random.Generator, n: int, clusters: int, gap: float,
                     size: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """n float32 boxes around `clusters` spots `gap` apart (faces seen by several anchors), sides size[0] plus
    up to size[1], and their scores."""
    centres = rng.random((n, 2), dtype=np.float32) * 0.1 + rng.integers(0, clusters, (n, 1)).astype(np.float32) * gap
    sizes = rng.random((n, 2), dtype=np.float32) * size[1] + size[0]
    return np.concatenate((centres, centres + sizes), axis=1), rng.random(n, dtype=np.float32)


def test_weighted_nms_sums_each_group_in_order() -> None:
    # Groups of up to 20 boxes (a face seen by many anchors) and several groups at once (shorter ones padded):
    # the weights are summed one after the other as MediaPipe does, not pairwise as numpy sums a 1-D array
    # (which differs in the last bit for 8 or more terms).
    rng = np.random.default_rng(7)
    for _ in range(200):
        boxes, scores = _clustered_boxes(rng, int(rng.integers(8, 25)), clusters=3, gap=0.4, size=(0.2, 0.05))
        want_boxes, want_scores = _weighted_nms_in_order(boxes, scores, 0.3)
        merged, kept = weighted_nms(boxes, scores, 0.3, 100)
        assert merged.dtype == np.float32 and np.array_equal(merged, want_boxes)
        assert kept.tolist() == want_scores
    assert weighted_nms(boxes, scores, 0.3, 1)[0].shape == (1, 4)


def test_weighted_nms_in_python_floats_matches_the_array_path() -> None:
    # `weighted_nms_few` (a few candidates, plain Python) against `weighted_nms` (float32 arrays, MediaPipe's
    # order of sums): the same groups, so the same count and kept scores, and the same boxes to float32's
    # precision; including equal scores (the stable order decides), a degenerate box and the max_results cut.
    rng = np.random.default_rng(11)
    for trial in range(300):
        n = int(rng.integers(1, 33))
        boxes, scores = _clustered_boxes(rng, n, clusters=4, gap=0.3, size=(0.15, 0.1))
        if trial % 5 == 0 and n > 2:
            scores[1] = scores[0]
            boxes[2, 2:] = boxes[2, :2]  # no width or height
        limit = 100 if trial % 3 else 2
        want_boxes, want_scores = weighted_nms(boxes, scores, 0.3, limit)
        got_boxes, got_scores = weighted_nms_few([tuple(b) for b in boxes.tolist()], scores.tolist(), 0.3, limit)
        assert got_scores == want_scores.tolist(), trial
        assert np.allclose(np.array(got_boxes).reshape(-1, 4), want_boxes, rtol=0, atol=1e-6), trial


@pytest.mark.parametrize("model_file", ["face_detection_short_range.tflite", "face_detection_full_range.tflite"])
def test_blazeface_gives_the_same_result_in_python_floats_as_in_arrays(models_dir: Path, model_file: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A frame with a few candidates is decoded in Python floats (Detections.few), one with more in arrays: on
    # real photos, from one face to the LFW grid's many, both paths give the same result.
    import face_photos

    spec = load_spec(models_dir / "face" / model_file)
    model = Model(spec.path, threads=1)
    inference = Inference(model, create_task(model, spec))
    frames = [np.ascontiguousarray(load()[:, :, ::-1]) for load in face_photos.PHOTOS.values()]
    assert assert_both_paths_agree(inference, frames, monkeypatch) >= 4  # coffee, rocket: no candidate at all


@pytest.mark.parametrize("few", [10_000, 0])
def test_a_nan_box_comes_out_inside_the_frame(models_dir: Path, few: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # A broken model's NaN regressors: the result is still built (no int(NaN) error) and every corner is a number
    # in 0..1, on the Python path and on the array path alike.
    monkeypatch.setattr(decoders, "FEW", few)
    spec = load_spec(models_dir / "face" / "face_detection_short_range.tflite")
    model = Model(spec.path, threads=1)
    inference = Inference(model, create_task(model, spec))
    import face_photos

    assert len(inference.run(np.ascontiguousarray(face_photos.PHOTOS["astronaut"]()[:, :, ::-1]))["detections"]) == 1
    model.output(inference.task.decoder._reg)[..., 0] = np.nan  # type: ignore[attr-defined]  # every box's x
    found = inference.task.postprocess()["detections"]
    assert found and all(0.0 <= v <= 1.0 for d in found for v in d["box"]), found  # NaN boxes overlap nothing


def _decode(jpeg: bytes, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), flags)
    assert picture is not None
    return picture


def test_snapshot_draws_boxes_and_fits_the_budget(fixtures: Path) -> None:
    frame = cv2.imread(str(fixtures / "images" / "squares_wide.png"))
    assert frame is not None
    detections = [{"label": d["label"], "score": 0.9, "box": d["box"]} for d in _truth(fixtures)["squares_wide.png"]]
    big = snapshot_jpeg(frame, detections, 1_000_000)
    picture = _decode(big)
    assert picture.shape == frame.shape
    x0, y0 = (int(v * (s - 1)) for v, s in zip(detections[0]["box"][:2], (640, 480), strict=True))
    assert np.abs(picture[y0 + 5, x0].astype(int) - frame[y0 + 5, x0].astype(int)).sum() > 60  # the box edge
    assert np.array_equal(frame, _decode((fixtures / "images" / "squares_wide.png").read_bytes()))  # untouched
    small = snapshot_jpeg(frame, detections, 6000)
    assert len(small) <= 6000
    assert _decode(small).shape[0] >= 32
    with pytest.raises(ValueError, match="does not fit in 200 bytes"):
        snapshot_jpeg(frame, detections, 200)
    with pytest.raises(ValueError, match="not an 8-bit image"):
        snapshot_jpeg(frame.astype(np.float32), detections, 10_000)
    gray = snapshot_jpeg(frame[:, :, 0], [], 100_000)
    assert _decode(gray, cv2.IMREAD_UNCHANGED).shape == (480, 640, 3)
