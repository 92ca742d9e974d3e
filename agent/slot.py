"""The model slot of a pipeline: which model runs, and every change of it, under one lock.

A slot owns the spec, the loaded model, its runner, the variant, the model swapped in and
the undo of a swap. Everything that changes a pipeline's model talks to the slot, never to
the loop: the governor (`use_variant`), model delivery (`prepare` + `swap`, `health`,
`attach`, `sample`), an explicit rollback, and `reload`. The loop only asks, between two
items, whether something was swapped in (`pending`, one attribute read) and takes it.

The daemon keeps one slot per pipeline name for the life of the process: `reload` builds a
new loop on the same slot (`configure` tells it the new settings), so a deployment in
probation keeps watching and undoing the model the pipeline actually runs, and the counters
it judges carry on across the rebuilt loop (`bind`). A swap's undo made before the slot's
model settings changed loads the previous model again with the new settings instead of
re-installing a runner built for the old ones.

Which model a (re)start loads (`load`): the one swapped in last, else what `model_source`
says (the model store's trial or active version), else the config's file; `reset` (a fresh
start) forgets what was swapped in and asks again. A pipeline that names a delivered model
(`delivered = "NAME"`) has no file: until the store has NAME, `waiting_for` says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import PipelineSettings
from agent.errors import BadInput, LeptonError
from agent.manifest import ModelSpec, load_spec
from agent.profiles import Profile
from agent.runtime import Model
from agent.tasks.task import Runner, interpreter_threads
from agent.variants import ModelVariant, variant_spec

logger = logging.getLogger(__name__)

SAMPLE_WAIT_S = 2.0
"""`sample()` waits at most this long for the loop's next item."""


class ItemObserver(Protocol):
    """Sees every processed item after the active runner, in the loop's thread (a shadow trial)."""

    def observe(self, item: Any, results: list[dict[str, Any]], latency_ms: float) -> None: ...


class Counters(Protocol):
    """What the slot reads of a loop's statistics (`agent.supervisor.PipelineStats`)."""

    processed: int
    errors: int
    restarts: int
    last_error: str | None


@dataclass(frozen=True)
class LoopHealth:
    """Monotonic counters of the loops that ran this slot, for judging a model in probation."""

    processed: int
    errors: int
    restarts: int
    last_error: str | None


def build_runner(model: Model, spec: ModelSpec, task: str | None) -> Runner:
    """The runner for this model. A `create_runner` factory (the audio work adds one, for streaming
    wake word models) takes precedence; without it, a task driven once per item."""
    from agent import tasks

    factory = getattr(tasks, "create_runner", None)
    if factory is not None:
        runner: Runner = factory(model, spec, task)
        return runner
    return tasks.Inference(model, tasks.create_task(model, spec, task))


def _model_settings(settings: PipelineSettings) -> tuple[Any, ...]:
    return settings.model, settings.delivered, settings.labels, settings.task


Loaded = tuple[ModelSpec, Model | None, Runner, str | None]
"""(spec, model, runner, variant file) ready for the loop."""


class ModelSlot:
    """The model one pipeline runs. Any thread may call it; the loop's thread takes swaps."""

    def __init__(self, settings: PipelineSettings, *, profile: Profile, backend: str | None) -> None:
        self.name = settings.name
        self.profile = profile
        self.backend = backend
        self.settings = settings
        self.generation = 0
        """Bumped when the model settings (model, labels, task) change: older undos reload instead."""
        self._lock = threading.RLock()
        self.spec: ModelSpec | None = None
        if settings.model is not None:  # a delivered model: the daemon's `model_source` knows it
            with contextlib.suppress(BadInput):  # reported when the loop starts
                self.spec = load_spec(settings.model, settings.labels)  # for status, before the model loads
        self.base_spec: ModelSpec | None = self.spec
        """The model variants are cheaper versions of: the config's, or the last one swapped in as a base."""
        self.model: Model | None = None
        self.runner: Runner | None = None
        """What the loop drives now (None before the first load)."""
        self.variant: str | None = None
        """The variant file running instead of the manifest's own (None: the base model)."""
        self.task_key: str | None = None
        self.model_source: Callable[[str], ModelSpec | None] | None = None
        """Given a model name, the one to run when nothing was swapped in (the daemon returns the model
        store's trial or active version of that name); None: the config's file."""
        self._override: tuple[ModelSpec, str | None] | None = None
        self.pending: Loaded | None = None
        """Swapped in, not yet taken by the loop (read without the lock: one attribute, per item)."""
        self.observer: ItemObserver | None = None
        self.keep_base = False
        """Load the base beside a variant the governor swaps in (`base_check`): capture compares them."""
        self.base_check: tuple[ModelSpec, Runner] | None = None
        """The base model's runner, loaded while a variant runs and `keep_base` is set; only the loop drives it."""
        self.tuning = False
        """The device's tuner (`agent.tune`) chooses the variant: the governor steps only the fps."""
        self.tune_summary: dict[str, Any] | None = None
        """The last tune's chosen variant and its margins to the budget (telemetry)."""
        self.sample_wanted = threading.Event()
        self.pacing = False
        """A tune measures between the loop's items: the loop sets `item_done` after each one."""
        self.item_done = threading.Event()
        self._sample_gate = threading.Lock()
        """One sampler at a time (a self-test and a tune may both ask): each gets an item of its own."""
        self._sample_ready = threading.Event()
        self._sample: Any = None
        self._stats: Counters | None = None
        self._carried = (0, 0, 0)
        self.stopping: Callable[[], bool] = lambda: False
        """True while the loop bound to the slot is stopping (a sample then stops waiting)."""

    # -- settings and the loop bound to the slot ------------------------------------------------

    def configure(self, settings: PipelineSettings) -> None:
        """New settings (a reload); a change of model, labels or task outdates the undos made before."""
        with self._lock:
            changed = _model_settings(settings) != _model_settings(self.settings)
            self.settings = settings
            if changed:
                self.generation += 1
                self._override, self.pending, self.base_check = None, None, None
                with contextlib.suppress(BadInput):
                    self.spec = self.base_spec = None  # not the old settings' model if the new ones have none (yet)
                    self.spec = self.base_spec = self.configured_spec()

    def set_threads(self, profile: Profile) -> bool:
        """`profile` (a reload changed its thread count) from now on: the model running is loaded again with
        its threads and swapped in between two items (same variant, same `seq`). True when it was; a model
        that no longer loads is logged and keeps running as it was."""
        with self._lock:
            old, self.profile = self.profile, profile
            loaded = self.pending or (None if self.runner is None or self.spec is None else
                                      (self.spec, self.model, self.runner, self.variant))
        if old.threads == profile.threads or loaded is None:
            return False
        spec, variant, held = loaded[0], loaded[3], self.base_check
        try:
            model, runner = self.prepare(spec)
            # Capture's base runner beside a variant (`base_check`) runs in the loop too: same threads.
            check = None if held is None else (held[0], self.prepare(held[0])[1])
        except LeptonError as exc:
            logger.error("pipeline %s: %s does not load with %d threads (%s); it keeps its %d", self.name,
                         spec.path.name, profile.threads, exc, old.threads)
            return False
        self.swap(spec, runner, model, variant)
        if check is not None and variant is not None:
            self.base_check = check
        return True

    def bind(self, stats: Counters, stopping: Callable[[], bool]) -> None:
        """A (new) loop runs this slot: its counters continue the previous loop's for `health`."""
        with self._lock:
            old = self._stats
            if old is not None and old is not stats:
                p, e, r = self._carried
                self._carried = (p + old.processed, e + old.errors, r + old.restarts)
            self._stats = stats
            self.stopping = stopping

    def health(self) -> LoopHealth:
        with self._lock:
            s, (p, e, r) = self._stats, self._carried
        if s is None:
            return LoopHealth(p, e, r, None)
        return LoopHealth(p + s.processed, e + s.errors, r + s.restarts, s.last_error)

    def model_ref(self) -> dict[str, Any]:
        """`{name, version}` of the running model, with `variant` (its file) when a cheaper variant runs."""
        assert self.spec is not None
        ref: dict[str, Any] = {"name": self.spec.name, "version": self.spec.version}
        if self.variant is not None:
            ref["variant"] = self.variant
        return ref

    # -- loading --------------------------------------------------------------------------------

    def configured_spec(self) -> ModelSpec:
        """The model a (re)start loads when nothing was swapped in (BadInput when the config's is bad, or
        when the pipeline names a delivered model the device has none of: `waiting_for`)."""
        delivered, source = self.settings.delivered, self.model_source
        if delivered is not None:
            spec = source(delivered) if source is not None else None
            if spec is None:
                raise BadInput(f"no model {delivered!r} delivered to this device yet")
            return spec
        assert self.settings.model is not None  # PipelineSettings: exactly one of model, delivered
        spec = load_spec(self.settings.model, self.settings.labels)
        return (source(spec.name) if source is not None else None) or spec

    def waiting_for(self) -> str | None:
        """The delivered model name a start would wait for (the store has no version of it); None: a
        start has a model to load."""
        delivered, source = self.settings.delivered, self.model_source
        if delivered is None or (source is not None and source(delivered) is not None):
            return None
        return delivered

    def prepare(self, spec: ModelSpec) -> tuple[Model, Runner]:
        """Load `spec` with this slot's backend, threads and task: ready to swap in (BadInput)."""
        # Never more interpreter threads than cores: oversubscribed XNNPACK threads spin against each other;
        # and a streaming task's tiny graphs take one whatever the profile says (tasks.task.TASK_THREADS).
        threads = interpreter_threads(spec, min(self.profile.threads, os.cpu_count() or 1), self.settings.task)
        model = Model(spec.path, backend=self.backend, threads=threads)
        return model, build_runner(model, spec, self.settings.task)

    def reset(self) -> None:
        """A fresh start asks `model_source` again (a rollback may have happened while stopped); only
        the loop's own restarts keep what was swapped in."""
        with self._lock:
            self._override, self.pending = None, None

    def load(self) -> Runner:
        """Load the model and its runner, in the loop's thread (BadInput when the files or the task are
        wrong): the swapped-in one if there was a swap, else the delivered one, else the config's."""
        with self._lock:
            override, self.pending = self._override, None
            spec, variant = override if override is not None else (self.configured_spec(), None)
        try:
            model, runner = self.prepare(spec)
        except LeptonError as exc:
            if self.settings.model is None:
                raise  # a delivered model only: there is no file of the config's to fall back to
            configured = load_spec(self.settings.model, self.settings.labels)
            if override is not None or spec.path == configured.path:
                raise
            # A delivered model that no longer loads must not keep the pipeline down: the config's still can.
            logger.error("pipeline %s: %s %s does not load (%s); running the configured model", self.name,
                         spec.name, spec.version, exc)
            spec = configured
            model, runner = self.prepare(spec)
        with self._lock:
            if override is None:
                self.base_spec = spec
            self._install((spec, model, runner, variant))
        return runner

    def _install(self, loaded: Loaded) -> None:
        self.spec, self.model, self.runner, self.variant = loaded
        runner = loaded[2]
        self.task_key = getattr(getattr(runner, "task", None), "key", None) or loaded[0].task

    # -- swaps (any thread) ---------------------------------------------------------------------

    def swap(self, spec: ModelSpec, runner: Runner, model: Model | None = None,
             variant: str | None = None) -> Callable[[], None]:
        """Install a loaded `runner` (for `spec`, with its `model`) between two items: the loop keeps its
        thread, source and `seq`; a restart reloads `spec`. Returns `undo`, which puts the previous model
        back the same way. `variant` names the variant file it is (None: the manifest's own model)."""
        with self._lock:
            generation = self.generation
            previous_override, previous_base = self._override, self.base_spec
            previous: Loaded | None = None
            if self.spec is not None and self.runner is not None:
                previous = (self.spec, self.model, self.runner, self.variant)
            if self.pending is not None:
                previous = self.pending  # swapped in and not taken yet: that is what would run
            self._override = (spec, variant)
            self.pending = (spec, model, runner, variant)
            if variant is None:
                self.base_spec, self.base_check = spec, None
        logger.info("pipeline %s: swapping in %s %s%s", self.name, spec.name, spec.version,
                    f" (variant {variant})" if variant else "")

        def undo() -> None:
            with self._lock:
                if self.generation == generation:
                    self._override, self.base_spec = previous_override, previous_base
                    self.pending = previous
                    logger.info("pipeline %s: swap undone", self.name)
                    return
                outdated = previous
            # The settings changed since (a reload): the old runner was built for them. Load the
            # previous model again with the current settings, if the slot still runs that model name.
            if outdated is None or self.spec is None or self.spec.name != spec.name:
                return
            model_, runner_ = self.prepare(outdated[0])
            with self._lock:
                self._override, self.base_spec = None, outdated[0]
                self.pending = (outdated[0], model_, runner_, None)
            logger.info("pipeline %s: swap undone (the previous model reloaded)", self.name)

        return undo

    def take(self) -> Loaded | None:
        """The loop's side: what was swapped in, now installed (None: nothing was)."""
        with self._lock:
            pending, self.pending = self.pending, None
            if pending is not None:
                self._install(pending)
        return pending

    @property
    def chosen_variant(self) -> str | None:
        """The variant swapped in (or about to be, at the next item); None: the base model."""
        override = self._override
        return None if override is None else override[1]

    def use_variant(self, variant: ModelVariant | None) -> None:
        """Load `variant` of the base model (None: the base itself) and swap it in (BadInput on bad files)."""
        base = self.base_spec or self.configured_spec()
        spec = base if variant is None else variant_spec(base, variant)
        model, runner = self.prepare(spec)
        check: tuple[ModelSpec, Runner] | None = None
        if variant is not None and self.keep_base:
            # A runner of its own, never the one the loop drove until now: that one may still be mid-item.
            held = self.base_check
            check = held if held is not None and held[0].path == base.path else (base, self.prepare(base)[1])
        self.swap(spec, runner, model, None if variant is None else variant.file)
        self.base_check = check

    # -- shadow trials and self-test samples ------------------------------------------------------

    def attach(self, observer: ItemObserver | None) -> None:
        """Let `observer` see every processed item from the next one on (None: stop)."""
        self.observer = observer

    def sample(self, timeout: float = SAMPLE_WAIT_S) -> Any:
        """A copy of the next item the loop processes, or None if none comes within `timeout`."""
        end = time.monotonic() + timeout
        if not self._sample_gate.acquire(timeout=timeout):
            return None
        try:
            self._sample, self._sample_ready = None, threading.Event()
            ready = self._sample_ready
            self.sample_wanted.set()
            while not ready.wait(min(0.1, max(0.0, end - time.monotonic()))):
                if self.stopping() or time.monotonic() >= end:
                    self.sample_wanted.clear()
                    return None
            return self._sample
        finally:
            self._sample_gate.release()

    def take_sample(self, data: Any) -> None:
        # Copied: sources may hand out views of buffers they reuse. Only when asked: the hot path copies nothing.
        self.sample_wanted.clear()
        self._sample = data.copy() if hasattr(data, "copy") else data
        self._sample_ready.set()
