"""Preprocessing writes exactly what a plain reference computation would, straight into the input view."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.errors import BadInput
from agent.manifest import Preprocess
from agent.runtime import Model
from agent.vision.preprocess import ImagePreprocessor


def _frame(h: int = 480, w: int = 640, channels: int = 3, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def test_int8_quantization_normalize(fixtures: Path) -> None:
    model = Model(fixtures / "colors_int8.tflite", threads=1)
    pre = ImagePreprocessor(model, Preprocess(color="RGB", normalize="quantization"))
    frame = _frame()
    pre(frame)
    h, w = model.inputs[0].shape[1:3]
    ref = cv2.cvtColor(cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(model.input()[0], (ref.astype(np.int16) - 128).astype(np.int8))


def test_float_mean_std(fixtures: Path) -> None:
    model = Model(fixtures / "colors_float.tflite", threads=1)
    pre = ImagePreprocessor(model, Preprocess(color="RGB", mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0)))
    frame = _frame(seed=2)
    pre(frame)
    h, w = model.inputs[0].shape[1:3]
    pixels = cv2.cvtColor(cv2.resize(frame, (w, h)), cv2.COLOR_BGR2RGB).astype(np.float32)
    ref = (pixels - np.array([10, 20, 30], np.float32)) / np.array([2, 4, 8], np.float32)
    assert np.allclose(model.input()[0], ref, atol=1e-5)


def test_int8_mean_std_is_quantized_with_the_input_scale(fixtures: Path) -> None:
    model = Model(fixtures / "colors_int8.tflite", threads=1)
    info = model.inputs[0]
    pre = ImagePreprocessor(model, Preprocess(color="BGR", mean=(0.0,), std=(1.0,)))
    frame = _frame(seed=3)
    pre(frame)
    h, w = info.shape[1:3]
    ref = cv2.resize(frame, (w, h)).astype(np.float64)
    q = np.clip(np.rint(ref / info.scale + info.zero_point), -128, 127).astype(np.int8)
    assert np.array_equal(model.input()[0], q)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_gray_model_takes_any_frame(fixtures: Path, channels: int) -> None:
    model = Model(fixtures / "shapes_int8.tflite", threads=1)
    pre = ImagePreprocessor(model, Preprocess(color="GRAY", normalize="quantization"))
    frame = _frame(channels=channels, seed=4)
    pre(frame)
    h, w = model.inputs[0].shape[1:3]
    small = cv2.resize(frame, (w, h))
    if channels == 3:
        small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    elif channels == 4:
        small = cv2.cvtColor(small, cv2.COLOR_BGRA2GRAY)
    assert np.array_equal(model.input()[0, :, :, 0], (small.astype(np.int16) - 128).astype(np.int8))


def test_frame_size_changes_are_followed(fixtures: Path) -> None:
    model = Model(fixtures / "colors_int8.tflite", threads=1)
    pre = ImagePreprocessor(model, Preprocess(color="RGB"))
    for h, w in [(480, 640), (31, 17), (1080, 1920), (480, 640)]:
        frame = _frame(h, w, seed=h)
        pre(frame)
        ref = cv2.cvtColor(cv2.resize(frame, (32, 32)), cv2.COLOR_BGR2RGB)
        assert np.array_equal(model.input()[0], (ref.astype(np.int16) - 128).astype(np.int8))


def test_letterbox_pads_and_maps_boxes_back(fixtures: Path) -> None:
    model = Model(fixtures / "colors_int8.tflite", threads=1)
    pre = ImagePreprocessor(model, Preprocess(color="BGR", resize="letterbox"), pad_value=0)
    frame = np.full((100, 200, 3), 255, np.uint8)  # 2:1 → 32x16 content, 8 rows of padding above and below
    pre(frame)
    x = model.input()[0].astype(np.int16) + 128
    assert (x[:8] == 0).all() and (x[-8:] == 0).all() and (x[8:24] == 255).all()
    boxes = np.array([[0.0, 0.25, 1.0, 0.75]], np.float32)  # the content area in tensor coordinates
    assert np.allclose(pre.map_boxes(boxes), [[0.0, 0.0, 1.0, 1.0]])


def test_odd_frames_are_refused() -> None:
    model = Model(Path(__file__).parent / "fixtures" / "colors_int8.tflite", threads=1)
    pre = ImagePreprocessor(model, Preprocess())
    with pytest.raises(BadInput, match="2 channels"):
        pre(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(BadInput, match="not an 8-bit image"):
        pre(np.zeros((10, 10, 3), np.float32))


def test_quantization_normalize_on_a_float_input_is_bad_input(fixtures: Path) -> None:
    model = Model(fixtures / "colors_float.tflite", threads=1)
    with pytest.raises(BadInput, match="'quantization' needs a uint8 or int8 input"):
        ImagePreprocessor(model, Preprocess(normalize="quantization"))


def test_benchmarks_time_the_resize_apart_and_the_cli_report_keeps_its_keys(fixtures: Path) -> None:
    # The resize of a 640x480 frame is a cost of the frame size: bench_core/bench_vision report it on its
    # own line (fixed_costs); `lepton-agent bench --format json` keeps exactly its documented keys.
    from agent.bench import bench
    from agent.manifest import load_spec
    from agent.tasks import Inference, create_task
    from agent.tasks.classify import Classify

    spec = load_spec(fixtures / "colors_int8.json")
    model = Model(spec.path, threads=1)
    inference = Inference(model, create_task(model, spec))
    frame = _frame()
    plain = bench(inference, [frame], runs=5, warmup=1)
    assert set(plain) == {"model", "backend", "threads", "invoke_ms", "pipeline_ms", "items"}
    split = bench(inference, [frame], runs=5, warmup=1, fixed_costs=True)
    assert split["resize_ms"]["p50"] > 0
    expected = (split["pipeline_ms"]["p50"] - split["resize_ms"]["p50"]) / split["invoke_ms"]["p50"]
    assert split["ratio_p50_without_resize"] == round(expected, 3)
    # A frame whose result the policy holds back, timed on its own line; the runner's gate is its own again.
    held = (split["held_ms"]["p50"] - split["resize_ms"]["p50"]) / split["invoke_ms"]["p50"]
    assert split["ratio_p50_held_without_resize"] == round(held, 3) and inference.gate is None
    # resize_only does the resize stage alone, into the same buffer the whole preprocess uses.
    task = inference.task
    assert isinstance(task, Classify)
    pre = task.preprocessor
    other = _frame(seed=9)
    pre.resize_only(other)
    h, w = model.inputs[0].shape[1:3]
    assert np.array_equal(pre._resized, cv2.resize(other, (w, h), interpolation=pre.interpolation))


@pytest.mark.parametrize("name, pre", [
    ("colors_float.tflite", Preprocess(color="RGB", resize="letterbox", mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))),
    ("colors_int8.tflite", Preprocess(color="RGB", resize="letterbox", normalize="quantization")),
])
def test_letterbox_borders_are_written_once_and_every_frame_reads_as_if_alone(fixtures: Path, name: str,
                                                                             pre: Preprocess) -> None:
    # After the first frame only the picture rows are rewritten; the border rows must still hold the pad
    # after invokes and later frames.
    model = Model(fixtures / name, threads=1)
    ours = ImagePreprocessor(model, pre, pad_value=7)
    for seed in (1, 2, 3):
        frame = _frame(seed=seed)
        ours(frame)
        model.invoke()
        fresh_model = Model(fixtures / name, threads=1)
        ImagePreprocessor(fresh_model, pre, pad_value=7)(frame)
        assert np.array_equal(model.input()[0], fresh_model.input()[0]), seed
    assert ours._rows != slice(None)  # the band is in use: 4:3 frames in a square input
