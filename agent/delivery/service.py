"""The device's delivery service: what the daemon calls for `deploy`, `rollback` and `status` commands.

    service = DeliveryService(link, store, trusted, policy, device_id=..., hooks=pipelines.hooks_for)
    service.start()                      # rolls back an unfinished trial, resumes pending deploys
    reply = service.submit_deploy(args)  # from a `deploy` command; returns at once, work is queued
    reply = service.rollback(args)       # from a `rollback` command
    reply = service.status()             # per model: active, previous, trial, pending
    stop.set(); service.join()

Deployments run one at a time on the service's own thread, never on the link's.
States go out retained on `<prefix>/<dev>/deploy` as they change.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.delivery.activation import (
    Activation,
    Attach,
    Health,
    ProbationSettings,
    ShadowSpec,
    ShadowTrial,
    Swap,
    run_shadow,
)
from agent.delivery.deploy_state import DeployState, State, StateReporter
from agent.delivery.download import Downloader, DownloadSettings
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.selftest import Fit, RunnerFactory, default_runner, self_test
from agent.delivery.signed_manifest import NAME_RE, DevicePolicy, check_manifest
from agent.delivery.signing import TrustedKeys
from agent.delivery.store import ModelStore, StoredModel
from agent.delivery.transport import Link
from agent.errors import BadInput
from agent.mqtt.topics import FleetTopics
from agent.version import Version, parse_version, version_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineHooks:
    """How the service reaches the pipeline that runs a model name (see agent/delivery/activation.py)."""

    swap: Swap
    health: Health
    attach: Attach | None = None
    """Needed for shadow deploys."""
    fit: Callable[[], Fit | None] = lambda: None
    """What a replacement must look like; typically `Fit.like(current model, current runner)`."""
    sample: Callable[[], Any] = lambda: None
    """A recent real item to self-test with; None: a neutral synthetic one."""
    make_runner: RunnerFactory = default_runner
    """Builds the runner the loop drives from a loaded model (the daemon's own for audio)."""


@dataclass(frozen=True)
class DeliverySettings:
    download: DownloadSettings = field(default_factory=DownloadSettings)
    probation: ProbationSettings = field(default_factory=ProbationSettings)
    latency_budget_ms: float | None = None
    """The profile's per-item budget for the self-test; None: not judged."""
    shadow_timeout_s: float = 900.0
    """A shadow trial that has not seen enough items by then is judged on what it saw."""
    backend: str | None = None
    threads: int | None = None


@dataclass(frozen=True)
class DeployRequest:
    name: str
    version: Version
    shadow: ShadowSpec | None = None
    request: str | None = None

    @classmethod
    def from_command(cls, args: dict[str, Any]) -> DeployRequest:
        """From a deploy command's fields (`model`, `version`, optional `shadow`, `id`); BadInput naming the field."""
        name = args.get("model")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise BadInput("model: a model name (letters, digits, . _ -) is required")
        raw = args.get("version")
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise BadInput("version: an integer or a semver string is required")
        try:
            version = parse_version(str(raw)) if isinstance(raw, str) else raw
            version_key(version)
        except ValueError as exc:
            raise BadInput(f"version: {exc}") from None
        shadow = None
        if args.get("shadow") is not None:
            if not isinstance(args["shadow"], dict):
                raise BadInput("shadow: must be an object")
            try:
                shadow = ShadowSpec.from_command(args["shadow"])
            except ValueError as exc:
                raise BadInput(str(exc)) from None
        rid = args.get("id")
        return cls(name, version, shadow, rid if isinstance(rid, str) else None)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.name, "version": self.version, "id": self.request}
        if self.shadow is not None:
            d["shadow"] = {k: v for k, v in self.shadow.__dict__.items() if v is not None}
        return d


class DeliveryService:
    def __init__(
        self,
        link: Link,
        store: ModelStore,
        trusted: TrustedKeys,
        policy: DevicePolicy,
        *,
        device_id: str,
        topics: FleetTopics | None = None,
        settings: DeliverySettings | None = None,
        hooks: Callable[[str], PipelineHooks | None] = lambda name: None,
        stop: threading.Event | None = None,
        baseline: Callable[[str], Version | None] = lambda name: None,
    ) -> None:
        self.link = link
        self.store = store
        self.trusted = trusted
        self.policy = policy
        self.device_id = device_id
        self.topics = topics or FleetTopics()
        self.settings = settings or DeliverySettings()
        self.hooks = hooks
        self.stop = stop or threading.Event()
        self.baseline = baseline
        """The version a model name runs when the store has no active one (the daemon: the config's model).
        It counts as the active version for `not_newer` and "already active"."""
        self.downloader = Downloader(link, store, trusted, policy, topics=self.topics,
                                     settings=self.settings.download)
        self.report = StateReporter(
            lambda payload: link.publish(self.topics.deploy(device_id), payload, qos=1, retain=True))
        self._queue: queue.Queue[DeployRequest] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.restarts = 0
        """Times the worker loop recovered from an unexpected error."""

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> DeliveryService:
        self.recover()
        for name, request in sorted(self.store.pending().items()):
            try:
                self._enqueue(DeployRequest.from_command({**request, "model": name}), persist=False)
            except BadInput as exc:
                logger.warning("dropping unreadable pending deployment of %s: %s", name, exc)
                self.store.clear_pending(name)
        self._thread = threading.Thread(target=self._work, name="delivery", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def recover(self) -> list[StoredModel]:
        """After a restart: a model still on trial was never confirmed, so the previous one stays."""
        undone = []
        for name in self.store.names():
            trial = self.store.abort_trial(name)
            if trial is not None:
                undone.append(trial)
                # Not resumed either: if the model is what brought the agent down, running it again would
                # bring it down again, and again.
                pending = self.store.pending().get(name, {})
                if _same_version(pending.get("version"), trial.version):
                    self.store.clear_pending(name)
                self.report(DeployState(name, trial.version, State.ROLLED_BACK, reason=Reason.RESTARTED_IN_PROBATION,
                                        detail="the agent restarted before the probation window passed",
                                        active=self._active_version(name), request=pending.get("id")))
        return undone

    # -- commands -----------------------------------------------------------------

    ACTIONS = frozenset({"deploy", "rollback", "models"})
    """The command actions this service answers (the daemon routes them here)."""

    def handle(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """The `result` of a reply to a command; BadInput/DeliveryError become the reply's `error`."""
        if action == "deploy":
            return self.submit_deploy(args)
        if action == "rollback":
            return self.rollback(args)
        if action == "models":
            return self.status()
        raise BadInput(f"action: {action!r} is not a delivery action")

    def submit_deploy(self, args: dict[str, Any]) -> dict[str, Any]:
        """Queue a deploy command; the reply's `result`. BadInput for a malformed command."""
        request = DeployRequest.from_command(args)
        self._enqueue(request, persist=True)
        return {"queued": True, "model": request.name, "version": request.version}

    def _enqueue(self, request: DeployRequest, persist: bool) -> None:
        if persist:
            entry = request.as_dict()
            earlier = self.store.pending().get(request.name, {})
            if earlier.get("version") == request.version and "sha256" in earlier:
                entry["sha256"] = earlier["sha256"]  # keeps its partial file safe from gc()
            self.store.set_pending(request.name, entry)
        self.report(DeployState(request.name, request.version, State.QUEUED, request=request.request,
                                active=self._active_version(request.name)))
        self._queue.put(request)

    def rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        """Return to a locally kept version (the previous one by default); runs now, reports rolled_back."""
        name = args.get("model")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise BadInput("model: a model name is required")
        version = None
        if args.get("version") is not None:
            try:
                version = parse_version(str(args["version"]))
            except ValueError as exc:
                raise BadInput(f"version: {exc}") from None
        before = self.store.active(name)
        target = self.store.rollback(name, version)
        hooks = self.hooks(name)
        if hooks is not None:
            try:
                prepared = self._self_test(target, hooks)
                hooks.swap(prepared)
            except Exception:
                # The kept model no longer runs: put the index back as it was and say why.
                if before is not None:
                    self.store.activate(before)
                raise
        rid = args.get("id") if isinstance(args.get("id"), str) else None
        self.report(DeployState(name, target.version, State.ROLLED_BACK, progress=1.0,
                                detail=f"explicit rollback from {before.version if before else 'nothing'}",
                                active=target.version, request=rid))
        return {"model": name, "active": target.version, "from": before.version if before else None}

    def status(self) -> dict[str, Any]:
        models = {}
        for name in self.store.names():
            s = self.store.slot(name)
            models[name] = {key: (getattr(s, key).version if getattr(s, key) else None)
                            for key in ("active", "previous", "trial")}
        last = self.report.last
        return {"models": models, "pending": self.store.pending(),
                "last": last.payload() if last else None}

    # -- the worker -----------------------------------------------------------------

    def _work(self) -> None:
        while not self.stop.is_set():
            try:
                request = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.deploy(request)
            except DeliveryError as exc:
                if exc.reason is not Reason.STOPPED:
                    raise
                return  # still pending: the next start resumes it
            except Exception:
                # deploy() reports every expected failure itself; this is a bug: log, count, carry on.
                self.restarts += 1
                logger.exception("deployment of %s@%s failed unexpectedly", request.name, request.version)
                self.report(DeployState(request.name, request.version, State.FAILED, reason=Reason.STORAGE,
                                        detail="internal error; see the agent log", request=request.request,
                                        active=self._active_version(request.name)))
                self.store.clear_pending(request.name)

    def _active_version(self, name: str) -> Version | None:
        active = self.store.active(name)
        return active.version if active else self.baseline(name)

    def _self_test(self, stored: StoredModel, hooks: PipelineHooks | None) -> Any:
        return self_test(
            self.store, stored,
            fit=hooks.fit() if hooks else None,
            budget_ms=self.settings.latency_budget_ms,
            sample=hooks.sample() if hooks else None,
            make_runner=hooks.make_runner if hooks else default_runner,
            backend=self.settings.backend, threads=self.settings.threads,
        )

    def deploy(self, request: DeployRequest) -> DeployState:
        """Run one deployment to its end on this thread; the final state (also reported)."""
        name, version, rid = request.name, request.version, request.request
        obtained = False

        def state(s: State, progress: float = 0.0, **kw: Any) -> DeployState:
            st = DeployState(name, version, s, progress, request=rid, active=self._active_version(name), **kw)
            self.report(st)
            return st

        def downloading(progress: float) -> None:
            state(State.DOWNLOADING, progress)

        def shadowing(progress: float) -> None:
            state(State.ACTIVATING, progress, phase="shadow")

        try:
            active = self._active_version(name)
            if active is not None and version_key(active) == version_key(version):
                self.store.clear_pending(name)
                return state(State.ACTIVE, 1.0, detail="already active")
            signed = self._manifest(request, active)
            self.store.set_pending(name, {**request.as_dict(), "sha256": signed.sha256})
            state(State.DOWNLOADING, 0.0)
            stored, stats = self.downloader.download(
                signed, self.stop, progress=downloading)
            obtained = True
            state(State.VERIFYING, 0.0)
            hooks = self.hooks(name)
            prepared = self._self_test(stored, hooks)
            extra: dict[str, Any] = {"selftest_ms": round(prepared.latency_ms, 3),
                                     "download": {"chunks_on_disk": stats.chunks_on_disk,
                                                  "bytes_received": stats.bytes_received}}
            if request.shadow is not None:
                if hooks is None or hooks.attach is None:
                    raise DeliveryError(Reason.SWAP_FAILED, "no running pipeline for this model to shadow")
                trial = ShadowTrial(prepared, request.shadow)
                verdict = run_shadow(trial, hooks.attach, self.stop, self.settings.shadow_timeout_s,
                                     progress=shadowing)
                extra["shadow"] = verdict.as_dict()
                if not verdict.promote:
                    assert verdict.reason is not None
                    raise _Rejected(verdict.reason, verdict.detail, extra)
            activation = Activation(self.store, swap=hooks.swap if hooks else None,
                                    health=hooks.health if hooks else None, settings=self.settings.probation,
                                    report=self.report, stop=self.stop)
            activation.run(prepared, request=rid)
            self.store.clear_pending(name)
            self.store.gc()
            return state(State.ACTIVE, 1.0, extra=extra)
        except DeliveryError as exc:
            if exc.reason is Reason.STOPPED:
                logger.info("%s@%s: %s", name, version, exc.detail)
                raise
            self.store.clear_pending(name)
            extra = exc.extra if isinstance(exc, _Rejected) else {}
            final = State.ROLLED_BACK if obtained else State.FAILED
            logger.warning("%s@%s %s: %s", name, version, final.value, exc)
            return state(final, 0.0, reason=exc.reason, detail=exc.detail, extra=extra)

    def _manifest(self, request: DeployRequest, active: Version | None) -> Any:
        """The checked manifest, fetched again from the broker (also when resuming: it may have expired)."""
        return self.downloader.fetch_manifest(request.name, request.version, self.stop, active=active)


class _Rejected(DeliveryError):
    def __init__(self, reason: Reason, detail: str, extra: dict[str, Any]) -> None:
        super().__init__(reason, detail)
        self.extra = extra


def _same_version(a: Any, b: Version) -> bool:
    try:
        return a is not None and version_key(a) == version_key(b)
    except ValueError:
        return False


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


__all__ = ["DeliveryService", "DeliverySettings", "DeployRequest", "PipelineHooks", "check_manifest"]
