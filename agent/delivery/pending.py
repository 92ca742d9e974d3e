"""The deployments a device has accepted and not finished: keyed by deployment, bounded, de-duplicated.

Each accepted `deploy` is one entry in the store's index under its deployment id (the
command's id), so a second deploy of the same model never overwrites the first, and the
clean-up of one never removes another; they survive a restart and resume in the order they
were accepted. A deploy of a name@version already pending joins that deployment (its
command id is added to the deployment's `ids`) instead of queueing the same work twice. At
most `limit` deployments are pending; past that a deploy is refused at once
(`queue_full`), so a flood of deploys cannot grow the index or the work without bound.

Manifests are awaited concurrently, not one after another on the worker: every pending
deployment keeps its manifest topic subscribed from the moment it is accepted, and becomes
*ready* when its retained manifest arrives. The worker takes ready deployments only, so a
deploy of a model that was never published costs a subscription and fails `not_found` after
`manifest_timeout`, while real deploys behind it run at once. A manifest still missing after
`ask_after` seconds is asked for (`ask`: a seeder answers where retained messages are not shared,
docs/delivery.md §1), and again every `ask_every` seconds until it comes or is overdue.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.signed_manifest import MAX_MANIFEST_BYTES
from agent.delivery.store import ModelStore
from agent.delivery.transport import Link
from agent.mqtt.topics import FleetTopics
from agent.version import Version, version_key

DEFAULT_LIMIT = 32
"""Pending deployments at most: a device runs one at a time, so more than this is a flood, not a plan."""


@dataclass
class Deployment:
    """One accepted deploy: the request, the command ids that asked for it, its manifest once it came."""

    id: str
    request: Any
    """The service's `DeployRequest`."""
    ids: list[str]
    order: int
    """Acceptance order (kept in the index, so a restart resumes in the same order)."""
    deadline: float
    """Monotonic time by which the manifest must have arrived."""
    manifest: bytes | None = None
    started: bool = False
    subscribed: str | None = None
    asked: float | None = None
    """When the manifest was last asked of a seeder (monotonic)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, tuple[Any, ...]]:
        return self.request.name, version_key(self.request.version)


class PendingDeployments:
    """Accepted deployments, their manifests awaited concurrently; `take()` gives the next ready one."""

    def __init__(self, store: ModelStore, link: Link, topics: FleetTopics, *, manifest_timeout: float,
                 limit: int = DEFAULT_LIMIT, clock: Callable[[], float] = time.monotonic,
                 ask: Callable[[str, Version], None] | None = None, ask_after: float = 1.0,
                 ask_every: float = 10.0) -> None:
        self.ask, self.ask_after, self.ask_every = ask, ask_after, ask_every
        self.store = store
        self.link = link
        self.topics = topics
        self.manifest_timeout = manifest_timeout
        self.limit = limit
        self.clock = clock
        self._cond = threading.Condition()
        self._all: dict[str, Deployment] = {}
        self._order = itertools.count(1 + max((order_of(e) for e in store.pending().values()), default=0))

    # -- accepting ----------------------------------------------------------------------------

    def add(self, did: str, request: Any, *, persist: bool, needs_manifest: bool = True,
            entry: dict[str, Any] | None = None) -> tuple[Deployment, bool]:
        """Accept a deployment; (the deployment, True when it joined one already pending).
        DeliveryError(queue_full) when `limit` deployments are pending."""
        with self._cond:
            key = (request.name, version_key(request.version))
            same = next((d for d in self._all.values() if d.key == key), None)
            if same is not None:
                if request.request and request.request not in same.ids:
                    same.ids.append(request.request)
                    try:
                        self._persist(same)
                    except DeliveryError:
                        same.ids.pop()  # not accepted (disk full): the reply says so
                        raise
                return same, True
            if did in self._all:
                return self._all[did], True
            if len(self._all) >= self.limit:
                raise DeliveryError(Reason.QUEUE_FULL, f"{len(self._all)} deployments are pending already, "
                                                       f"the limit is {self.limit}; try again when they have ended")
            saved = dict(entry or {})
            order = order_of(saved) or next(self._order)
            d = Deployment(did, request, ids=list(saved.get("ids") or ([request.request] if request.request else [])),
                           order=order, deadline=self.clock() + self.manifest_timeout)
            if saved.get("sha256"):
                d.extra["sha256"] = saved["sha256"]
            if persist:
                self._persist(d)  # DeliveryError(storage) on a full disk: not accepted, the reply says so
            self._all[did] = d
        if needs_manifest:
            self._watch(d)
        else:
            with self._cond:
                d.manifest = b""  # ready without one (already active: nothing to fetch)
                self._cond.notify_all()
        return d, False

    def _persist(self, d: Deployment) -> None:
        entry = {**d.request.as_dict(), "ids": list(d.ids), "order": d.order, **d.extra}
        self.store.set_pending(d.id, entry)

    def note(self, d: Deployment, **fields: Any) -> None:
        """Record fields in the deployment's index entry (the sha256 keeps its partial file from gc)."""
        with self._cond:
            d.extra.update(fields)
            self._persist(d)

    def _watch(self, d: Deployment) -> None:
        topic = self.topics.manifest(d.request.name, d.request.version)

        def arrived(_topic: str, data: bytes) -> None:
            # On the link thread: keep the bytes (no more than a manifest may have) and wake the worker.
            if not data:
                return
            with self._cond:
                if d.manifest is None:
                    d.manifest = bytes(data[: MAX_MANIFEST_BYTES + 1])
                    self._cond.notify_all()

        d.subscribed = topic
        self.link.subscribe(topic, arrived)

    # -- the worker's side --------------------------------------------------------------------

    def take(self, stop: threading.Event, timeout: float = 0.2) -> tuple[Deployment | None, list[Deployment]]:
        """(the earliest-accepted deployment whose manifest is in, or None; those whose manifest is overdue).
        Both leave the waiting set; the caller finishes them (`done`)."""
        with self._cond:
            ready, overdue = self._pick()
            if ready is None and not overdue and not stop.is_set():
                self._cond.wait(timeout)
                ready, overdue = self._pick()
            for d in ([ready] if ready else []) + overdue:
                d.started = True
            unanswered = self._to_ask()
        for d in ([ready] if ready else []) + overdue:
            self._unwatch(d)
        if self.ask is not None:
            for name, version in unanswered:
                self.ask(name, version)
        return ready, overdue

    def _to_ask(self) -> list[tuple[str, Version]]:
        """Deployments whose manifest has not come after `ask_after` (or since the last ask); marked asked."""
        if self.ask is None:
            return []
        now = self.clock()
        due = [d for d in self._all.values() if not d.started and d.manifest is None and now >= (
            d.asked + self.ask_every if d.asked is not None else d.deadline - self.manifest_timeout + self.ask_after)]
        for d in due:
            d.asked = now
        return [(d.request.name, d.request.version) for d in due]

    def wait_manifest(self, d: Deployment, stop: threading.Event) -> bool:
        """Wait for this one deployment's manifest (False: overdue or stopped); then it is taken."""
        with self._cond:
            while d.manifest is None and not stop.is_set() and self.clock() < d.deadline:
                self._cond.wait(min(0.1, max(0.0, d.deadline - self.clock())))
            arrived = d.manifest is not None
            d.started = True
        self._unwatch(d)
        return arrived

    def _pick(self) -> tuple[Deployment | None, list[Deployment]]:
        now = self.clock()
        waiting = sorted((d for d in self._all.values() if not d.started), key=lambda d: d.order)
        ready = next((d for d in waiting if d.manifest is not None), None)
        overdue = [d for d in waiting if d.manifest is None and now >= d.deadline]
        return ready, overdue

    def _unwatch(self, d: Deployment) -> None:
        if d.subscribed is not None:
            self.link.unsubscribe(d.subscribed)
            d.subscribed = None

    def done(self, d: Deployment) -> None:
        """The deployment has ended (any final state): out of the index and of the queue."""
        self._unwatch(d)
        with self._cond:
            self._all.pop(d.id, None)
        self.store.clear_pending(d.id)

    def release(self, d: Deployment) -> None:
        """Stopped mid-way: it stays in the index and resumes at the next start."""
        self._unwatch(d)

    # -- reading ------------------------------------------------------------------------------

    def of_model(self, name: str) -> list[Deployment]:
        with self._cond:
            return sorted((d for d in self._all.values() if d.request.name == name), key=lambda d: d.order)

    def __len__(self) -> int:
        with self._cond:
            return len(self._all)


def order_of(entry: dict[str, Any]) -> int:
    """A saved deployment's acceptance order; 0 when it has none (saved by an older agent) or a bad one."""
    order = entry.get("order")
    return order if isinstance(order, int) and not isinstance(order, bool) and order > 0 else 0


def same_version(a: Any, b: Version) -> bool:
    try:
        return a is not None and version_key(a) == version_key(b)
    except ValueError:
        return False
