"""The supervisor of one pipeline: its thread, its restarts with backoff, and its state.

When a run fails it logs the traceback, lets the pipeline close its source, waits with
exponential backoff and runs again; more than `max_restarts` failures within `window_s`
park it as `failed` (a `start` command or a reload tries again). Configuration problems
(BadInput: a model that is gone, a source kind this agent lacks) park it at once: retrying
cannot fix them. A finite source that ends (EndOfStream) parks it as `finished`.

`start()` while a halted run is still ending waits for it (at most `wait_s`) and then starts
afresh; if it has not ended by then it raises instead of pretending to have started.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import SupervisorSection
from agent.errors import BadInput, LeptonError
from agent.policy import PolicyStats
from agent.sdnotify import Heartbeat, Watchdog
from agent.sources.source import EndOfStream

logger = logging.getLogger(__name__)

STOP_WAIT_S = 3.0
"""How long `start()` waits for a halted run to end before it refuses."""

NOTIFIED_STATES = frozenset({"running", "paused", "stopped", "failed", "finished", "waiting_for_model"})
"""States whose change is announced (status is re-published)."""


@dataclass
class PipelineStats:
    """What status reports about one pipeline."""

    state: str = "stopped"
    """starting | running | paused | restarting | stopped | failed | finished | waiting_for_model (names a
    delivered model the device has none of yet: no thread, started when a deployment of it is active)"""
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
    latency: tuple[float, float, float] | None = None
    """The last item's (pre, invoke, post) ms: stored per item as they are, rounded into `latency_ms` only
    when status asks (a dict of three rounded floats per frame was most of the loop's own cost)."""
    policy: PolicyStats = field(default_factory=PolicyStats)

    @property
    def latency_ms(self) -> dict[str, float]:
        if self.latency is None:
            return {}
        pre, invoke, post = self.latency
        return {"pre": round(pre, 3), "invoke": round(invoke, 3), "post": round(post, 3)}

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        del d["latency"]
        d["fps"] = round(self.fps, 2)
        d["latency_ms"] = self.latency_ms
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


class Supervisor:
    """Runs `run_once` in a thread until halted, restarting it as above; keeps `stats.state`."""

    def __init__(self, name: str, settings: SupervisorSection, stats: PipelineStats, stop: threading.Event, *,
                 run_once: Callable[[], None], after_run: Callable[[], None]) -> None:
        self.name = name
        self.stats = stats
        self.stop = stop
        self.budget = RestartBudget(settings)
        self._run_once = run_once
        self._after_run = after_run
        self.halted = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_state: Callable[[], None] | None = None
        """Called when the state changes to running, paused, stopped, failed, finished or waiting_for_model."""
        self.watchdog: Watchdog | None = None
        """When set, the thread registers a heartbeat and beats it each time round (systemd watchdog)."""
        self.heartbeat: Heartbeat | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stopping(self) -> bool:
        return self.stop.is_set() or self.halted.is_set()

    def start(self, wait_s: float = STOP_WAIT_S, before: Callable[[], None] | None = None) -> None:
        """Start the thread (a no-op when it runs and was not halted); LeptonError when a halted run
        does not end within `wait_s`. `before` runs just before a fresh thread starts."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            if not self.halted.is_set():
                return
            thread.join(wait_s)
            if thread.is_alive():
                raise LeptonError(f"pipeline {self.name}: still stopping (its current item has not ended); "
                                  f"start it again once it has stopped")
        if before is not None:
            before()
        self.halted.clear()
        self.budget.reset()
        self.stats.state = "starting"
        self._thread = threading.Thread(target=self._supervise, name=f"pipeline-{self.name}", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        self.halted.set()

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    # -- state ----------------------------------------------------------------------------------

    def set_state(self, state: str) -> None:
        changed = state != self.stats.state
        self.stats.state = state
        if changed and state in NOTIFIED_STATES:
            self.notify()

    def notify(self) -> None:
        if self.on_state is not None:
            try:
                self.on_state()
            except Exception:
                logger.exception("pipeline %s: state callback failed", self.name)

    def beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()

    # -- the thread -------------------------------------------------------------------------------

    @property
    def _watch_name(self) -> str:
        return f"pipeline:{self.name}"

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
            self.beat()
            if self.halted.wait(min(left, 1.0)) or self.stop.is_set():
                return True
        return self.stop.is_set()

    def _supervise_loop(self) -> None:
        if self.watchdog is not None:
            self.heartbeat = self.watchdog.register(self._watch_name)
        while not self.stopping():
            try:
                self._run_once()
            except EndOfStream:
                if self.stopping():
                    break  # halt() closed the source under the loop
                self.set_state("finished")
                logger.info("pipeline %s: source finished", self.name)
                return
            except BadInput as exc:
                self.set_state("failed")
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
                self._after_run()
            delay = self.budget.next_delay(time.monotonic())
            if delay is None:
                self.set_state("failed")
                logger.error("pipeline %s: %d restarts within %.0f s; parked as failed", self.name,
                             self.budget.settings.max_restarts, self.budget.settings.window_s)
                return
            self.stats.restarts += 1
            self.set_state("restarting")
            logger.info("pipeline %s: restarting in %.1f s", self.name, delay)
            if self._backoff(delay):
                break
        self.set_state("stopped")
