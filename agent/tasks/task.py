"""The task interface, its registry, and recognition of a model's task from its tensors."""

from __future__ import annotations

import abc
import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.errors import BadInput
from agent.manifest import ModelSpec
from agent.runtime import Model

# Task key -> module that registers it. Imported on first use so that an
# audio-only agent never imports OpenCV through the vision tasks.
TASK_MODULES: dict[str, str] = {
    "classify": "agent.tasks.classify",
    "detect": "agent.tasks.detect",
    "tensors": "agent.tasks.tensors",
}

TASKS: dict[str, type[Task]] = {}


def register(key: str) -> Callable[[type[Task]], type[Task]]:
    def wrap(cls: type[Task]) -> type[Task]:
        cls.key = key
        TASKS[key] = cls
        return cls

    return wrap


Gate = Callable[[list[str], list[float]], bool]
"""Asked with a result's labels and scores (as the result will carry them) before it is built: False when
nobody wants it (the pipeline's policy holds it back), and then nothing more is made of that output."""


class Task(abc.ABC):
    """preprocess(item) writes the model's inputs; postprocess() reads its outputs into a result."""

    key: ClassVar[str]
    item_kind: str = "image"
    """What `preprocess` takes: `image` (BGR uint8 frame) or `tensor` (arrays)."""

    def __init__(self, model: Model, spec: ModelSpec) -> None:
        self.model = model
        self.spec = spec

    @abc.abstractmethod
    def preprocess(self, item: Any) -> None: ...

    @abc.abstractmethod
    def postprocess(self) -> dict[str, Any]: ...

    def postprocess_gated(self, gate: Gate) -> dict[str, Any] | None:
        """As `postprocess`, but None when `gate` says no one wants the result: a task that can name its
        result's labels and scores before building it asks first, and builds nothing for a held-back frame."""
        return self.postprocess()

    def synthetic_item(self) -> Any:
        """An input to benchmark with when none is given."""
        raise NotImplementedError


def task_class(key: str) -> type[Task]:
    if key not in TASKS and key in TASK_MODULES:
        importlib.import_module(TASK_MODULES[key])
    if key not in TASKS:
        known = ", ".join(sorted(TASK_MODULES))
        raise BadInput(f"task {key!r} is not available in this agent (available: {known})")
    return TASKS[key]


@dataclass(frozen=True)
class Recognition:
    """The task a model would be run as, and why."""

    task: str
    detail: str
    runnable_as: str


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def recognise(model: Model) -> Recognition:
    """Name the task from the tensors alone (no manifest)."""
    ins, outs = model.inputs, model.outputs
    out_shapes = [o.shape for o in outs]
    image_in = len(ins) == 1 and len(ins[0].shape) == 4 and ins[0].shape[0] == 1 and (
        ins[0].shape[3] in (1, 3) or ins[0].shape[1] in (1, 3)
    )

    def result(task: str, detail: str) -> Recognition:
        runnable = task if task in TASK_MODULES else "tensors"
        return Recognition(task, detail, runnable)

    if model.stateful and len(ins) == 1 and len(ins[0].shape) == 3 and ins[0].shape[2] == 40 and len(outs) == 1:
        return result("wakeword", f"streaming model, features {_shape_str(ins[0].shape)} (microWakeWord layout)")
    if "TFLite_Detection_PostProcess" in model.op_counts and len(outs) == 4:
        return result("detect", "SSD with TFLite_Detection_PostProcess (boxes, classes, scores, count)")
    if image_in and len(outs) == 2:
        a, b = sorted(out_shapes, key=lambda s: -s[-1])
        if len(a) == 3 and len(b) == 3 and a[1] == b[1] and a[2] == 16 and b[2] == 1:
            size = ins[0].shape[1]
            kind = {128: "short-range", 192: "full-range", 256: "back-camera"}.get(size, f"{a[1]} anchors")
            kind = f"{kind} {size}x{size}"
            return result("detect", f"BlazeFace {kind} (regressors {_shape_str(a)}, scores {_shape_str(b)})")
    if image_in and len(outs) == 1 and len(out_shapes[0]) == 3:
        _, d1, d2 = out_shapes[0]
        if min(d1, d2) >= 6 and max(d1, d2) >= 100:
            anchors, width = max(d1, d2), min(d1, d2)
            flavour = "YOLOv8" if d1 < d2 else "YOLOv5"
            detail = f"{flavour} raw output {_shape_str(out_shapes[0])} ({anchors} candidates x {width})"
            return result("detect", detail)
    if image_in and len(outs) == 1:
        n = math.prod(out_shapes[0])
        if n >= 2 and sum(1 for s in out_shapes[0] if s > 1) == 1:
            return result("classify", f"one score vector of {n} classes")
    return result("tensors", "no known output layout; raw tensors")


@dataclass
class Latency:
    pre: float = 0.0
    invoke: float = 0.0
    post: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"pre": round(self.pre, 3), "invoke": round(self.invoke, 3), "post": round(self.post, 3)}


class Runner(abc.ABC):
    """What a pipeline loop drives: one item in, zero or more results out.

    Vision runs one inference per frame (`Inference`); a streaming audio model
    runs several per chunk and reports only detections.
    """

    item_kind: str = "image"
    latency: Latency
    gate: Gate | None = None
    """Set by a pipeline whose policy may hold results back: `process` returns [] for an item it rejects."""

    @abc.abstractmethod
    def process(self, item: Any) -> list[dict[str, Any]]: ...


class Inference(Runner):
    """One model driven by one task: `run(item)` → result dict, with the time of each stage."""

    def __init__(self, model: Model, task: Task) -> None:
        self.model = model
        self.task = task
        self.latency = Latency()
        self.item_kind = task.item_kind

    def process(self, item: Any) -> list[dict[str, Any]]:
        result = self._run(item, self.gate)
        return [] if result is None else [result]

    def run(self, item: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._run(item, None)  # type: ignore[assignment]  # no gate: always a result
        return result

    def _run(self, item: Any, gate: Gate | None) -> dict[str, Any] | None:
        clock = time.perf_counter_ns
        t0 = clock()
        self.task.preprocess(item)
        t1 = clock()
        self.model.invoke()
        t2 = clock()
        result = self.task.postprocess() if gate is None else self.task.postprocess_gated(gate)
        t3 = clock()
        lat = self.latency
        lat.pre, lat.invoke, lat.post = (t1 - t0) / 1e6, (t2 - t1) / 1e6, (t3 - t2) / 1e6
        return result


def create_task(model: Model, spec: ModelSpec, override: str | None = None) -> Task:
    """The task for this model: `override`, else the manifest's, else the recognised one."""
    key = override or spec.task or recognise(model).runnable_as
    return task_class(key)(model, spec)


RunnerFactory = Callable[[Model, ModelSpec], Runner]

# Tasks that are not one inference per item (streaming audio) build their own Runner.
# They need their manifest's settings, so a bare model is never recognised as one.
RUNNER_MODULES: dict[str, str] = {
    "wakeword": "agent.tasks.wakeword",
}
RUNNERS: dict[str, RunnerFactory] = {}

TASK_THREADS: dict[str, int] = {"wakeword": 1}
"""Interpreter threads for tasks whose models are tiny streaming graphs, whatever the profile says: a
thread pool only adds wake-ups to every invoke (microWakeWord on LiteRT with XNNPACK: 3 us per invoke
on 1 thread, 15 us on 4, 26 us on 8)."""


def interpreter_threads(spec: ModelSpec, threads: int | None, task_override: str | None = None) -> int | None:
    """The threads to build `spec`'s interpreter with: the task's own (TASK_THREADS) or `threads`."""
    return TASK_THREADS.get(task_override or spec.task or "", threads)


def register_runner(key: str) -> Callable[[RunnerFactory], RunnerFactory]:
    def wrap(factory: RunnerFactory) -> RunnerFactory:
        RUNNERS[key] = factory
        return factory

    return wrap


def create_runner(model: Model, spec: ModelSpec, task_override: str | None = None) -> Runner:
    """What a loop drives for this model: a streaming runner (wakeword) or `Inference` around a Task."""
    key = task_override or spec.task or recognise(model).runnable_as
    if key not in RUNNERS and key in RUNNER_MODULES:
        importlib.import_module(RUNNER_MODULES[key])
    if key in RUNNERS:
        return RUNNERS[key](model, spec)
    return Inference(model, task_class(key)(model, spec))
