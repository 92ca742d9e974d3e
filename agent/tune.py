"""On-device tuning (issue 20): each pipeline runs the cheapest model variant that meets its budget.

The operator's `model compare` measures variants on the operator's machine; the figures that
decide differ on a Pi's cores (int8 is slower than float on x86 at one thread, usually faster
on Cortex-A). So the device measures every variant of its model itself, on its own recent
inputs, with its own thread count, and picks:

- the budget (`Budget`): `latency_budget_ms` (p95 per item), `min_agreement` with the base
  model (the shadow trial's answer per item, `agent.delivery.activation.answer`) and
  optionally `max_rss_mb`; a pipeline's keys override its profile's defaults. A pipeline
  is tuned when its model's manifest lists `variants` and a latency budget applies.
- the rule (`choose`): among the variants meeting all of the budget, the cheapest (lowest
  p50 latency: the CPU an item costs here; RSS breaks ties). Nothing meets it: the fastest
  (lowest p95) of those meeting `min_agreement`, and the table says so (`fallback`).
- the measurement (`measure`): `TUNE_ITEMS` recent items copied from the loop between its
  own items (`ModelSlot.sample`), each variant loaded and run `TUNE_ROUNDS` times over them,
  one measured item right after each of the loop's own (`ModelSlot.pacing`: in the gap before
  its next frame), in a niced thread; RSS is the agent's growth while the variant is loaded.
- the swap goes through the slot (`ModelSlot.use_variant`): between two items, no gap in `seq`.

`Tuner` runs tunes one at a time in its own thread: when a tunable pipeline first runs or its
base model changes (a deploy), on a `tune` command, and when the governor's pressure level
changes. The last table per pipeline is in `status` (`tune`) and telemetry (`tune_summary`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.delivery.activation import answer
from agent.errors import LeptonError
from agent.manifest import ModelSpec
from agent.variants import ModelVariant, all_variants, variant_spec

if TYPE_CHECKING:
    from agent.pipeline import Pipeline

logger = logging.getLogger(__name__)

TUNE_ITEMS = 8
"""Distinct recent items taken from the loop for a tune."""
TUNE_ROUNDS = 3
"""Times each variant runs over those items: TUNE_ITEMS x TUNE_ROUNDS timed items per variant."""
TUNE_NICE = 10
"""The tuner thread's niceness: it measures in the time the loop leaves."""
PACE_WAIT_S = 0.5
"""Longest a measured item waits for the loop to finish one of its own (a busy or idle loop: go on)."""
SAMPLE_TIMEOUT_S = 5.0
"""Longest wait for one item of the loop; none comes (a paused or stopped loop): the tune fails."""
POLL_S = 1.0
"""How often the tuner looks for pipelines that need a tune (first run, a new base model)."""


@dataclass(frozen=True)
class Budget:
    """What a pipeline asks of its model on this device."""

    latency_budget_ms: float
    min_agreement: float
    max_rss_mb: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"latency_budget_ms": self.latency_budget_ms, "min_agreement": self.min_agreement,
                "max_rss_mb": self.max_rss_mb}


def budget_of(pipeline: Pipeline) -> Budget | None:
    """The pipeline's budget (its keys, else its profile's); None: no latency budget, not tuned."""
    s, p = pipeline.settings, pipeline.profile
    latency = s.latency_budget_ms if s.latency_budget_ms is not None else p.latency_budget_ms
    if latency is None:
        return None
    agreement = s.min_agreement if s.min_agreement is not None else p.min_agreement
    rss = s.max_rss_mb if s.max_rss_mb is not None else p.max_rss_mb
    return Budget(latency, agreement, rss)


@dataclass
class Row:
    """One variant as measured here (`variant` None: the base model)."""

    variant: str | None
    file: str
    items: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    agreement: float | None = None
    rss_mb: float | None = None
    error: str | None = None
    misses: list[str] = field(default_factory=list)
    """Which budget terms it misses: `latency`, `agreement`, `rss`, `error`."""

    def as_dict(self, chosen: bool) -> dict[str, Any]:
        def r(x: float | None, n: int = 3) -> float | None:
            return None if x is None else round(x, n)

        return {"variant": self.variant, "file": self.file, "items": self.items, "p50_ms": r(self.p50_ms),
                "p95_ms": r(self.p95_ms), "agreement": r(self.agreement, 4), "rss_mb": r(self.rss_mb, 2),
                "error": self.error, "misses": list(self.misses), "chosen": chosen}


def _misses(row: Row, budget: Budget) -> list[str]:
    if row.error is not None or row.p95_ms is None:
        return ["error"]
    out = []
    if row.p95_ms > budget.latency_budget_ms:
        out.append("latency")
    if row.agreement is None or row.agreement < budget.min_agreement:
        out.append("agreement")
    if budget.max_rss_mb is not None and (row.rss_mb or 0.0) > budget.max_rss_mb:
        out.append("rss")
    return out


def choose(rows: list[Row], budget: Budget) -> tuple[int, bool, str]:
    """(index of the chosen row, whether it meets the whole budget, why). Rows: the base first."""
    for row in rows:
        row.misses = _misses(row, budget)
    meeting = [i for i, row in enumerate(rows) if not row.misses]
    if meeting:
        best = min(meeting, key=lambda i: (rows[i].p50_ms or 0.0, rows[i].rss_mb or 0.0))
        row = rows[best]
        return best, True, (f"cheapest meeting the budget: p50 {row.p50_ms:.2f} ms, p95 {row.p95_ms:.2f} ≤ "
                            f"{budget.latency_budget_ms:g} ms, agreement {row.agreement:.3f} ≥ "
                            f"{budget.min_agreement:g}")
    agreeing = [i for i, row in enumerate(rows) if "error" not in row.misses and "agreement" not in row.misses]
    if agreeing:
        best = min(agreeing, key=lambda i: rows[i].p95_ms or 0.0)
        row = rows[best]
        return best, False, (f"nothing meets the budget; the fastest agreeing ≥ {budget.min_agreement:g}: "
                             f"p95 {row.p95_ms:.2f} ms > {budget.latency_budget_ms:g} ms"
                             if "latency" in row.misses else
                             f"nothing meets the budget; the fastest agreeing ≥ {budget.min_agreement:g} "
                             f"misses {', '.join(row.misses)}")
    return 0, False, f"no variant agrees ≥ {budget.min_agreement:g} with the base; the base model"


def rss_mb() -> float:
    """The agent's resident memory (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def measure(pipeline: Pipeline, inputs: list[Any], rounds: int = TUNE_ROUNDS,
            stop: threading.Event | None = None) -> list[Row]:
    """Every variant of the pipeline's base model on `inputs`, in this thread: the base first. LeptonError
    when `stop` is set meanwhile."""
    slot = pipeline.slot
    base = slot.base_spec or slot.configured_spec()

    def between() -> None:
        """Wait until the loop has just finished an item: the next one is a frame period away."""
        slot.item_done.clear()
        slot.item_done.wait(PACE_WAIT_S)

    slot.pacing = True
    try:
        return _measure(pipeline, base, inputs, rounds, stop, between)
    finally:
        slot.pacing = False


def _measure(pipeline: Pipeline, base: ModelSpec, inputs: list[Any], rounds: int, stop: threading.Event | None,
             between: Callable[[], None]) -> list[Row]:
    slot = pipeline.slot
    rows: list[Row] = []
    base_answers: list[Any] | None = None
    candidates: list[ModelVariant | None] = [None, *all_variants(base)]
    for variant in candidates:
        if stop is not None and stop.is_set():
            raise LeptonError(f"pipeline {pipeline.name}: stopped during the tune")
        row = Row(None if variant is None else variant.file, base.path.name if variant is None else variant.file)
        rows.append(row)
        model = runner = None
        try:
            spec = base if variant is None else variant_spec(base, variant)
            before = rss_mb()
            between()
            model, runner = slot.prepare(spec)
            answers = []
            for x in inputs:  # also the warm-up
                between()
                answers.append(answer(runner.process(x)))
            took = np.empty(rounds * len(inputs), np.float64)
            k = 0
            for _ in range(rounds):
                for x in inputs:
                    between()
                    t0 = time.perf_counter()
                    runner.process(x)
                    took[k] = (time.perf_counter() - t0) * 1000
                    k += 1
            row.rss_mb = max(0.0, rss_mb() - before)
            row.items = k
            row.p50_ms, row.p95_ms = float(np.percentile(took, 50)), float(np.percentile(took, 95))
        except LeptonError as exc:
            row.error = str(exc)[:200]
        except Exception as exc:  # a variant that breaks is a row, never the tuner's end
            row.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            del model, runner
            gc.collect()  # the next variant's RSS growth is its own
        if row.error is not None:
            continue
        if variant is None:
            base_answers, row.agreement = answers, 1.0
        elif base_answers is not None:
            row.agreement = sum(a == b for a, b in zip(answers, base_answers, strict=True)) / len(inputs)
    return rows


def niced(work: Callable[[], Any]) -> Any:
    """Run `work` in a thread of its own at TUNE_NICE and return what it returns (or raise what it raised).

    Its own thread, not the tuner's: niceness is per thread on Linux, inherited by the threads it
    starts (the interpreters' worker threads) and cannot be lowered again unprivileged; the model the
    tuner then swaps into the loop must not carry it."""
    box: dict[str, Any] = {}

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere at the normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TUNE_NICE)
        try:
            box["value"] = work()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="tuner-measure", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def collect(pipeline: Pipeline, n: int = TUNE_ITEMS, timeout: float = SAMPLE_TIMEOUT_S) -> list[Any]:
    """`n` recent items of the loop (copies, taken between its own items); LeptonError if none come."""
    items = []
    for _ in range(n):
        item = pipeline.slot.sample(timeout)
        if item is None:
            break
        items.append(item)
    if not items:
        raise LeptonError(f"pipeline {pipeline.name}: no item came from the loop within {timeout:g} s to measure on")
    return items


@dataclass
class TuneResult:
    """One tune of one pipeline, as `status` and the fleet's report show it."""

    pipeline: str
    trigger: str
    ts: float
    duration_s: float
    threads: int
    level: int
    budget: Budget
    rows: list[Row]
    chosen: int
    met: bool
    why: str
    model: dict[str, Any]

    @property
    def chosen_row(self) -> Row:
        return self.rows[self.chosen]

    def as_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "trigger": self.trigger, "ts": round(self.ts, 3),
                "duration_s": round(self.duration_s, 3), "threads": self.threads, "level": self.level,
                "model": self.model, "budget": self.budget.as_dict(), "chosen": self.chosen_row.variant,
                "fallback": not self.met, "why": self.why,
                "table": [row.as_dict(i == self.chosen) for i, row in enumerate(self.rows)]}

    def summary(self) -> dict[str, Any]:
        """Telemetry's part: the chosen variant and its margins to the budget (positive: within it)."""
        row, b = self.chosen_row, self.budget
        return {"chosen": row.variant, "fallback": not self.met, "trigger": self.trigger, "ts": round(self.ts, 3),
                "p95_ms": None if row.p95_ms is None else round(row.p95_ms, 3),
                "latency_margin_ms": None if row.p95_ms is None else round(b.latency_budget_ms - row.p95_ms, 3),
                "agreement": row.agreement,
                "agreement_margin": None if row.agreement is None else round(row.agreement - b.min_agreement, 4)}


Done = Callable[[TuneResult | None, str | None], None]
"""(the result, or None and the error) when a requested tune ends."""


def _trigger(before: tuple[Any, ...] | None, key: tuple[Any, ...]) -> str:
    """Why a pipeline is tuned again by itself: (base path, version, threads) changed from `before` to `key`."""
    if before is None:
        return "start"
    if before[:2] == key[:2]:
        return f"threads {before[2]} -> {key[2]}"
    return "new base model"


class Tuner:
    """Tunes the agent's pipelines one at a time, in a thread of its own."""

    def __init__(self, pipelines: Callable[[], list[Pipeline]], stop: threading.Event,
                 level: Callable[[], int] = lambda: 0) -> None:
        self.pipelines = pipelines
        self.stop = stop
        self.level = level
        self.results: dict[str, TuneResult] = {}
        self.running: str | None = None
        """The pipeline being tuned now (None: none)."""
        self._cond = threading.Condition()
        self._requests: dict[str, tuple[str, list[Done]]] = {}
        self._tuned: dict[str, tuple[Any, ...]] = {}
        self._failed: dict[str, tuple[Any, ...]] = {}
        self._thread: threading.Thread | None = None

    @staticmethod
    def tunable(pipeline: Pipeline) -> bool:
        base = pipeline.slot.base_spec
        return base is not None and budget_of(pipeline) is not None and bool(all_variants(base))

    def _key(self, pipeline: Pipeline) -> tuple[Any, ...]:
        base = pipeline.slot.base_spec
        assert base is not None
        return base.path, base.version, pipeline.slot.profile.threads  # the slot's: a reload may change it

    def request(self, name: str, trigger: str, done: Done | None = None) -> None:
        with self._cond:
            old = self._requests.get(name)
            callbacks = (old[1] if old else []) + ([done] if done else [])
            self._requests[name] = (old[0] if old else trigger, callbacks)
            self._cond.notify_all()

    def request_all(self, trigger: str) -> None:
        """Tune every tunable pipeline again (the governor's level changed)."""
        for p in self.pipelines():
            if p.running and self.tunable(p):
                self.request(p.name, trigger)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tuner", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self.stop.is_set():
            with self._cond:
                if not self._requests:
                    self._cond.wait(POLL_S)
                self._find_untuned()
                if not self._requests or self.stop.is_set():
                    continue
                name = next(iter(self._requests))
                trigger, callbacks = self._requests.pop(name)
            result, error = self._tune_named(name, trigger)
            for callback in callbacks:
                callback(result, error)

    def _find_untuned(self) -> None:
        for p in self.pipelines():
            tunable = self.tunable(p)
            p.slot.tuning = tunable  # the governor leaves the variant of a tunable pipeline to us
            if p.name in self._requests or not p.running or not tunable:
                continue
            key, last, before = self._key(p), self.results.get(p.name), self._tuned.get(p.name)
            if before != key:
                if self._failed.get(p.name) != key:
                    self._requests[p.name] = (_trigger(before, key), [])
            elif last is not None and p.slot.chosen_variant != last.chosen_row.variant:
                # A fresh start (`start` after `stop`) loads the base model: measure again rather than
                # assume the last table still holds.
                self._requests[p.name] = ("restart", [])

    def _tune_named(self, name: str, trigger: str) -> tuple[TuneResult | None, str | None]:
        pipeline = next((p for p in self.pipelines() if p.name == name), None)
        if pipeline is None or not self.tunable(pipeline):
            return None, f"pipeline {name}: nothing to tune (no variants in its manifest, or no latency budget)"
        key = self._key(pipeline)
        self.running = name
        try:
            result = self.tune(pipeline, trigger)
        except LeptonError as exc:
            self._failed[name] = key
            logger.error("tune of pipeline %s failed: %s", name, exc)
            return None, str(exc)
        except Exception as exc:
            self._failed[name] = key
            logger.exception("tune of pipeline %s failed", name)
            return None, f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            self.running = None
        self._tuned[name] = key
        return result, None

    def tune(self, pipeline: Pipeline, trigger: str) -> TuneResult:
        """Measure, choose, swap in (this thread); LeptonError when there is nothing to measure on."""
        budget = budget_of(pipeline)
        assert budget is not None
        started, t0 = time.time(), time.monotonic()
        inputs = collect(pipeline)
        rows: list[Row] = niced(lambda: measure(pipeline, inputs, stop=self.stop))
        chosen, met, why = choose(rows, budget)
        slot = pipeline.slot
        base = slot.base_spec or slot.configured_spec()
        wanted = rows[chosen].variant
        if wanted != slot.chosen_variant:
            variant = next((v for v in all_variants(base) if v.file == wanted), None)
            slot.use_variant(variant)
        result = TuneResult(pipeline.name, trigger, started, time.monotonic() - t0, slot.profile.threads,
                            self.level(), budget, rows, chosen, met, why,
                            {"name": base.name, "version": base.version})
        self.results[pipeline.name] = result
        slot.tune_summary = result.summary()
        (logger.info if met else logger.warning)("tune of pipeline %s (%s): %s runs: %s", pipeline.name, trigger,
                                                 wanted or "the base model", why)
        return result

    def state(self) -> dict[str, Any]:
        """`status`'s part: the last table per pipeline (of the pipelines there are now)."""
        names = {p.name for p in self.pipelines()}
        return {name: r.as_dict() for name, r in list(self.results.items()) if name in names}

    def summary(self, name: str) -> dict[str, Any] | None:
        result = self.results.get(name)
        return None if result is None else result.summary()
