"""A pipeline: source → runner (model + task) → result policy → spool, in its own thread.

The thread is its own supervisor: when the loop fails it logs the traceback, closes the
source, waits with exponential backoff and builds everything again; more than
`max_restarts` failures within `window_s` park it as `failed` (a `start` command or a reload
tries again). Configuration problems found while building (a model that is gone, a source
kind this agent lacks) park it at once: retrying cannot fix them. A finite source that
ends parks it as `finished`.

Threshold, fps and policy can be changed while it runs (`reconfigure`): the loop reads its
settings object each round, and settings objects are frozen, so a change is one assignment.

The governor acts through three more controls, all safe from any thread: `govern_fps()`
caps the fps below the configured one, `pause()`/`resume()` close and reopen a vision
source (an audio pipeline ignores both), and `swap_model()` installs another loaded model
between two items — the loop keeps its thread, its source and its `seq` — returning an
`undo` that puts the previous one back the same way (model delivery uses it too).
Latency of every item goes into fixed-size rings (`rings`) for the telemetry percentiles.

Model delivery adds: `health()`, the counters a probation window judges; `attach()`, an
observer (a shadow trial) that sees every item after the active runner; `sample()`, a copy
of a real item for a self-test. Which model a (re)start loads: the one swapped in last, else
what `model_source` says (the model store's active version), else the config's file; a
fresh `start()` forgets what was swapped in and asks again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.config import PipelineSettings, SupervisorSection
from agent.errors import BadInput, LeptonError
from agent.manifest import ModelSpec, load_spec
from agent.mqtt.topics import SCHEMA_VERSION
from agent.policy import PolicyStats, ResultPolicy
from agent.profiles import Profile
from agent.runtime import Model
from agent.sdnotify import Heartbeat, Watchdog
from agent.sources.base import EndOfStream, Source, open_source
from agent.tasks.base import Runner
from agent.telemetry import StageRings
from agent.variants import ModelVariant, variant_spec

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.25
"""Longest a loop waits on its source before looking at the stop flags again."""

# What each source kind feeds, and what a runner must take to be fed by it.
_SOURCE_ITEMS = {"frames": "image", "audio": "audio"}

Sink = Callable[[str, dict[str, Any]], None]
"""(pipeline name, result payload) → spooled for publishing."""

SAMPLE_WAIT_S = 2.0
"""`sample()` waits at most this long for the loop's next item."""


class ItemObserver(Protocol):
    """Sees every processed item after the active runner, in the loop's thread (a shadow trial)."""

    def observe(self, item: Any, results: list[dict[str, Any]], latency_ms: float) -> None: ...


@dataclass(frozen=True)
class LoopHealth:
    """Monotonic counters of the loop, for judging a model in probation."""

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


@dataclass
class PipelineStats:
    """What status reports about one pipeline."""

    state: str = "stopped"
    """starting | running | paused | restarting | stopped | failed | finished"""
    items: int = 0
    """Items read from the source."""
    processed: int = 0
    """Items run through the model."""
    skipped: int = 0
    """Items not processed because of the fps limit."""
    source_dropped: int = 0
    """Items the source itself dropped (stale frames replaced before they were read, audio overruns)."""
    pauses: int = 0
    """Times the governor paused the loop."""
    swaps: int = 0
    """Models swapped in while running (governor variants, deliveries)."""
    results: int = 0
    """Results handed to the spool."""
    restarts: int = 0
    errors: int = 0
    last_error: str | None = None
    fps: float = 0.0
    """Processed items per second, smoothed."""
    latency_ms: dict[str, float] = field(default_factory=dict)
    policy: PolicyStats = field(default_factory=PolicyStats)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["fps"] = round(self.fps, 2)
        d["policy"] = dict(self.policy.__dict__)
        return d


class RestartBudget:
    """Restarts allowed per window, and the backoff before each."""

    def __init__(self, settings: SupervisorSection) -> None:
        self.settings = settings
        self._times: collections.deque[float] = collections.deque()

    def next_delay(self, now: float) -> float | None:
        """The wait before restarting, or None when the budget for this window is spent."""
        window = self.settings.window_s
        while self._times and now - self._times[0] > window:
            self._times.popleft()
        if len(self._times) >= self.settings.max_restarts:
            return None
        self._times.append(now)
        return min(self.settings.backoff_max_s, self.settings.backoff_min_s * 2 ** (len(self._times) - 1))

    def reset(self) -> None:
        self._times.clear()


class Pipeline:
    """One supervised loop. `start()`, `halt()`, `join()`; `reconfigure()` while it runs."""

    def __init__(self, settings: PipelineSettings, *, profile: Profile, supervisor: SupervisorSection,
                 backend: str | None, sink: Sink, stop: threading.Event, ring_size: int = 512) -> None:
        self.settings = settings
        self.name = settings.name
        self.profile = profile
        self.backend = backend
        self.sink = sink
        self.stop = stop
        self.stats = PipelineStats()
        self.budget = RestartBudget(supervisor)
        self.spec: ModelSpec | None = None
        with contextlib.suppress(BadInput):  # reported when the loop starts
            self.spec = load_spec(settings.model, settings.labels)  # for status, before the model loads
        self.model: Model | None = None
        self.on_state: Callable[[], None] | None = None
        self.watchdog: Watchdog | None = None
        """When set, the loop registers a heartbeat and beats it each time round (systemd watchdog)."""
        self.heartbeat: Heartbeat | None = None
        """Called when the state changes to running, stopped, failed or finished (status is re-announced)."""
        self.task_key: str | None = None
        self.policy = ResultPolicy(settings.policy, settings.threshold, self.stats.policy)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._source: Source | None = None
        self.source_kind: str | None = None
        """`frames` or `audio`, known before the first start (None: the source cannot be built)."""
        with contextlib.suppress(BadInput):
            self.source_kind = open_source(settings.source, dict(settings.source_options)).kind
        self.rings = StageRings(ring_size)
        self.governed_fps: float | None = None
        """The governor's fps cap (None: not capped)."""
        self.variant: str | None = None
        """The variant file running instead of the manifest's own (None: the base model)."""
        self._paused = threading.Event()
        self._swap_lock = threading.Lock()
        self.base_spec: ModelSpec | None = self.spec
        """The model variants are cheaper versions of: the config's, or the last one swapped in as a base."""
        self._override: tuple[ModelSpec, str | None] | None = None
        self._pending: tuple[ModelSpec, Model | None, Runner, str | None] | None = None
        self._runner: Runner | None = None
        self._dropped_before = 0
        self.model_source: Callable[[ModelSpec], ModelSpec | None] | None = None
        """Given the config's model, the one to run instead when nothing was swapped in (the daemon
        returns the model store's active version of that name); None: the config's."""
        self._observer: ItemObserver | None = None
        self._sample_wanted = threading.Event()
        self._sample_ready = threading.Event()
        self._sample: Any = None

    # -- control (any thread) ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        with self._swap_lock:
            # A fresh start asks `model_source` again (a rollback may have happened while stopped);
            # only the loop's own restarts keep what was swapped in.
            self._override, self._pending = None, None
        self._halt.clear()
        self.budget.reset()
        self.stats.state = "starting"
        self._thread = threading.Thread(target=self._supervise, name=f"pipeline-{self.name}", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        """Ask the loop to stop (it notices within READ_TIMEOUT_S); `join` waits for it."""
        self._halt.set()
        source = self._source
        if source is not None:
            try:
                source.close()  # unblocks a source waiting for its next item
            except Exception:
                logger.exception("pipeline %s: closing the source failed", self.name)

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def reconfigure(self, threshold: float | None = None, fps: float | None = None,
                    policy: Any = None) -> PipelineSettings:
        """Apply new threshold / fps / policy settings to the running loop; returns the new settings."""
        update: dict[str, Any] = {}
        if threshold is not None:
            update["threshold"] = threshold
        if fps is not None:
            update["fps"] = fps
        if policy is not None:
            update["policy"] = policy
        settings = self.settings.model_copy(update=update)
        new_policy = ResultPolicy(settings.policy, settings.threshold, self.stats.policy).carry_over(self.policy)
        self.settings = settings
        self.policy = new_policy
        logger.info("pipeline %s: reconfigured (%s)", self.name, ", ".join(sorted(update)) or "nothing")
        return settings

    def describe(self) -> dict[str, Any]:
        s = self.settings
        d: dict[str, Any] = {"name": self.name, "state": self.stats.state, "source": s.source,
                             "task": self.task_key, "threshold": s.threshold, "fps": round(self.max_fps, 3)}
        if self.spec is not None:
            d["model"] = self.model_ref()
        return d

    def model_ref(self) -> dict[str, Any]:
        """`{name, version}` of the running model, with `variant` (its file) when a cheaper variant runs."""
        assert self.spec is not None
        ref: dict[str, Any] = {"name": self.spec.name, "version": self.spec.version}
        if self.variant is not None:
            ref["variant"] = self.variant
        return ref

    @property
    def configured_fps(self) -> float:
        """The fps the config (or a `configure` command) asks for, capped by the profile."""
        return min(self.settings.fps or self.profile.max_fps, self.profile.max_fps)

    @property
    def max_fps(self) -> float:
        """The fps the loop runs at most: the configured one, lowered by the governor."""
        governed = self.governed_fps
        return self.configured_fps if governed is None else min(self.configured_fps, governed)

    @property
    def vision(self) -> bool:
        return self.source_kind == "frames"

    # -- the governor's and delivery's controls (any thread) ------------------------------------

    def govern_fps(self, fps: float | None) -> None:
        """Cap the fps (None lifts the cap); takes effect at the next frame."""
        self.governed_fps = fps

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self) -> None:
        """Close a vision source and wait (the loop notices within READ_TIMEOUT_S); audio ignores it."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def prepare(self, spec: ModelSpec) -> tuple[Model, Runner]:
        """Load `spec` with this pipeline's backend, threads and task: ready to swap in (BadInput)."""
        # Never more interpreter threads than cores: oversubscribed XNNPACK threads spin against each other.
        model = Model(spec.path, backend=self.backend, threads=min(self.profile.threads, os.cpu_count() or 1))
        return model, build_runner(model, spec, self.settings.task)

    def swap_model(self, spec: ModelSpec, runner: Runner, model: Model | None = None,
                   variant: str | None = None) -> Callable[[], None]:
        """Install a loaded `runner` (for `spec`, with its `model`) between two items: the loop keeps its
        thread, source and `seq`; a restart reloads `spec`. Returns `undo`, which puts the previous model
        back the same way. `variant` names the variant file it is (None: the manifest's own model)."""
        with self._swap_lock:
            previous_override, previous_base = self._override, self.base_spec
            previous = None
            if self.spec is not None and self._runner is not None:
                previous = (self.spec, self.model, self._runner, self.variant)
            self._override = (spec, variant)
            self._pending = (spec, model, runner, variant)
            if variant is None:
                self.base_spec = spec
        logger.info("pipeline %s: swapping in %s %s%s", self.name, spec.name, spec.version,
                    f" (variant {variant})" if variant else "")

        def undo() -> None:
            with self._swap_lock:
                self._override, self.base_spec = previous_override, previous_base
                self._pending = previous
            logger.info("pipeline %s: swap undone", self.name)

        return undo

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
        self.swap_model(spec, runner, model, None if variant is None else variant.file)

    def _take_swap(self) -> Runner | None:
        with self._swap_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return None
        spec, model, runner, variant = pending
        another = self.spec is None or (self.spec.name, self.spec.version) != (spec.name, spec.version)
        self.spec, self.model, self.variant, self._runner = spec, model, variant, runner
        self.task_key = getattr(getattr(runner, "task", None), "key", None) or spec.task
        self.rings.clear()  # the percentiles describe the model that runs now
        self.stats.swaps += 1
        if another:
            # A fresh policy: the new model's first result goes out even when its labels are unchanged,
            # so whoever watches sees which model answers now; and the status names it.
            self.policy = ResultPolicy(self.settings.policy, self.settings.threshold, self.stats.policy)
            self._notify()
        return runner

    # -- model delivery's controls (any thread) ----------------------------------------------------

    @property
    def runner(self) -> Runner | None:
        """What the loop drives now (None before the first load)."""
        return self._runner

    def configured_spec(self) -> ModelSpec:
        """The model a (re)start loads when nothing was swapped in (BadInput when the config's is bad)."""
        spec = load_spec(self.settings.model, self.settings.labels)
        if self.model_source is not None:
            return self.model_source(spec) or spec
        return spec

    def health(self) -> LoopHealth:
        s = self.stats
        return LoopHealth(s.processed, s.errors, s.restarts, s.last_error)

    def attach(self, observer: ItemObserver | None) -> None:
        """Let `observer` see every processed item from the next one on (None: stop)."""
        self._observer = observer

    def sample(self, timeout: float = SAMPLE_WAIT_S) -> Any:
        """A copy of the next item the loop processes, or None if none comes within `timeout`."""
        self._sample, self._sample_ready = None, threading.Event()
        ready = self._sample_ready
        self._sample_wanted.set()
        end = time.monotonic() + timeout
        while not ready.wait(min(0.1, max(0.0, end - time.monotonic()))):
            if self._stopping() or time.monotonic() >= end:
                self._sample_wanted.clear()
                return None
        return self._sample

    def _take_sample(self, data: Any) -> None:
        # Copied: sources may hand out views of buffers they reuse. Only when asked: the hot path copies nothing.
        self._sample_wanted.clear()
        self._sample = data.copy() if hasattr(data, "copy") else data
        self._sample_ready.set()

    # -- the thread ----------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        changed = state != self.stats.state
        self.stats.state = state
        if changed and state in ("running", "paused", "stopped", "failed", "finished"):
            self._notify()

    def _notify(self) -> None:
        if self.on_state is not None:
            try:
                self.on_state()
            except Exception:
                logger.exception("pipeline %s: state callback failed", self.name)

    def _stopping(self) -> bool:
        return self.stop.is_set() or self._halt.is_set()

    @property
    def _watch_name(self) -> str:
        return f"pipeline:{self.name}"

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()

    def _supervise(self) -> None:
        try:
            self._supervise_loop()
        finally:
            if self.watchdog is not None:
                self.watchdog.unregister(self._watch_name)  # a loop that has ended cannot hang
            self.heartbeat = None

    def _backoff(self, delay: float) -> bool:
        """Wait `delay` unless halted; True when halted or stopping. Beats while it waits."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            self._beat()
            if self._halt.wait(min(left, 1.0)) or self.stop.is_set():
                return True
        return self.stop.is_set()

    def _supervise_loop(self) -> None:
        if self.watchdog is not None:
            self.heartbeat = self.watchdog.register(self._watch_name)
        while not self._stopping():
            try:
                self._run_once()
            except EndOfStream:
                if self._stopping():
                    break  # halt() closed the source under the loop
                self._set_state("finished")
                logger.info("pipeline %s: source finished", self.name)
                return
            except BadInput as exc:
                self._set_state("failed")
                self.stats.last_error = str(exc)
                self.stats.errors += 1
                logger.error("pipeline %s: %s", self.name, exc)
                return
            except Exception as exc:
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("pipeline %s: loop failed", self.name)
            else:
                break  # stopped on request
            finally:
                self._close_source()
            delay = self.budget.next_delay(time.monotonic())
            if delay is None:
                self._set_state("failed")
                logger.error("pipeline %s: %d restarts within %.0f s; parked as failed", self.name,
                             self.budget.settings.max_restarts, self.budget.settings.window_s)
                return
            self.stats.restarts += 1
            self._set_state("restarting")
            logger.info("pipeline %s: restarting in %.1f s", self.name, delay)
            if self._backoff(delay):
                break
        self._set_state("stopped")

    def _close_source(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            self._dropped_before += source.stats.dropped
            try:
                source.close()
            except Exception:
                logger.exception("pipeline %s: closing the source failed", self.name)

    def load(self) -> Runner:
        """Load the model and its runner (BadInput when the files or the task are wrong): the swapped-in
        one if there was a swap, else the delivered one (`model_source`), else the config's."""
        with self._swap_lock:
            override, self._pending = self._override, None
        spec, variant = override if override is not None else (self.configured_spec(), None)
        try:
            model, runner = self.prepare(spec)
        except LeptonError as exc:
            configured = load_spec(self.settings.model, self.settings.labels)
            if override is not None or spec.path == configured.path:
                raise
            # A delivered model that no longer loads must not keep the pipeline down: the config's still can.
            logger.error("pipeline %s: %s %s does not load (%s); running the configured model", self.name,
                         spec.name, spec.version, exc)
            spec = configured
            model, runner = self.prepare(spec)
        if override is None:
            self.base_spec = spec
        self.spec, self.model, self.variant, self._runner = spec, model, variant, runner
        self.task_key = getattr(getattr(runner, "task", None), "key", None) or spec.task
        return runner

    def _run_once(self) -> None:
        self._set_state("starting")
        runner = self.load()  # again on every restart: a fresh interpreter, and the files as they are now
        source = open_source(self.settings.source, dict(self.settings.source_options))
        wanted = _SOURCE_ITEMS.get(source.kind)
        if wanted is not None and runner.item_kind not in (wanted, "tensor"):
            raise BadInput(f"pipeline {self.name}: source {self.settings.source} gives {source.kind}, "
                           f"the model's task takes {runner.item_kind}")
        self._source = source
        self.source_kind = source.kind
        source.open()
        self._set_state("running")
        self._loop(source, runner)

    def _wait_paused(self, source: Source) -> None:
        """Paused by the governor: the source is closed until resumed (or stopped)."""
        self.stats.pauses += 1
        self.stats.fps = 0.0
        source.close()
        self._set_state("paused")
        logger.info("pipeline %s: paused", self.name)
        while self._paused.is_set() and not self._stopping():
            self._beat()  # paused on purpose is not hung: keep the systemd watchdog fed
            self._halt.wait(READ_TIMEOUT_S)
        if self._stopping():
            return
        source.open()
        self._set_state("running")
        logger.info("pipeline %s: resumed", self.name)

    def _loop(self, source: Source, runner: Runner) -> None:
        assert self.spec is not None
        model_ref = self.model_ref()
        frames = source.kind == "frames"
        rings = self.rings
        next_due = 0.0
        rate_t, rate_n = time.monotonic(), 0
        while not self._stopping():
            self._beat()
            if self._pending is not None:
                swapped = self._take_swap()
                if swapped is not None:
                    runner, model_ref = swapped, self.model_ref()
            if frames and self._paused.is_set():
                self._wait_paused(source)
                rate_t, rate_n = time.monotonic(), 0
                continue
            item = source.read(READ_TIMEOUT_S)
            if item is None:
                continue
            self.stats.items += 1
            self.stats.source_dropped = self._dropped_before + source.stats.dropped
            now = time.monotonic()
            if frames:
                interval = 1.0 / self.max_fps
                if now < next_due - 0.25 * interval:
                    self.stats.skipped += 1
                    continue
                next_due = max(next_due, now - 0.5 * interval) + interval
            results = runner.process(item.data)
            self.stats.processed += 1
            rate_n += 1
            if now - rate_t >= 1.0:
                self.stats.fps = 0.5 * self.stats.fps + 0.5 * rate_n / (now - rate_t)
                rate_t, rate_n = now, 0
            lat = runner.latency
            rings.add(lat.pre, lat.invoke, lat.post)
            latency = lat.as_dict()
            self.stats.latency_ms = latency
            if self._sample_wanted.is_set():
                self._take_sample(item.data)
            observer = self._observer
            if observer is not None:
                observer.observe(item.data, results, lat.pre + lat.invoke + lat.post)
            policy = self.policy
            for result in results:
                out = policy.apply(result, now, item.data if frames else None)
                if out is None:
                    continue
                payload = {"pipeline": self.name, "model": model_ref, "task": out.pop("task", self.task_key),
                           "latency_ms": latency, **out, "ts": round(item.ts, 3), "v": SCHEMA_VERSION}
                self.sink(self.name, payload)
                self.stats.results += 1
