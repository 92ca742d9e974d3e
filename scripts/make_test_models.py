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
* ``images/*.png``, ``video/colors.avi`` and ``NOTICE.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
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
from synthetic import make_color_image, make_shape_image

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
