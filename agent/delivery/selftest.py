"""Self-test of a stored model before it may run in a pipeline.

Bound the memory its tensors need against the profile's budget (from the flatbuffer, before any
interpreter sees it), load it with the agent's runtime (which allocates), check its tensors fit the
pipeline it is meant for, build the pipeline's runner for it, run one inference
on a sample item, then time a few more against the profile's latency budget. The
loaded, allocated runner is handed back: the pipeline swaps in exactly what was
tested, so the swap itself costs the loop nothing.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.delivery import failpoints
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.store import ModelStore, StoredModel
from agent.errors import BadInput, LeptonError
from agent.manifest import Manifest, ModelSpec
from agent.modelfile import read_model_file
from agent.runtime import Model
from agent.tasks.task import Inference, Runner, Task, create_task, interpreter_threads

logger = logging.getLogger(__name__)

TIMED_RUNS = 3
"""Inferences timed after the first (which pays for lazy kernel set-up); the median is checked."""

MIB = 1024 * 1024

RunnerFactory = Callable[[Model, ModelSpec], Runner]


def default_runner(model: Model, spec: ModelSpec) -> Runner:
    return Inference(model, create_task(model, spec))


@dataclass(frozen=True)
class TensorShape:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Fit:
    """What a model must look like to replace the running one without rebuilding the loop around it."""

    inputs: tuple[TensorShape, ...] | None = None
    """Input shapes and dtypes, in order; None: any."""
    outputs: tuple[TensorShape, ...] | None = None
    """Output shapes and dtypes, in order; None: any."""
    item_kind: str | None = None
    """What the pipeline feeds (`image`, `tensor`, …); None: any."""

    @classmethod
    def like(cls, model: Model, runner: Runner | None = None) -> Fit:
        """Exactly the tensors of the model running now: the default for a hot swap."""
        return cls(
            inputs=tuple(TensorShape(t.shape, t.dtype.name) for t in model.inputs),
            outputs=tuple(TensorShape(t.shape, t.dtype.name) for t in model.outputs),
            item_kind=runner.item_kind if runner is not None else None,
        )


@dataclass
class Prepared:
    """A self-tested model, loaded and allocated, with the runner the pipeline will drive."""

    stored: StoredModel
    spec: ModelSpec
    model: Model
    runner: Runner
    latency_ms: float


def spec_for(store: ModelStore, stored: StoredModel) -> ModelSpec:
    """The runner's view of a stored model: its signed manifest, with the content-addressed path."""
    data = json.loads(store.manifest_bytes(stored))
    m = Manifest.model_validate(data)
    return ModelSpec(
        path=store.path(stored.sha256), name=m.name, version=m.version, task=m.task,
        labels=tuple(m.labels) if isinstance(m.labels, list) else (), preprocess=m.preprocess,
        postprocess=m.postprocess, manifest=m,
    )


def _shapes(tensors: Any) -> tuple[TensorShape, ...]:
    return tuple(TensorShape(t.shape, t.dtype.name) for t in tensors)


def _describe(shapes: tuple[TensorShape, ...]) -> str:
    return ", ".join(f"{list(s.shape)} {s.dtype}" for s in shapes)


def sample_item(task: Task | None, model: Model, runner: Runner) -> Any:
    """A neutral input: a mid-grey frame for image models, else the task's synthetic item, else zeros."""
    if runner.item_kind == "image":
        from agent.vision.preprocess import image_input

        geometry = image_input(model.inputs[0])
        h, w = (geometry.height, geometry.width) if geometry else (480, 640)
        return np.full((h, w, 3), 128, np.uint8)
    if task is not None:
        try:
            return task.synthetic_item()
        except NotImplementedError:
            pass
    return [np.zeros(t.shape, np.float32) for t in model.inputs]


def self_test(
    store: ModelStore,
    stored: StoredModel,
    *,
    fit: Fit | None = None,
    budget_ms: float | None = None,
    sample: Any = None,
    make_runner: RunnerFactory = default_runner,
    backend: str | None = None,
    threads: int | None = None,
    memory_budget: int | None = None,
    time_budget_s: float | None = None,
    started: float | None = None,
) -> Prepared:
    """Load, check, run; DeliveryError with the reason when the model must not be activated.

    `memory_budget` (bytes): the flatbuffer's tensor bound must fit before an interpreter is made (a model
    that would allocate gigabytes is refused, not loaded: the agent would be OOM-killed). `time_budget_s`:
    the whole self-test (load, allocate, the sample inferences) must end within it; it is checked after
    each step, since a call inside the runtime cannot be interrupted. `started` (monotonic): when the budget
    began, if before this call (the caller's watchdog timer must not start earlier than the budget does)."""
    started = time.monotonic() if started is None else started
    spec = spec_for(store, stored)
    try:
        bound = read_model_file(spec.path).arena_bound
    except BadInput as exc:
        raise DeliveryError(Reason.LOAD_FAILED, str(exc)) from None
    if memory_budget is not None and bound > memory_budget:
        raise DeliveryError(Reason.MEMORY_BUDGET, f"its tensors need up to {bound / MIB:,.1f} MiB, the profile's "
                                                  f"memory budget is {memory_budget / MIB:,.1f} MiB")
    failpoints.reach("selftest", stored=stored)

    def in_time(step: str) -> None:
        spent = time.monotonic() - started
        if time_budget_s is not None and spent > time_budget_s:
            raise DeliveryError(Reason.SELFTEST_TIMEOUT, f"the self-test took {spent:.1f} s by the end of {step}, "
                                                         f"the budget is {time_budget_s:g} s")

    try:
        model = Model(spec.path, backend=backend, threads=interpreter_threads(spec, threads))
    except LeptonError as exc:
        raise DeliveryError(Reason.LOAD_FAILED, str(exc)) from None
    in_time("loading")
    if fit is not None and fit.inputs is not None and _shapes(model.inputs) != fit.inputs:
        raise DeliveryError(Reason.INPUT_SHAPE, f"inputs are {_describe(_shapes(model.inputs))}, "
                            f"the pipeline takes {_describe(fit.inputs)}")
    if fit is not None and fit.outputs is not None and _shapes(model.outputs) != fit.outputs:
        raise DeliveryError(Reason.OUTPUT_SHAPE, f"outputs are {_describe(_shapes(model.outputs))}, "
                            f"the pipeline reads {_describe(fit.outputs)}")
    try:
        runner = make_runner(model, spec)
    except LeptonError as exc:
        raise DeliveryError(Reason.TASK_MISMATCH, str(exc)) from None
    if fit is not None and fit.item_kind is not None and runner.item_kind != fit.item_kind:
        raise DeliveryError(Reason.TASK_MISMATCH, f"the model takes {runner.item_kind} items, "
                            f"the pipeline gives {fit.item_kind}")
    task = getattr(runner, "task", None)
    item = sample if sample is not None else sample_item(task, model, runner)
    timings: list[float] = []
    for _ in range(1 + TIMED_RUNS):
        t0 = time.perf_counter()
        try:
            runner.process(item)
        except Exception as exc:  # the runtime raises RuntimeError/ValueError; a task may raise anything
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise DeliveryError(Reason.INVOKE_FAILED, f"the sample inference failed: {text}") from None
        timings.append((time.perf_counter() - t0) * 1000)
        in_time(f"inference {len(timings)}")
    latency = statistics.median(timings[1:])
    if budget_ms is not None and latency > budget_ms:
        raise DeliveryError(Reason.LATENCY_BUDGET,
                            f"a sample inference takes {latency:.1f} ms, the budget is {budget_ms:g} ms")
    if model.stateful:
        model.reset_state()  # the pipeline starts from a clean state, not from the test's
    logger.info("%s@%s passed the self-test (%.2f ms per item)", stored.name, stored.version, latency)
    return Prepared(stored=stored, spec=spec, model=model, runner=runner, latency_ms=latency)
