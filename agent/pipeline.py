"""A pipeline: source → runner (model + task) → result policy → spool, in its own thread.

A pipeline is three parts, each in its own module:

- its model slot (`agent.slot.ModelSlot`): which model runs, swaps and their undo, under one
  lock; the governor, model delivery and reload talk to it, not to the loop;
- its supervisor (`agent.supervisor.Supervisor`): the thread, restarts with backoff, state;
- the item loop (`agent.loop.run_items`), shared with `lepton-agent infer` and the audio path.

This module joins them and adds what is the daemon's own around each item (`LoopControl`):
the systemd heartbeat, taking a swap between two items, the governor's pause, the fps limit,
the counters and latency rings, the self-test sample and shadow observer, and the result
policy before the spool.

Threshold, fps and policy can be changed while it runs (`reconfigure`): the loop reads its
settings object each round, and settings objects are frozen, so a change is one assignment;
a new fps applies from the next frame on. The governor caps the fps (`govern_fps`) and
pauses a vision source (`pause`/`resume`: the source is closed until resumed; an audio
pipeline ignores both).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config import Effective, PipelineSettings, SupervisorSection
from agent.errors import BadInput, LeptonError
from agent.loop import READ_TIMEOUT_S, run_items
from agent.manifest import ModelSpec, load_spec
from agent.mqtt.topics import SCHEMA_VERSION
from agent.policy import ResultPolicy, snapshot_encoder
from agent.profiles import Profile
from agent.runtime import Model
from agent.samples.capturer import CaptureWriter, PipelineCapture
from agent.sdnotify import Watchdog
from agent.slot import ItemObserver, LoopHealth, ModelSlot, build_runner
from agent.sources.capture import redact
from agent.sources.source import Item, Source, open_source
from agent.supervisor import STOP_WAIT_S, PipelineStats, Supervisor
from agent.tasks.task import Runner
from agent.telemetry import StageRings

logger = logging.getLogger(__name__)

# What each source kind feeds, and what a runner must take to be fed by it.
_SOURCE_ITEMS = {"frames": "image", "audio": "audio"}

Sink = Callable[[str, dict[str, Any]], None]
"""(pipeline name, result payload) → spooled for publishing."""

__all__ = ["READ_TIMEOUT_S", "ItemObserver", "LoopHealth", "ModelSlot", "Pipeline", "PipelineStats", "Sink",
           "build_runner", "check_pipelines"]


def check_pipelines(eff: Effective) -> None:
    """Each pipeline's model, labels, source kind and snapshot support, without loading a model."""
    where = f"{eff.path}: " if eff.path else ""
    for i, p in enumerate(eff.config.pipelines):
        try:
            if p.model is not None:  # a delivered model (`delivered`) comes checked by its deployment
                load_spec(p.model, p.labels)
            elif not eff.config.delivery.enabled:
                raise BadInput(f"delivered = {p.delivered!r} needs [delivery] enabled = true (nothing else "
                               f"brings the model)")
            open_source(p.source, dict(p.source_options))
            if p.policy.snapshot.enabled:
                snapshot_encoder()
        except BadInput as exc:
            raise BadInput(f"{where}pipelines[{i}] ({p.name}): {exc}") from None


class Pipeline:
    """One supervised loop over a model slot. `start()`, `halt()`, `join()`; `reconfigure()` while it runs."""

    def __init__(self, settings: PipelineSettings, *, profile: Profile, supervisor: SupervisorSection,
                 backend: str | None, sink: Sink, stop: threading.Event, ring_size: int = 512,
                 slot: ModelSlot | None = None, capture: CaptureWriter | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        self.profile = profile
        self.backend = backend
        self.sink = sink
        self.stop = stop
        self.stats = PipelineStats()
        self.slot = slot if slot is not None else ModelSlot(settings, profile=profile, backend=backend)
        """The model this pipeline runs; a reload passes the same slot to the pipeline that replaces this one."""
        if slot is not None:
            slot.configure(settings)
        self.supervisor = Supervisor(self.name, supervisor, self.stats, stop, run_once=self._run_once,
                                     after_run=self._close_source)
        self.slot.bind(self.stats, self.supervisor.stopping)
        self.policy = ResultPolicy(settings.policy, settings.threshold, self.stats.policy)
        self._source: Source | None = None
        self.source_kind: str | None = None
        """`frames` or `audio`, known before the first start (None: the source cannot be built)."""
        with contextlib.suppress(BadInput):  # reported when the loop starts
            self.source_kind = open_source(settings.source, dict(settings.source_options)).kind
        self.rings = StageRings(ring_size)
        self.capture: PipelineCapture | None = None
        """Sample capture (`[pipelines.capture]`), None unless enabled."""
        if settings.capture.enabled and capture is not None:
            self.capture = PipelineCapture(self.name, settings.capture, capture, audio=self.source_kind == "audio")
        self.slot.keep_base = self.capture is not None and settings.capture.variant_checks_per_minute > 0
        if not self.slot.keep_base:
            self.slot.base_check = None  # a reload that turned the checks off frees the base loaded for them
        self.governed_fps: float | None = None
        """The governor's fps cap (None: not capped)."""
        self._paused = threading.Event()
        self._starting = threading.Lock()
        """`start` and a deployment's `start` of a waiting pipeline, one at a time."""
        self._dropped_before = 0
        # The loop's own state between items (its thread only).
        self._runner: Runner | None = None
        self._model_ref: dict[str, Any] = {}
        self._frames = False
        self._next_due = 0.0
        self._now = 0.0
        self._rate_t, self._rate_n = 0.0, 0
        self._limit_fps: Callable[[float | None], None] | None = None
        self._limited: float | None = None

    # -- control (any thread) ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.supervisor.running

    @property
    def on_state(self) -> Callable[[], None] | None:
        """Called when the state changes to running, paused, stopped, failed, finished or waiting_for_model."""
        return self.supervisor.on_state

    @on_state.setter
    def on_state(self, callback: Callable[[], None] | None) -> None:
        self.supervisor.on_state = callback

    @property
    def watchdog(self) -> Watchdog | None:
        return self.supervisor.watchdog

    @watchdog.setter
    def watchdog(self, watchdog: Watchdog | None) -> None:
        self.supervisor.watchdog = watchdog

    def start(self, wait_s: float = STOP_WAIT_S) -> None:
        """Start the loop on the slot's configured model; LeptonError when a halted loop has not ended
        within `wait_s` (starting nothing then, rather than reporting a start that did not happen).

        A pipeline naming a delivered model the store has none of starts no thread: it is `waiting_for_model`
        (no restarts spent, not an error) until the daemon starts it again once a deployment is active."""
        with self._starting:
            if self.slot.waiting_for() is not None and not (self.running and not self.supervisor.halted.is_set()):
                if not self.supervisor.join(wait_s):
                    raise LeptonError(f"pipeline {self.name}: still stopping (its current item has not ended); "
                                      f"start it again once it has stopped")
                self.supervisor.set_state("waiting_for_model")
                # Asked again after saying so: a deployment activated in between sees the state and starts us.
                if self.slot.waiting_for() is not None:
                    logger.info("pipeline %s: waiting for a deployment of model %s", self.name,
                                self.settings.delivered)
                    return
            self.supervisor.start(wait_s, before=self.slot.reset)

    @property
    def waiting(self) -> bool:
        """Waiting for a deployment of its delivered model (see `start`)."""
        return self.stats.state == "waiting_for_model"

    def halt(self) -> None:
        """Ask the loop to stop (it notices within READ_TIMEOUT_S); `join` waits for it."""
        if self.waiting:
            self.supervisor.set_state("stopped")  # stopped on purpose: a deployment does not start it
        self.supervisor.halt()
        source = self._source
        if source is not None:
            try:
                source.close()  # unblocks a source waiting for its next item
            except Exception:
                logger.exception("pipeline %s: closing the source failed", self.name)

    def join(self, timeout: float) -> bool:
        return self.supervisor.join(timeout)

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
        d: dict[str, Any] = {"name": self.name, "state": self.stats.state, "source": redact(s.source),
                             "task": self.slot.task_key, "threshold": s.threshold, "fps": round(self.max_fps, 3)}
        if s.delivered is not None:
            d["delivered"] = s.delivered
        if self.slot.spec is not None:
            d["model"] = self.slot.model_ref()
        model = self.slot.model
        if model is not None:
            d["threads"] = model.threads  # the interpreter's, as built: a reload may change the profile's
        return d

    def source_status(self) -> dict[str, Any] | None:
        """The live source's own state (connected, reconnecting since, reopens, errors); None for a source
        without one (files, audio) or while no source is open."""
        status = getattr(self._source, "status", None)
        return status() if callable(status) else None

    # What runs, as the slot says (status, telemetry, delivery's choice of pipelines).

    @property
    def spec(self) -> ModelSpec | None:
        return self.slot.spec

    @property
    def model(self) -> Model | None:
        return self.slot.model

    @property
    def runner(self) -> Runner | None:
        return self.slot.runner

    @property
    def variant(self) -> str | None:
        return self.slot.variant

    @property
    def chosen_variant(self) -> str | None:
        return self.slot.chosen_variant

    @property
    def task_key(self) -> str | None:
        return self.slot.task_key

    def health(self) -> LoopHealth:
        return self.slot.health()

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

    # -- the governor's controls (any thread) -------------------------------------------------------

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

    # -- the thread ----------------------------------------------------------------------------

    def _close_source(self) -> None:
        if self.capture is not None:
            self.capture.flush()  # a clip still waiting for its post-roll keeps what the source gave
        source, self._source = self._source, None
        if source is not None:
            self._dropped_before += source.stats.dropped
            try:
                source.close()
            except Exception:
                logger.exception("pipeline %s: closing the source failed", self.name)

    def _run_once(self) -> None:
        self.supervisor.set_state("starting")
        runner = self.slot.load()  # again on every restart: a fresh interpreter, and the files as they are now
        source = open_source(self.settings.source, dict(self.settings.source_options))
        wanted = _SOURCE_ITEMS.get(source.kind)
        if wanted is not None and runner.item_kind not in (wanted, "tensor"):
            raise BadInput(f"pipeline {self.name}: source {redact(self.settings.source)} gives {source.kind}, "
                           f"the model's task takes {runner.item_kind}")
        self._source = source
        self.source_kind = source.kind
        source.open()
        self.supervisor.set_state("running")
        self._runner, self._model_ref = runner, self.slot.model_ref()
        self._frames = source.kind == "frames"
        self._next_due = 0.0
        self._rate_t, self._rate_n = time.monotonic(), 0
        # A capture thread converts no more frames than the loop will take (see `between`).
        self._limit_fps, self._limited = getattr(source, "limit_fps", None), None
        run_items(source, runner, self._emit, stopping=self.supervisor.stopping, control=self)

    def _wait_paused(self, source: Source) -> None:
        """Paused by the governor: the source is closed until resumed (or stopped)."""
        self.stats.pauses += 1
        self.stats.fps = 0.0
        source.close()
        self.supervisor.set_state("paused")
        logger.info("pipeline %s: paused", self.name)
        halted = self.supervisor.halted
        while self._paused.is_set() and not self.supervisor.stopping():
            self.supervisor.beat()  # paused on purpose is not hung: keep the systemd watchdog fed
            halted.wait(READ_TIMEOUT_S)
        if self.supervisor.stopping():
            return
        source.open()
        self.supervisor.set_state("running")
        logger.info("pipeline %s: resumed", self.name)

    # LoopControl: the daemon's work around each item, in the loop's thread.

    def between(self) -> Runner | None:
        self.supervisor.beat()
        if self.slot.pending is not None:
            self._take_swap()
        if self._frames and self._paused.is_set():
            assert self._source is not None
            self._wait_paused(self._source)
            self._rate_t, self._rate_n = time.monotonic(), 0
            return None
        now = time.monotonic()
        if now - self._rate_t >= 1.0:
            self._update_fps(now)  # also when no frame comes (a camera that is gone): the fps falls to zero
        if self._limit_fps is not None and self._limited != self.max_fps:
            self._limited = self.max_fps
            self._limit_fps(self._limited)
        return self._runner

    def _update_fps(self, now: float) -> None:
        # Smoothed while frames come; zero at once when a whole second brought none.
        n = self._rate_n
        self.stats.fps = 0.5 * self.stats.fps + 0.5 * n / (now - self._rate_t) if n else 0.0
        self._rate_t, self._rate_n = now, 0

    def _take_swap(self) -> None:
        before = self.slot.spec
        taken = self.slot.take()
        if taken is None:
            return
        spec, runner = taken[0], taken[2]
        self._runner, self._model_ref = runner, self.slot.model_ref()
        self.rings.clear()  # the percentiles describe the model that runs now
        self.stats.swaps += 1
        if before is None or (before.name, before.version) != (spec.name, spec.version):
            # A fresh policy: the new model's first result goes out even when its labels are unchanged,
            # so whoever watches sees which model answers now; and the status names it.
            self.policy = ResultPolicy(self.settings.policy, self.settings.threshold, self.stats.policy)
            self.supervisor.notify()

    def admit(self, item: Item) -> bool:
        stats = self.stats
        stats.items += 1
        source = self._source
        if source is not None:
            stats.source_dropped = self._dropped_before + source.stats.dropped
        self._now = now = time.monotonic()
        if not self._frames:
            return True
        interval = 1.0 / self.max_fps
        if self._next_due - now > interval:
            self._next_due = now  # a lower fps set before must not hold back the one set now
        if now < self._next_due - 0.25 * interval:
            stats.skipped += 1
            return False
        self._next_due = max(self._next_due, now - 0.5 * interval) + interval
        return True

    def _emit(self, item: Item, results: list[dict[str, Any]], runner: Runner) -> None:
        stats = self.stats
        now = self._now  # when the item was read: the fps and the policy's clock
        stats.processed += 1
        self._rate_n += 1
        if now - self._rate_t >= 1.0:
            self._update_fps(now)
        lat = runner.latency
        pre, invoke, post = lat.pre, lat.invoke, lat.post
        self.rings.add(pre, invoke, post)
        stats.latency = (pre, invoke, post)
        latency: dict[str, float] | None = None  # rounded only for a result that goes out
        slot = self.slot
        if slot.sample_wanted.is_set():
            slot.take_sample(item.data)
        observer = slot.observer
        disagreed = False
        if observer is not None:
            # A shadow trial counts items and agreements; an observer that does not cannot disagree.
            seen, agreed = getattr(observer, "items", 0), getattr(observer, "agreed", 0)
            observer.observe(item.data, results, pre + invoke + post)
            disagreed = getattr(observer, "items", 0) > seen and getattr(observer, "agreed", 0) == agreed
        capture = self.capture
        if capture is not None:
            base = None
            if "variant" in self._model_ref:
                held = slot.base_check
                base = held[1] if held is not None and held[1] is not runner else None
            capture.observe(item, results, runner, self._model_ref, disagreed, base)
        if slot.pacing:
            slot.item_done.set()
        policy = self.policy
        frames = self._frames
        for result in results:
            out = policy.apply(result, now, item.data if frames else None)
            if out is None:
                continue
            if latency is None:
                latency = stats.latency_ms
            payload = {"pipeline": self.name, "model": self._model_ref, "task": out.pop("task", slot.task_key),
                       "latency_ms": latency, **out, "ts": round(item.ts, 3), "v": SCHEMA_VERSION}
            self.sink(self.name, payload)
            stats.results += 1
