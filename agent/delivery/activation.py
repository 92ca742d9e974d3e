"""Activation of a self-tested model in a running pipeline: hot swap, probation, rollback; and shadow trials.

The pipeline is reached only through callables the daemon gives, so this logic
is the same for a camera loop, an audio loop or a test loop:

- `swap(prepared) -> undo`: install `prepared.runner` between two items (the loop
  keeps its thread, its source and its `seq` counter) and return a function that
  puts the previous runner back the same way.
- `health() -> PipelineHealth`: counters the loop keeps anyway (items, errors,
  restarts). During the probation window a restart or error is a crash, and no new
  item for `stall_s` is a stall; either undoes the swap and rolls back.
- `attach(trial | None)`: for `--shadow`, the loop calls `trial.observe(item,
  results, latency_ms)` after its active runner on every item until detached.

The store records the model as on trial before the swap and as active only after
the window passes: an agent that dies during probation comes back on the previous
model (`ModelStore.begin_trial`, `DeliveryService.recover`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.delivery import failpoints
from agent.delivery.deploy_state import DeployState, State
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.selftest import Prepared
from agent.delivery.store import ModelStore, StoredModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineHealth:
    """Monotonic counters of one pipeline loop."""

    items: int
    """Items processed so far."""
    errors: int = 0
    """Items whose processing raised."""
    restarts: int = 0
    """Times the loop restarted itself."""
    last_error: str | None = None


Undo = Callable[[], None]
Swap = Callable[[Prepared], Undo]
Health = Callable[[], PipelineHealth]
Report = Callable[[DeployState], None]


@dataclass(frozen=True)
class ProbationSettings:
    window_s: float = 120.0
    """How long after the swap a crash or stall still rolls back (the profile's value)."""
    stall_s: float | None = 30.0
    """No new item for this long in the window is a stall; None: stalls are not judged."""
    poll_s: float = 0.5
    """How often health is read."""


class Activation:
    """Swap a prepared model in, watch it through the probation window, commit or roll back."""

    def __init__(self, store: ModelStore, *, swap: Swap | None, health: Health | None,
                 settings: ProbationSettings | None = None, report: Report | None = None,
                 stop: threading.Event | None = None) -> None:
        self.store = store
        self.swap = swap
        self.health = health
        self.settings = settings or ProbationSettings()
        self.report = report or (lambda state: None)
        self.stop = stop or threading.Event()

    def run(self, prepared: Prepared, request: str | None = None) -> StoredModel:
        """The model now active; DeliveryError after the previous model is back in place."""
        stored = prepared.stored
        previous = self.store.active(stored.name)

        def state(s: State, progress: float = 0.0) -> DeployState:
            return DeployState(stored.name, stored.version, s, progress, phase="probation",
                               active=previous.version if previous else None, request=request)

        if self.swap is None:
            # No pipeline runs this model name yet: nothing to watch, it is simply the one to load.
            self.store.activate(stored)
            failpoints.reach("after_activate", sha256=stored.sha256)
            return stored
        self.store.begin_trial(stored)
        self.report(state(State.ACTIVATING, 0.0))
        base = self.health() if self.health else None
        try:
            undo = self.swap(prepared)
        except Exception as exc:
            self.store.abort_trial(stored.name)
            raise DeliveryError(Reason.SWAP_FAILED, f"the pipeline refused the model: {exc}") from None
        try:
            try:
                self._probation(base, lambda p: self.report(state(State.ACTIVATING, p)))
            except DeliveryError:
                raise
            except Exception as exc:  # a health read that fails is a failed probation, never a swap left behind
                raise DeliveryError(Reason.PIPELINE_CRASHED, f"reading the pipeline's health failed: "
                                                             f"{type(exc).__name__}: {exc}") from None
        except DeliveryError as exc:
            if exc.reason is Reason.STOPPED:
                # Leave the trial recorded: the next start rolls back to the last known good.
                raise
            logger.warning("%s@%s: rolling back (%s)", stored.name, stored.version, exc)
            try:
                undo()
            finally:
                self.store.abort_trial(stored.name)
            raise
        try:
            self.store.commit_trial(stored.name)
        except DeliveryError as exc:
            # The index cannot say the new model is active (disk full): what runs must be what a restart
            # would run, so back to the last known good, like any failed probation.
            logger.warning("%s@%s: rolling back (%s)", stored.name, stored.version, exc)
            try:
                undo()
            finally:
                self.store.abort_trial(stored.name)
            raise
        failpoints.reach("after_activate", sha256=stored.sha256)
        return stored

    def _probation(self, base: PipelineHealth | None, progress: Callable[[float], None]) -> None:
        s = self.settings
        start = time.monotonic()
        last_items = base.items if base else 0
        last_change = start
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= s.window_s:
                return
            if self.stop.wait(min(s.poll_s, s.window_s - elapsed)):
                raise DeliveryError(Reason.STOPPED, "stopped during the probation window")
            if self.health is None or base is None:
                continue
            h = self.health()
            now = time.monotonic()
            if h.restarts > base.restarts or h.errors > base.errors:
                raise DeliveryError(Reason.PIPELINE_CRASHED,
                                    f"the pipeline failed {h.errors - base.errors} time(s) and restarted "
                                    f"{h.restarts - base.restarts} time(s) in probation: {h.last_error or '?'}")
            if h.items != last_items:
                last_items, last_change = h.items, now
            elif s.stall_s is not None and now - last_change >= s.stall_s:
                raise DeliveryError(Reason.PIPELINE_STALLED,
                                    f"no item for {now - last_change:.1f} s in the probation window")
            progress((now - start) / s.window_s)


# -- shadow trials ----------------------------------------------------------------


@dataclass(frozen=True)
class ShadowSpec:
    """When a shadow trial ends and what promotes the model (from the deploy command)."""

    items: int | None = 200
    """Items (frames or audio windows) to compare; None: run for `seconds`."""
    seconds: float | None = None
    """Wall-clock length of the trial; None: run for `items`."""
    min_agreement: float = 0.9
    """Fraction of items on which both models must give the same answer."""
    max_latency_ratio: float | None = 1.5
    """Candidate p95 latency / active p95 latency must not exceed this; None: not judged."""
    max_latency_ms: float | None = None
    """Candidate p95 latency in ms must not exceed this; None: not judged."""

    @classmethod
    def from_command(cls, data: dict[str, Any]) -> ShadowSpec:
        """From the `shadow` object of a deploy command; ValueError naming the field."""
        allowed = {"items", "seconds", "min_agreement", "max_latency_ratio", "max_latency_ms"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"shadow.{sorted(unknown)[0]}: unknown field")
        out: dict[str, Any] = {}
        for key in allowed & set(data):
            value = data[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"shadow.{key}: must be a non-negative number")
            out[key] = value
        if "items" in out and out["items"] is not None:
            out["items"] = int(out["items"])
            if out["items"] < 1:
                raise ValueError("shadow.items: must be at least 1")
        if "min_agreement" in out and not 0 <= out["min_agreement"] <= 1:
            raise ValueError("shadow.min_agreement: must be between 0 and 1")
        spec = cls(**out)
        if spec.items is None and spec.seconds is None:
            raise ValueError("shadow: give items or seconds")
        return spec


@dataclass(frozen=True)
class ShadowVerdict:
    items: int
    agreement: float
    active_p95_ms: float
    candidate_p95_ms: float
    promote: bool
    reason: Reason | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"items": self.items, "agreement": round(self.agreement, 4),
                "latency_ms": {"active_p95": round(self.active_p95_ms, 3),
                               "candidate_p95": round(self.candidate_p95_ms, 3)}}


def answer(results: list[dict[str, Any]]) -> Any:
    """What two models must agree on for one item, whatever the task."""
    out: list[tuple[Any, ...]] = []
    for r in results:
        if "classes" in r:
            out.append(("top", r["classes"][0]["label"] if r["classes"] else None))
        elif "detections" in r:
            out.append(("boxes", tuple(sorted(str(d.get("label")) for d in r["detections"]))))
        elif "event" in r:
            out.append(("event", r.get("event"), r.get("label")))
        elif "outputs" in r:
            out.append(("argmax", tuple(int(np.argmax(o["values"])) if o.get("values") else None
                                        for o in r["outputs"])))
        else:
            out.append(("other", tuple(sorted(k for k in r if k not in ("latency_ms", "seq", "ts")))))
    return tuple(out)


class ShadowTrial:
    """The candidate runs on the same items as the active runner, in the loop, until the trial is over."""

    MAX_SAMPLES = 10_000

    def __init__(self, prepared: Prepared, spec: ShadowSpec) -> None:
        self.prepared = prepared
        self.spec = spec
        n = min(spec.items or self.MAX_SAMPLES, self.MAX_SAMPLES)
        # Preallocated: observe() adds no allocation of its own to the loop beyond the candidate's results.
        self._active_ms = np.zeros(n, np.float64)
        self._candidate_ms = np.zeros(n, np.float64)
        self.items = 0
        self.agreed = 0
        self.errors = 0
        self.last_error: str | None = None
        self.done = threading.Event()
        self._started: float | None = None

    def observe(self, item: Any, active_results: list[dict[str, Any]], active_latency_ms: float) -> None:
        """Called by the pipeline loop after its active runner, with the same item; never raises."""
        if self.done.is_set():
            return
        now = time.monotonic()
        if self._started is None:
            self._started = now
        t0 = time.perf_counter()
        try:
            results = self.prepared.runner.process(item)
        except Exception as exc:
            self.errors += 1
            self.last_error = " ".join(str(exc).split())[:200]
            self.done.set()  # a model that fails on real items has lost the trial
            return
        took = (time.perf_counter() - t0) * 1000
        k = self.items % len(self._active_ms)
        self._active_ms[k], self._candidate_ms[k] = active_latency_ms, took
        self.items += 1
        if answer(results) == answer(active_results):
            self.agreed += 1
        if (self.spec.items is not None and self.items >= self.spec.items) or (
                self.spec.seconds is not None and now - self._started >= self.spec.seconds):
            self.done.set()

    @property
    def progress(self) -> float:
        if self.spec.items is not None:
            return min(1.0, self.items / self.spec.items)
        if self._started is None or not self.spec.seconds:
            return 0.0
        return min(1.0, (time.monotonic() - self._started) / self.spec.seconds)

    def verdict(self) -> ShadowVerdict:
        n = min(self.items, len(self._active_ms))
        agreement = self.agreed / self.items if self.items else 0.0
        a95 = float(np.percentile(self._active_ms[:n], 95)) if n else 0.0
        c95 = float(np.percentile(self._candidate_ms[:n], 95)) if n else 0.0

        def verdict(promote: bool, reason: Reason | None, detail: str) -> ShadowVerdict:
            return ShadowVerdict(self.items, agreement, a95, c95, promote, reason, detail)

        s = self.spec
        if self.errors:
            return verdict(False, Reason.PIPELINE_CRASHED, f"the candidate failed on a real item: {self.last_error}")
        if self.items == 0:
            return verdict(False, Reason.PIPELINE_STALLED, "no item reached the shadow trial")
        if agreement < s.min_agreement:
            return verdict(False, Reason.SHADOW_AGREEMENT,
                           f"agreed on {agreement:.1%} of {self.items} items, {s.min_agreement:.1%} required")
        if s.max_latency_ms is not None and c95 > s.max_latency_ms:
            return verdict(False, Reason.SHADOW_LATENCY, f"p95 {c95:.2f} ms is over {s.max_latency_ms:g} ms")
        if s.max_latency_ratio is not None and a95 > 0 and c95 / a95 > s.max_latency_ratio:
            return verdict(False, Reason.SHADOW_LATENCY,
                           f"p95 {c95:.2f} ms is {c95 / a95:.2f}x the active {a95:.2f} ms, "
                           f"{s.max_latency_ratio:g}x allowed")
        return verdict(True, None, f"agreed on {agreement:.1%} of {self.items} items")


Attach = Callable[[ShadowTrial | None], None]


def run_shadow(trial: ShadowTrial, attach: Attach, stop: threading.Event, timeout_s: float,
               progress: Callable[[float], None] | None = None, poll_s: float = 0.5) -> ShadowVerdict:
    """Attach the trial to the loop, wait until it is over (or `timeout_s`), detach, judge."""
    attach(trial)
    try:
        deadline = time.monotonic() + timeout_s
        while not trial.done.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if stop.wait(min(poll_s, remaining)):
                raise DeliveryError(Reason.STOPPED, "stopped during the shadow trial")
            if progress is not None:
                progress(trial.progress)
    finally:
        attach(None)
    return trial.verdict()
