"""The result policy: which results leave the device, and how often (issue 3 item 4).

Per result: drop classes/detections/events scoring under the pipeline's threshold or not in
the label allow-list, keep the best `max_results`; then, with `on_change`, let a result out
only when the multiset of labels differs from the last one that went out (or every
`heartbeat_s`), and never faster than `max_rate`. A wake word event is always a change.
Results held back are counted, not queued: what matters is the latest state.

An optional JPEG snapshot rides along with vision results; the encoder
(`agent.vision.snapshot`, OpenCV) is imported only when a pipeline enables it, so an
audio-only agent never imports OpenCV.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.config import PolicySettings
from agent.errors import BadInput

SNAPSHOT_MODULE = "agent.vision.snapshot"
_LISTS = ("classes", "detections")


@dataclass
class PolicyStats:
    passed: int = 0
    unchanged: int = 0
    """Held back because nothing changed since the last result that went out."""
    rate_limited: int = 0
    """Held back by `max_rate`."""


def snapshot_encoder() -> Callable[[Any, list[dict[str, Any]], int], bytes]:
    """`snapshot_jpeg(frame, detections, max_bytes)`, or BadInput when this agent has no encoder."""
    if importlib.util.find_spec(SNAPSHOT_MODULE) is None:
        raise BadInput(f"policy.snapshot: this agent has no snapshot encoder ({SNAPSHOT_MODULE})")
    module = importlib.import_module(SNAPSHOT_MODULE)
    encoder: Callable[[Any, list[dict[str, Any]], int], bytes] = module.snapshot_jpeg
    return encoder


_Chosen = tuple[str, list[dict[str, Any]], list[float], list[int]]
"""A list of a result (its key, entries and their scores) and the indices of the entries the policy keeps."""


def _built(result: dict[str, Any], chosen: list[_Chosen]) -> dict[str, Any]:
    """`result` with each list of it cut to the kept entries, best score first (ties in their order)."""
    out = dict(result)
    for key, entries, scores, kept in chosen:
        if len(kept) > 1:
            kept.sort(key=scores.__getitem__, reverse=True)  # the lists are this call's own
        out[key] = [entries[i] for i in kept]
    return out


class ResultPolicy:
    """Filters and paces one pipeline's results; replaced whole when reconfigured."""

    def __init__(self, settings: PolicySettings, threshold: float, stats: PolicyStats | None = None) -> None:
        self.settings = settings
        self.threshold = threshold
        self.stats = stats or PolicyStats()
        self._allowed = frozenset(settings.labels)
        self._min_interval = 1.0 / settings.max_rate
        self._last_signature: tuple[str, ...] | None = None
        self._last_out = float("-inf")
        self._snapshot: Callable[[Any, list[dict[str, Any]], int], bytes] | None = None
        if settings.snapshot.enabled:
            self._snapshot = snapshot_encoder()

    def carry_over(self, previous: ResultPolicy) -> ResultPolicy:
        """Keep what the old policy last sent, so a reconfigure does not re-send an unchanged state."""
        self._last_signature = previous._last_signature
        self._last_out = previous._last_out
        return self

    def filter(self, result: dict[str, Any]) -> dict[str, Any]:
        """The result with only the entries the policy lets through (a new dict; the input is left alone)."""
        return _built(result, self._chosen(result)[0])

    def _select(self, labels: Sequence[str], scores: list[float]) -> list[int]:
        """The selection, the one place it is made (`apply` and `holds_back`): the indices of the entries scoring
        at or over the threshold with a label in the allow-list, the best `max_results` of them (ties: the first).
        `labels` are read only when there is an allow-list. In no promised order: a label signature does not
        care, and a result that goes out is put best first then (`_built`), not every frame."""
        allowed = self._allowed
        threshold = self.threshold
        if allowed:
            chosen = [i for i, score in enumerate(scores) if score >= threshold and labels[i] in allowed]
        else:
            chosen = [i for i, score in enumerate(scores) if score >= threshold]
        limit = self.settings.max_results
        if len(chosen) > limit:
            chosen.sort(key=scores.__getitem__, reverse=True)  # stable with reverse too: ties keep their order
            del chosen[limit:]
        return chosen

    def _chosen(self, result: dict[str, Any]) -> tuple[list[_Chosen], list[str]]:
        """Per list in `result` (classes, detections): the entries, their scores and the indices `_select` keeps;
        and the labels of all the kept entries (the signature's)."""
        chosen: list[_Chosen] = []
        names: list[str] = []
        allowed = self._allowed
        for key in _LISTS:
            entries = result.get(key)
            if not entries:
                if entries is not None:
                    chosen.append((key, entries, [], []))
                continue
            scores = [float(e.get("score", 1.0)) for e in entries]
            kept = self._select([str(e.get("label")) for e in entries] if allowed else (), scores)
            chosen.append((key, entries, scores, kept))
            if kept:
                names += [str(entries[i].get("label")) for i in kept]
        return chosen, names

    def holds_back(self, labels: list[str], scores: list[float], now: float) -> bool:
        """Whether `apply` would hold back, at `now`, a list result (classes or detections) with these labels and
        scores, counted as `apply` counts it: a runner asks before it builds the result (`Runner.gate`)."""
        if len(labels) != len(scores):
            raise ValueError(f"holds_back: {len(labels)} labels for {len(scores)} scores")
        return self._held(tuple(sorted([labels[i] for i in self._select(labels, scores)])), now)

    def _held(self, signature: tuple[str, ...] | None, now: float) -> bool:
        """True (and counted) when a result of this label signature (None: an event) is held back at `now`."""
        if signature is not None and self.settings.on_change and signature == self._last_signature:
            heartbeat = self.settings.heartbeat_s
            if heartbeat <= 0 or now - self._last_out < heartbeat:
                self.stats.unchanged += 1
                return True
        if now - self._last_out < self._min_interval:
            self.stats.rate_limited += 1
            return True
        return False

    def apply(self, result: dict[str, Any], now: float, frame: Any = None) -> dict[str, Any] | None:
        """The result to publish at monotonic time `now`, or None when the policy holds it back.

        A result held back builds nothing: the kept entries and their labels decide, and the outgoing
        dict is made only for a result that goes out (most frames of an unchanged scene do not)."""
        chosen: list[_Chosen] | None = None
        if "event" in result:
            if not self._select([str(result.get("label"))], [float(result.get("score", 1.0))]):
                return None
            signature = None  # an event is news every time
        else:
            chosen, names = self._chosen(result)
            # The multiset of labels, as a sorted tuple: equal exactly when the label counts are.
            names.sort()
            signature = tuple(names)
        if self._held(signature, now):
            return None
        if signature is not None:
            self._last_signature = signature
        self._last_out = now
        self.stats.passed += 1
        out = dict(result) if chosen is None else _built(result, chosen)
        if self._snapshot is not None and frame is not None:
            jpeg = self._snapshot(frame, list(out.get("detections", ())), self.settings.snapshot.max_bytes)
            out["snapshot"] = {"type": "image/jpeg", "b64": base64.b64encode(jpeg).decode("ascii")}
        return out
