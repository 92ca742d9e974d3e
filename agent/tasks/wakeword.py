"""microWakeWord: streaming wake word detection on 16 kHz int16 audio.

The features come from the TFLM micro frontend through `pymicro-features`, the
frontend ESPHome runs on the device the models were made for: one 40-channel
feature row per 10 ms of audio. A model takes `stride` rows at a time (its input
shape is `[1, stride, 40]`) and keeps its own streaming state between calls.

Decisions are made exactly as pymicro-wakeword makes them, so that a model fires
here when it fires there:

- features are quantized as `round(feature / scale + zero_point)` in float64,
  half to even, with the input tensor's own scale and zero point;
- the probability is the output dequantized in float32, and the score is the
  mean of the last `sliding_window_size` probabilities, reported as 0 until the
  window is full;
- a wake word is detected when that mean is strictly above `probability_cutoff`.

The probabilities themselves are the interpreter's: with the builtin kernels
(`EXACT_MODEL_OPTIONS`) LiteRT gives the reference's bit for bit; with XNNPACK
(the default, several times faster) one can land an output step away.

The mean is kept as an exact integer sum (every dequantized float32 value is a
dyadic rational), so it equals `statistics.mean` to the last bit without its
cost. After a detection the same wake word is not reported again for
`refractory_s` seconds. Several wake words share one frontend.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymicro_features import MicroFrontend

from agent.errors import BadInput
from agent.manifest import ModelSpec
from agent.runtime import Model
from agent.tasks.task import TASK_THREADS, Latency, Runner, register_runner

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
STEP_SAMPLES = 160
"""One feature row per 10 ms."""
FEATURES = 40
"""Channels of the micro frontend's filterbank."""
DEFAULT_REFRACTORY_S = 2.0

MODEL_OPTIONS: dict[str, Any] = {"threads": TASK_THREADS["wakeword"]}
"""How to build a wake word `Model`: one thread, the models are tiny and a thread pool only adds
wake-ups to every invoke. XNNPACK stays on: it runs these models 5-10x faster than the builtin
kernels (LiteRT; tflite-runtime 2.14's default XNNPACK takes float graphs only, so there these int8
models run on the builtin kernels, ~17 us an invoke, still ahead of pymicro-wakeword's loop).
Its int8 arithmetic rounds differently, so a probability can land one output step (1/256) away
from the reference's; on the real recordings every decision at every step is still the reference's."""

EXACT_MODEL_OPTIONS: dict[str, Any] = {"threads": TASK_THREADS["wakeword"], "xnnpack": False}
"""The builtin kernels the reference (pymicro-wakeword's TFLite) runs: with ai-edge-litert every
probability equals the reference's bit for bit (`--no-xnnpack` on the command line)."""


@dataclass(frozen=True)
class WakeWordSettings:
    """How one wake word model decides."""

    label: str
    """The wake word as said (`Hey Jarvis`)."""
    probability_cutoff: float
    """Detected when the windowed mean probability is strictly above this."""
    sliding_window_size: int
    """Probabilities averaged for a decision."""
    refractory_s: float = DEFAULT_REFRACTORY_S
    """Seconds after a detection during which the same wake word is not reported again."""

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> WakeWordSettings:
        source = spec.manifest_path or spec.path
        if spec.micro is None:
            raise BadInput(f"{source}: a wake word model needs a microWakeWord v2 manifest (\"type\": \"micro\")")
        refractory = spec.postprocess.params.get("refractory_s", DEFAULT_REFRACTORY_S)
        if not isinstance(refractory, int | float) or isinstance(refractory, bool) or not 0 <= refractory <= 3600:
            raise BadInput(f"{source}: postprocess.params.refractory_s must be seconds between 0 and 3600")
        # The manifest's cutoff arrives as postprocess.threshold; --threshold overrides it there.
        cutoff = spec.postprocess.threshold or spec.micro.probability_cutoff
        return cls(
            label=spec.labels[0] if spec.labels else spec.name,
            probability_cutoff=float(cutoff),
            sliding_window_size=spec.micro.sliding_window_size,
            refractory_s=float(refractory),
        )


def clip_features(samples: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """[rows, FEATURES] float32: a clip through a fresh micro frontend in the runner's steps (`model quantize
    --calib` calibrates a float wake word model on exactly what the runtime would feed it)."""
    frontend = MicroFrontend()
    data = np.asarray(samples, dtype=np.int16).tobytes()
    rows: list[list[float]] = []
    step, pos = STEP_SAMPLES * 2, 0
    while pos + step <= len(data):
        out = frontend.process_samples(data[pos:pos + step])
        pos += out.samples_read * 2
        if out.features:
            rows.append(out.features)
    return np.array(rows, dtype=np.float32).reshape(-1, FEATURES)


class WakeWordModel:
    """One streaming model: its feature rows, its window of probabilities, its last detection."""

    def __init__(self, model: Model, spec: ModelSpec, settings: WakeWordSettings | None = None) -> None:
        self.model = model
        self.spec = spec
        self.settings = settings or WakeWordSettings.from_spec(spec)
        self.last_score = 0.0
        """The windowed score of the last step, also under the cutoff (sample capture's near misses)."""
        source = spec.manifest_path or spec.path
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise BadInput(
                f"{source}: a microWakeWord model has one input and one output, this one has "
                f"{len(model.inputs)} and {len(model.outputs)}"
            )
        shape = model.inputs[0].shape
        if len(shape) != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != FEATURES:
            raise BadInput(
                f"{source}: input shape {list(shape)} does not fit the micro frontend "
                f"(needs [1, stride, {FEATURES}])"
            )
        out = model.outputs[0]
        if int(np.prod(out.shape)) != 1:
            raise BadInput(f"{source}: output shape {list(out.shape)} is not one probability")
        self.stride = shape[1]
        """Feature rows per inference, read from the input shape."""
        self._rows = np.zeros((self.stride, FEATURES), np.float64)
        self._scratch = np.zeros((self.stride, FEATURES), np.float64)
        self._filled = 0
        self._prepare_output(out.dtype, out.scale, out.zero_point, out.quantized)
        window = self.settings.sliding_window_size
        self._window: deque[int] = deque(maxlen=window)
        self._window_sum = 0
        self._window_denominator = self._unit * window
        self._quiet_until = -1.0
        self.generation = -1
        self._bind()

    def _prepare_output(self, dtype: np.dtype[Any], scale: float, zero_point: int, quantized: bool) -> None:
        # Every dequantized output value, as pymicro-wakeword computes it: float32((q - zp) * scale).
        # They are float32 numbers, hence dyadic rationals: keep each as an integer over a common
        # power-of-two denominator, so that window sums are exact and their mean correctly rounded.
        if not quantized or dtype.itemsize != 1:
            raise BadInput(
                f"{self.spec.manifest_path or self.spec.path}: output must be a quantized 8-bit probability "
                f"(got {dtype.name})"
            )
        codes = np.arange(np.iinfo(dtype).min, np.iinfo(dtype).max + 1)
        values = (codes.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
        ratios = [float(v).as_integer_ratio() for v in values]  # exact; denominators are powers of two
        self._unit = max(den for _, den in ratios)
        self._offset = int(-codes[0])
        self._numerators = [num * (self._unit // den) for num, den in ratios]

    def _bind(self) -> None:
        """Take the tensor views again; `Model.reset_state()` may have rebuilt the interpreter."""
        self._input = self.model.input(0)[0]
        info = self.model.inputs[0]
        self._quantized_input = info.quantized
        self._scale = float(info.scale)
        self._zero_point = float(info.zero_point)
        if info.quantized:
            limits = np.iinfo(info.dtype)
            self._limits = (float(limits.min), float(limits.max))
        self.generation = self.model.generation

    def reset(self) -> None:
        """Forget the stream: the model's state, the rows not yet run, the window, the quiet time."""
        self.model.reset_state()
        self._bind()
        self._filled = 0
        self._window.clear()
        self._window_sum = 0
        self._quiet_until = -1.0

    def push(self, features: list[float], t: float) -> float | None:
        """Add one feature row; returns the score when this row completed a window above the cutoff."""
        self._rows[self._filled] = features
        self._filled += 1
        if self._filled < self.stride:
            return None
        self._filled = 0
        if self.generation != self.model.generation:
            self._bind()
        if self._quantized_input:
            q = self._scratch
            np.divide(self._rows, self._scale, out=q)
            q += self._zero_point
            np.rint(q, out=q)
            # pymicro-wakeword casts without clipping; the frontend's range keeps values inside int8 anyway.
            np.clip(q, self._limits[0], self._limits[1], out=q)
            np.copyto(self._input, q, casting="unsafe")
        else:
            np.copyto(self._input, self._rows, casting="same_kind")
        self.model.invoke()
        code = int(self.model.output(0).flat[0]) + self._offset
        window = self._window
        if len(window) == window.maxlen:
            self._window_sum -= self._numerators[window[0]]
        window.append(code)
        self._window_sum += self._numerators[code]
        if len(window) < self.settings.sliding_window_size:
            return None
        # Python's int / int is correctly rounded: the same float statistics.mean returns.
        score = self._window_sum / self._window_denominator
        self.last_score = score
        if score <= self.settings.probability_cutoff or t < self._quiet_until:
            return None
        self._quiet_until = t + self.settings.refractory_s
        return score


class WakeWordRunner(Runner):
    """Audio chunks in, wake word detections out; several models share one micro frontend."""

    item_kind = "audio"

    def __init__(self, models: list[WakeWordModel]) -> None:
        if not models:
            raise ValueError("a wake word runner needs at least one model")
        self.models = list(models)
        self.latency = Latency()
        self._frontend = MicroFrontend()
        self._process_samples = self._frontend.process_samples
        self._carry = b""
        self._samples = 0
        """Samples fed to the frontend since the stream began: the stream's clock."""
        self.peak_score = 0.0
        """The best windowed score of the last `process` call, detected or not."""

    @property
    def model(self) -> Model:
        """The first model (for reports that name one)."""
        return self.models[0].model

    @property
    def t(self) -> float:
        """Seconds of audio consumed since the stream began."""
        return self._samples / SAMPLE_RATE

    def reset(self) -> None:
        """A new stream: frontend, models and windows start afresh."""
        self._frontend.reset()
        self._carry = b""
        self._samples = 0
        for m in self.models:
            m.reset()

    def replace(self, index: int, model: WakeWordModel) -> None:
        """Swap one wake word model; its streaming state starts afresh, the others' go on."""
        model.reset()
        self.models[index] = model

    def process(self, item: Any) -> list[dict[str, Any]]:
        """`item`: int16 mono 16 kHz samples (any length). Returns the detections it completed."""
        data = np.asarray(item, dtype=np.int16).tobytes()
        if self._carry:
            data = self._carry + data
        clock = time.perf_counter_ns
        features_ns = invoke_ns = 0
        results: list[dict[str, Any]] = []
        peak = 0.0
        step = STEP_SAMPLES * 2
        pos, end = 0, len(data)
        process_samples = self._process_samples
        while pos + step <= end:
            t0 = clock()
            out = process_samples(data[pos : pos + step])
            t1 = clock()
            features_ns += t1 - t0
            pos += out.samples_read * 2
            self._samples += out.samples_read
            if not out.features:
                continue
            t = self._samples / SAMPLE_RATE
            for m in self.models:
                m.last_score = 0.0
                score = m.push(out.features, t)
                peak = max(peak, m.last_score)
                if score is not None:
                    results.append({
                        "task": "wakeword",
                        "event": "detected",
                        "label": m.settings.label,
                        "score": round(score, 6),
                        "t": round(t, 3),
                    })
            invoke_ns += clock() - t1
        self._carry = data[pos:]
        self.peak_score = peak
        lat = self.latency
        lat.pre, lat.invoke, lat.post = features_ns / 1e6, invoke_ns / 1e6, 0.0
        return results


@register_runner("wakeword")
def create_wakeword_runner(model: Model, spec: ModelSpec) -> WakeWordRunner:
    return WakeWordRunner([WakeWordModel(model, spec)])
