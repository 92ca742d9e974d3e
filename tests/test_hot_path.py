"""The per-frame path allocates no frame- or tensor-sized buffers and leaks nothing (tracemalloc)."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.manifest import load_spec
from agent.runtime import Model
from agent.tasks import Inference, create_task

# Under emulation (scripts/test-arm64 sets LEPTON_EMULATED) a traced frame costs ~100x more: 200 frames
# keep the face case inside the timeout. The peak check is unchanged; the leak check then tolerates 20 bytes a
# frame instead of 4.
FRAMES = 200 if os.environ.get("LEPTON_EMULATED") else 1000
# What a frame may allocate and free again: the small result dict and numpy's scalar/ufunc temporaries.
SMALL = 16 * 1024
# What may be alive after 1,000 frames that was not before: the last result and interpreter freelists. A leak
# of even 4 bytes a frame would pass it.
LEAK = 4 * 1024


def _imread(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, path
    return image


def _measure(spec_path: Path, frame: np.ndarray, whole: bool = True, held: bool = False) -> tuple[int, int]:
    spec = load_spec(spec_path)
    model = Model(spec.path, threads=1)
    inference = Inference(model, create_task(model, spec))
    if held:  # every result held back by the policy, as in a steady scene: `process` builds nothing
        inference.gate = lambda labels, scores: False
        assert inference.process(frame) == []

    def step() -> None:
        if held:
            inference.process(frame)
        elif whole:
            inference.run(frame)
        else:
            inference.task.preprocess(frame)
            model.invoke()

    for _ in range(20):  # warm-up: buffers for this frame size are made here, once
        step()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(100):  # objects made once, lazily, after tracing starts are not per-frame growth
            step()
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(FRAMES):
            step()
        # A full collection empties CPython's free lists (floats, tuples, dicts kept for reuse) and
        # pending garbage: memory they hold is not the hot path's, and without this the figure
        # varied with whatever else the process had done (1-6 KB, failing 1 KB on main).
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current - base, peak - base


@pytest.mark.parametrize("size", [(480, 640), (1080, 1920)])
def test_classification_hot_path(fixtures: Path, size: tuple[int, int]) -> None:
    frame = cv2.resize(_imread(fixtures / "images" / "green_1.png"), size[::-1])
    grown, peak = _measure(fixtures / "colors_int8.json", frame)
    assert frame.nbytes >= 921_600
    assert peak < SMALL, peak  # a copy of the frame would be ≥ 921,600 bytes
    assert grown < LEAK, grown  # nothing accumulates over 1,000 frames


def test_float_tensor_is_written_in_place(models_dir: Path, fixtures: Path) -> None:
    # BlazeFace full-range takes a 192x192x3 float32 input: 442,368 bytes. A per-frame copy of the
    # tensor, or a float image made before quantization, would show in the peak. (Its raw-tensor
    # result lists 2,304 scores, which is output, not hot-path work: only preprocess + invoke here.)
    frame = _imread(fixtures / "images" / "red_1.png")
    grown, peak = _measure(models_dir / "face" / "face_detection_full_range.tflite", frame, whole=False)
    assert peak < SMALL, peak
    assert grown < LEAK, grown


@pytest.mark.parametrize("held", [False, True])
def test_face_detection_hot_path(models_dir: Path, held: bool) -> None:
    # The whole detect pipeline on a 640x480 frame with a face: letterbox, LUT, invoke, anchors, weighted
    # NMS, boxes mapped back. Only the handful of candidates and the result dict may be allocated.
    from skimage import data

    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, 80:560] = cv2.resize(photo, (480, 480))
    grown, peak = _measure(models_dir / "face" / "face_detection_short_range.tflite", frame, held=held)
    assert peak < SMALL, peak
    assert grown < LEAK, grown


def test_yolo_detection_hot_path(fixtures: Path) -> None:
    frame = _imread(fixtures / "images" / "squares_wide.png")
    grown, peak = _measure(fixtures / "squares_yolov8_int8.json", frame)
    assert peak < SMALL, peak
    assert grown < LEAK, grown
