"""Deployment states as published, retained, on `lepton/<dev>/deploy` (DESIGN §5)."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.delivery.reasons import Reason
from agent.version import Version

SCHEMA_VERSION = 1


class State(StrEnum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    ACTIVATING = "activating"
    """`phase` says which part: `shadow` (beside the active model, on the same items) or `probation`."""
    ACTIVE = "active"
    FAILED = "failed"
    """Refused before activation (download or checks); the active model never changed."""
    ROLLED_BACK = "rolled_back"
    """Activation was tried and undone, or an explicit rollback ran; `active` says what runs now."""


TERMINAL = frozenset({State.ACTIVE, State.FAILED, State.ROLLED_BACK})


@dataclass(frozen=True)
class DeployState:
    model: str
    version: Version
    state: State
    progress: float = 0.0
    """0..1: bytes for downloading, the probation or shadow window for activating/shadow."""
    reason: Reason | None = None
    detail: str | None = None
    """One line for people; `reason` is the code to act on."""
    active: Version | None = None
    """The version running now (after a failure or rollback: the one still or again in use)."""
    request: str | None = None
    """The id of the command that asked for this."""
    phase: str | None = None
    """Within `activating`: `shadow` or `probation`."""
    extra: dict[str, Any] = field(default_factory=dict)
    """State-specific figures (shadow agreement and latency, self-test latency)."""

    def payload(self, ts: float | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model, "version": self.version, "state": self.state.value,
            "progress": round(min(max(self.progress, 0.0), 1.0), 4),
            "reason": self.reason.value if self.reason is not None else None,
            "ts": time.time() if ts is None else ts, "v": SCHEMA_VERSION,
        }
        if self.detail is not None:
            d["detail"] = self.detail
        if self.active is not None:
            d["active"] = self.active
        if self.request is not None:
            d["id"] = self.request
        if self.phase is not None:
            d["phase"] = self.phase
        d.update(self.extra)
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.payload(), allow_nan=False).encode()


class StateReporter:
    """Publishes states retained through `publish(topic, payload)`; progress no more often than `min_step`."""

    def __init__(self, publish: Callable[[bytes], None], min_step: float = 0.02) -> None:
        self._publish = publish
        self._min_step = min_step
        self._lock = threading.Lock()
        self._last: DeployState | None = None
        self.history: deque[DeployState] = deque(maxlen=500)
        """The latest states reported (after throttling), for tests and diagnostics."""

    def __call__(self, state: DeployState) -> None:
        with self._lock:
            last = self._last
            if (last is not None and last.state == state.state and last.model == state.model
                    and last.version == state.version and last.phase == state.phase
                    and state.state not in TERMINAL
                    and state.progress < 1.0 and state.progress - last.progress < self._min_step):
                return
            self._last = state
            self.history.append(state)
            self._publish(state.to_json())

    @property
    def last(self) -> DeployState | None:
        return self._last
