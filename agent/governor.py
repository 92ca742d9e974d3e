"""The governor: trades speed for cost on the device when it runs hot or the agent takes too much CPU.

One pressure level for the device, 0 (full speed) to `max_level`. Each level is one step
for every vision pipeline: its fps times `fps_step`, or — from `variant_level` on, when the
model's manifest lists cheaper `variants` — the next cheaper variant instead. Audio loops
are never slowed, paused or swapped: a missed wake word costs more than the CPU it saves.

- SoC temperature at or past the profile's soft limit, firmware throttling now, or the
  agent's share of all cores over the profile's `cpu_budget_percent`: one step down per
  `step_s` while it lasts.
- At or past the hard limit: the vision loops pause (their sources closed) at once, at the
  deepest level; they resume once the temperature is `thermal_hysteresis_c` below it.
- Relief needs the temperature `thermal_hysteresis_c` under the soft limit and the CPU share
  `cpu_hysteresis_percent` under budget — also as predicted for the step back up, so a
  loop does not climb straight back into the budget it just left — and `recover_s` since
  the last change: then one step up.

`decide()` is pure (readings in, level out); `apply()` makes the pipelines follow the
level and is idempotent, so it also catches pipelines started or reloaded later. Every
change is logged and kept (`state()`, in telemetry).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import GovernorSection
from agent.errors import BadInput
from agent.pipeline import Pipeline
from agent.profiles import Profile
from agent.variants import ModelVariant, cheaper_variants

logger = logging.getLogger(__name__)

UNKNOWN_VARIANT_SAVING = 2.0
"""Cost of the base over a variant known only by `cost_rank`, when predicting a step back up."""


@dataclass(frozen=True)
class Reading:
    """What the governor looks at, once per tick."""

    temp_c: float | None
    """SoC temperature (None: no sensor)."""
    cpu_percent: float | None
    """The agent's share of all cores, 0-100, since the previous tick."""
    throttled: bool = False
    """The firmware is capping the clock or throttling right now (Raspberry Pi)."""


@dataclass
class Change:
    """One decision, as logged and reported."""

    ts: float
    level: int
    paused: bool
    what: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"ts": round(self.ts, 3), "level": self.level, "paused": self.paused, "what": self.what,
                "reason": self.reason}


@dataclass
class _Plan:
    """One pipeline's ladder: its variants, and those that failed to load."""

    key: tuple[int, Any, Any]
    variants: list[ModelVariant]
    broken: set[str] = field(default_factory=set)


class Governor:
    """Decides the device's pressure level and makes the vision pipelines follow it."""

    def __init__(self, settings: GovernorSection, profile: Profile,
                 pipelines: Callable[[], list[Pipeline]]) -> None:
        self.settings = settings
        self.profile = profile
        self.pipelines = pipelines
        self.level = 0
        self.paused = False
        self.pressure: str | None = None
        """What pushes right now: `thermal`, `throttled`, `cpu` (None: nothing)."""
        self.reason: str | None = None
        self.last: Reading | None = None
        self.changes = 0
        self.history: collections.deque[Change] = collections.deque(maxlen=16)
        self._last_change = float("-inf")
        self._plans: dict[str, _Plan] = {}

    # -- deciding ------------------------------------------------------------------------------

    def decide(self, reading: Reading, now: float) -> list[Change]:
        """Move the level (and the pause) for this reading; the changes made."""
        s, p = self.settings, self.profile
        self.last = reading
        temp, cpu = reading.temp_c, reading.cpu_percent
        changes: list[Change] = []

        def note(what: str, reason: str) -> None:
            self._last_change = now
            self.changes += 1
            change = Change(time.time(), self.level, self.paused, what, reason)
            changes.append(change)
            self.history.append(change)

        if temp is not None and temp >= p.thermal_hard_c:
            self.pressure, self.reason = "thermal", f"temperature {temp:.1f} °C ≥ hard limit {p.thermal_hard_c:g} °C"
            if not self.paused:
                self.paused, self.level = True, s.max_level
                note("paused", self.reason)
                logger.warning("governor: %s: vision pipelines paused", self.reason)
            return changes
        if self.paused:
            if temp is None or temp <= p.thermal_hard_c - s.thermal_hysteresis_c:
                self.paused = False
                reason = "no temperature reading" if temp is None else (
                    f"temperature {temp:.1f} °C ≤ {p.thermal_hard_c - s.thermal_hysteresis_c:g} °C")
                note("resumed", reason)
                logger.warning("governor: %s: vision pipelines resumed at level %d", reason, self.level)
            return changes

        pressure: tuple[str, str] | None = None
        if temp is not None and temp >= p.thermal_soft_c:
            pressure = ("thermal", f"temperature {temp:.1f} °C ≥ soft limit {p.thermal_soft_c:g} °C")
        elif reading.throttled:
            pressure = ("throttled", "the firmware is throttling the CPU")
        elif cpu is not None and cpu > p.cpu_budget_percent:
            pressure = ("cpu", f"agent CPU {cpu:.1f} % > budget {p.cpu_budget_percent:g} %")
        self.pressure, self.reason = pressure if pressure is not None else (None, None)
        if pressure is not None:
            if self.level < s.max_level and now - self._last_change >= s.step_s:
                self.level += 1
                note("step down", pressure[1])
                logger.warning("governor: %s: level %d/%d", pressure[1], self.level, s.max_level)
            return changes

        if self.level == 0 or now - self._last_change < s.recover_s:
            return changes
        cool = temp is None or temp <= p.thermal_soft_c - s.thermal_hysteresis_c
        ceiling = p.cpu_budget_percent - s.cpu_hysteresis_percent
        predicted = None if cpu is None else cpu * self.cost_ratio(self.level - 1, self.level)
        idle = predicted is None or (cpu is not None and cpu <= ceiling and predicted <= ceiling)
        if cool and idle:
            self.level -= 1
            parts = ["temperature " + ("unknown" if temp is None else f"{temp:.1f} °C")]
            if cpu is not None and predicted is not None:
                parts.append(f"agent CPU {cpu:.1f} % (after the step ~{predicted:.1f} %)")
            note("step up", ", ".join(parts))
            logger.info("governor: %s: level %d/%d", ", ".join(parts), self.level, s.max_level)
        return changes

    # -- what a level means for a pipeline -----------------------------------------------------------

    def _plan(self, pipeline: Pipeline) -> _Plan:
        base = pipeline.slot.base_spec
        key = (id(pipeline), None if base is None else base.path, None if base is None else base.manifest_path)
        plan = self._plans.get(pipeline.name)
        if plan is None or plan.key != key:
            variants: list[ModelVariant] = []
            if self.settings.variant_level > 0 and base is not None:
                variants = cheaper_variants(base, self.settings.min_agreement)
            plan = _Plan(key, variants)
            self._plans[pipeline.name] = plan
        return plan

    def _split(self, plan: _Plan, level: int) -> tuple[int, int]:
        """(variant steps, fps steps) of `level` for this pipeline."""
        usable = [v for v in plan.variants if v.file not in plan.broken]
        first = self.settings.variant_level
        variant_steps = 0 if first == 0 or level < first else min(level - first + 1, len(usable))
        return variant_steps, level - variant_steps

    def target(self, pipeline: Pipeline, level: int | None = None) -> tuple[float | None, ModelVariant | None]:
        """The fps cap (None: none) and the variant (None: the base) of `level` for `pipeline`."""
        level = self.level if level is None else level
        plan = self._plan(pipeline)
        variant_steps, fps_steps = self._split(plan, level)
        usable = [v for v in plan.variants if v.file not in plan.broken]
        variant = usable[variant_steps - 1] if variant_steps else None
        if fps_steps == 0:
            return None, variant
        base = pipeline.configured_fps
        return min(base, max(self.settings.min_fps, base * self.settings.fps_step ** fps_steps)), variant

    def cost_ratio(self, to_level: int, from_level: int) -> float:
        """How much dearer the vision loops are at `to_level` than at `from_level` (the largest over them)."""
        worst = 1.0
        for pipeline in self.pipelines():
            if not pipeline.vision:
                continue
            worst = max(worst, self._cost(pipeline, to_level) / self._cost(pipeline, from_level))
        return worst

    def _cost(self, pipeline: Pipeline, level: int) -> float:
        fps, variant = self.target(pipeline, level)
        base = pipeline.configured_fps
        per_frame = 1.0
        if variant is not None:
            per_frame = variant.relative_cost or 1.0 / UNKNOWN_VARIANT_SAVING
        return (base if fps is None else fps) / base * per_frame

    # -- acting ------------------------------------------------------------------------------------

    def apply(self) -> None:
        """Make every vision pipeline follow the level and the pause (idempotent)."""
        for pipeline in self.pipelines():
            if not pipeline.vision:
                continue
            fps, variant = self.target(pipeline)
            wanted = None if variant is None else variant.file
            if wanted != pipeline.chosen_variant and pipeline.running and not self._switch(pipeline, variant):
                fps, _ = self.target(pipeline)  # without the variant that failed, this level is an fps step
            pipeline.govern_fps(fps)
            if self.paused and not pipeline.paused:
                pipeline.pause()
            elif not self.paused and pipeline.paused:
                pipeline.resume()

    def _switch(self, pipeline: Pipeline, variant: ModelVariant | None) -> bool:
        try:
            pipeline.slot.use_variant(variant)
        except BadInput as exc:
            if variant is not None:
                self._plan(pipeline).broken.add(variant.file)
            logger.error("governor: pipeline %s: cannot switch to %s: %s", pipeline.name,
                         "the base model" if variant is None else f"variant {variant.file}", exc)
            return False
        what = "base model" if variant is None else f"variant {variant.file}"
        logger.warning("governor: pipeline %s now runs the %s (level %d)", pipeline.name, what, self.level)
        self.changes += 1
        self.history.append(Change(time.time(), self.level, self.paused, f"{pipeline.name}: {what}",
                                   self.reason or "pressure gone"))
        return True

    def tick(self, reading: Reading, now: float | None = None) -> list[Change]:
        changes = self.decide(reading, time.monotonic() if now is None else now)
        self.apply()
        return changes

    # -- reporting ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The governor's part of telemetry."""
        reading = self.last
        pipelines: dict[str, Any] = {}
        for pipeline in self.pipelines():
            if pipeline.vision:
                fps, _variant = self.target(pipeline)
                pipelines[pipeline.name] = {"fps": round(pipeline.max_fps, 3), "capped": fps is not None,
                                            "variant": pipeline.chosen_variant, "paused": pipeline.paused}
        return {
            "enabled": True,
            "level": self.level,
            "max_level": self.settings.max_level,
            "paused": self.paused,
            "pressure": self.pressure,
            "reason": self.reason,
            "temp_c": None if reading is None else reading.temp_c,
            "agent_cpu_percent": None if reading is None else reading.cpu_percent,
            "thermal_soft_c": self.profile.thermal_soft_c,
            "thermal_hard_c": self.profile.thermal_hard_c,
            "cpu_budget_percent": self.profile.cpu_budget_percent,
            "changes": self.changes,
            "last_change": self.history[-1].as_dict() if self.history else None,
            "pipelines": pipelines,
        }


def disabled_state() -> dict[str, Any]:
    """The governor's part of telemetry when it is switched off."""
    return {"enabled": False, "level": 0, "max_level": 0, "paused": False, "pressure": None, "reason": None,
            "temp_c": None, "agent_cpu_percent": None, "thermal_soft_c": None, "thermal_hard_c": None,
            "cpu_budget_percent": None, "changes": 0, "last_change": None, "pipelines": {}}
