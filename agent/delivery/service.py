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
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.delivery.activation import (
    Activation,
    Attach,
    Health,
    ProbationSettings,
    ShadowTrial,
    Swap,
    run_shadow,
)
from agent.delivery.deploy_state import DeployState, State, StateReporter
from agent.delivery.download import Downloader, DownloadSettings
from agent.delivery.pending import DEFAULT_LIMIT, Deployment, PendingDeployments, order_of, same_version
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.request import DeployRequest
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
    memory_budget: int | None = None
    """Bytes the self-test lets a model's tensors take (the profile's memory budget); None: not bounded."""
    selftest_timeout_s: float | None = 60.0
    """The self-test (load, allocate, sample inferences) must end within this; None: no limit."""
    max_pending: int = DEFAULT_LIMIT
    """Deployments pending at once; a deploy past it is refused (`queue_full`)."""


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
        self.pending = PendingDeployments(store, link, self.topics,
                                          manifest_timeout=self.settings.download.manifest_timeout,
                                          limit=self.settings.max_pending, ask=self.downloader.ask_manifest,
                                          ask_after=self.settings.download.ask_after,
                                          ask_every=self.settings.download.stall_timeout)
        self._thread: threading.Thread | None = None
        self.overrun: Callable[[bool], None] | None = None
        """Told True when a self-test outlives `selftest_timeout_s` inside the runtime, False when it ends after
        all (the daemon withholds the systemd watchdog meanwhile)."""
        self.restarts = 0
        """Times the worker loop recovered from an unexpected error."""
        self.on_active: Callable[[str], None] = lambda name: None
        """Told the model name when a deployment or a rollback has made a version of it active (the daemon
        starts the pipelines waiting for that name)."""

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> DeliveryService:
        self.recover()
        saved = sorted(self.store.pending().items(), key=lambda kv: (order_of(kv[1]), kv[0]))
        for did, entry in saved:
            try:
                request = DeployRequest.from_command(entry)
                self._accept(did, request, persist=False, entry=entry)
            except (BadInput, DeliveryError) as exc:
                logger.warning("dropping pending deployment %s: %s", did, exc)
                self.store.clear_pending(did)
        self._thread = threading.Thread(target=self._work, name="delivery", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def recover(self) -> list[StoredModel]:
        """After a restart: a deployment that died in its self-test is failed, not resumed; a model still on
        trial was never confirmed, so the previous one stays."""
        self._recover_selftest()
        undone = []
        for name in self.store.names():
            trial = self.store.abort_trial(name)
            if trial is not None:
                undone.append(trial)
                # Not resumed either: if the model is what brought the agent down, running it again would
                # bring it down again, and again.
                rid = None
                for did, entry in self.store.pending().items():
                    if entry.get("model") == name and same_version(entry.get("version"), trial.version):
                        self.store.clear_pending(did)
                        rid = entry.get("id") if isinstance(entry.get("id"), str) else None
                self.report(DeployState(name, trial.version, State.ROLLED_BACK, reason=Reason.RESTARTED_IN_PROBATION,
                                        detail="the agent restarted before the probation window passed",
                                        active=self._active_version(name), request=rid))
        return undone

    def _recover_selftest(self) -> None:
        marker = self.store.selftest_marker()
        if marker is None:
            return
        self.store.end_selftest()
        name, version, did = marker.get("model"), marker.get("version"), marker.get("deployment")
        if not isinstance(name, str) or isinstance(version, bool) or not isinstance(version, int | str):
            logger.warning("model store: dropping an unreadable self-test marker: %s", marker)
            return
        # The model brought the agent down (out of memory, a kill, a crash in the runtime): resuming the
        # deployment would do it again at every start, a crash loop under systemd's MemoryMax.
        for key, entry in self.store.pending().items():
            if key == did or (entry.get("model") == name and same_version(entry.get("version"), version)):
                self.store.clear_pending(key)
        logger.error("%s@%s: the agent died during its self-test; the deployment is rolled back, not retried",
                     name, version)
        self.report(DeployState(name, version, State.ROLLED_BACK, reason=Reason.SELFTEST_CRASHED,
                                detail="the agent died during this model's self-test (out of memory, killed or "
                                       "crashed); it is not tried again",
                                active=self._active_version(name), request=did if isinstance(did, str) else None))

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
        """Queue a deploy command; the reply's `result`. BadInput for a malformed command, DeliveryError
        (`queue_full`) when the device has as many deployments pending as it takes."""
        request = DeployRequest.from_command(args)
        d, joined = self._accept(request.request or new_request_id(), request, persist=True)
        result: dict[str, Any] = {"queued": True, "model": request.name, "version": request.version,
                                  "deployment": d.id}
        if joined:
            result["joined"] = True  # the same name@version was pending: one deployment, its states carry both ids
        return result

    def _accept(self, did: str, request: DeployRequest, persist: bool,
                entry: dict[str, Any] | None = None) -> tuple[Deployment, bool]:
        active = self._active_version(request.name)
        already = active is not None and same_version(active, request.version)
        d, joined = self.pending.add(did, request, persist=persist, needs_manifest=not already, entry=entry)
        if not joined:
            self.report(DeployState(request.name, request.version, State.QUEUED, request=d.id,
                                    active=active, extra=_ids(d)))
        return d, joined

    def pending_of(self, name: str) -> list[dict[str, Any]]:
        """The deployments of model `name` not finished yet, in the order they were accepted."""
        return [{**d.request.as_dict(), "deployment": d.id} for d in self.pending.of_model(name)]

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
        self._tell_active(name)
        rid = args.get("id") if isinstance(args.get("id"), str) else None
        self.report(DeployState(name, target.version, State.ROLLED_BACK, progress=1.0,
                                detail=f"explicit rollback from {before.version if before else 'nothing'}",
                                active=target.version, request=rid))
        return {"model": name, "active": target.version, "from": before.version if before else None}

    def _tell_active(self, name: str) -> None:
        try:
            self.on_active(name)
        except Exception:  # the model is active all the same; a pipeline that did not start says so itself
            logger.exception("%s: telling the pipelines it is active failed", name)

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
        # Nothing may end this thread but `stop`: a dead worker leaves every later deploy `queued` for good.
        while not self.stop.is_set():
            try:
                if not self._step():
                    return
            except Exception:
                self.restarts += 1
                logger.exception("delivery worker: unexpected error; going on")
                self.stop.wait(1.0)  # not a hot loop if it keeps failing (e.g. a disk that stays full)

    def _step(self) -> bool:
        """One round of the worker; False when it must end (the agent stops mid-deployment)."""
        self.store.flush()  # an index change a full disk refused is written once there is room
        d, overdue = self.pending.take(self.stop)
        for late in overdue:
            self._finish(late, State.FAILED, Reason.NOT_FOUND,
                         f"no manifest on {self.topics.manifest(late.request.name, late.request.version)} "
                         f"after {self.settings.download.manifest_timeout:g} s")
        if d is None:
            return True
        try:
            self._run(d)
        except DeliveryError as exc:
            if exc.reason is not Reason.STOPPED:
                self._finish(d, State.FAILED, exc.reason, exc.detail)
                return True
            self.pending.release(d)
            return False  # still pending: the next start resumes it
        except Exception as exc:
            # _run() reports every expected failure itself; this is a bug or the disk: log, count, carry on.
            self.restarts += 1
            logger.exception("deployment of %s@%s failed unexpectedly", d.request.name, d.request.version)
            self._finish(d, State.FAILED, Reason.STORAGE, f"internal error ({type(exc).__name__}); "
                                                          f"see the agent log")
        return True

    def _finish(self, d: Deployment, final: State, reason: Reason, detail: str) -> DeployState:
        self.pending.done(d)
        st = DeployState(d.request.name, d.request.version, final, reason=reason, detail=detail,
                         request=d.id, active=self._active_version(d.request.name), extra=_ids(d))
        self.report(st)
        return st

    def _active_version(self, name: str) -> Version | None:
        active = self.store.active(name)
        return active.version if active else self.baseline(name)

    def _self_test(self, stored: StoredModel, hooks: PipelineHooks | None, deployment: str | None = None) -> Any:
        self.store.begin_selftest({"deployment": deployment, "model": stored.name, "version": stored.version,
                                   "sha256": stored.sha256, "ts": time.time()})
        lock = threading.Lock()
        running, overran = [True], [False]
        budget = self.settings.selftest_timeout_s

        def watch() -> None:
            # A call inside the runtime cannot be interrupted; what can be done is to say so and let the
            # daemon withhold systemd's watchdog ping, so that systemd ends the process and the marker
            # rolls the deployment back at the next start.
            with lock:
                if not running[0]:
                    return
                overran[0] = True
                logger.error("%s@%s: the self-test is still running %g s into its budget, inside the runtime",
                             stored.name, stored.version, budget)
                if self.overrun is not None:
                    self.overrun(True)

        timer = threading.Timer(budget, watch) if budget is not None else None
        # One start for the timer and the self-test's own checks: what the timer called overrunning is late there too.
        started = time.monotonic()
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            return self_test(
                self.store, stored,
                fit=hooks.fit() if hooks else None,
                budget_ms=self.settings.latency_budget_ms,
                sample=hooks.sample() if hooks else None,
                make_runner=hooks.make_runner if hooks else default_runner,
                backend=self.settings.backend, threads=self.settings.threads,
                memory_budget=self.settings.memory_budget, time_budget_s=self.settings.selftest_timeout_s,
                started=started,
            )
        finally:
            with lock:
                running[0] = False
                if overran[0] and self.overrun is not None:
                    self.overrun(False)
            if timer is not None:
                timer.cancel()
            self.store.end_selftest()  # not reached when the process dies in it: the marker stays

    def deploy(self, request: DeployRequest) -> DeployState:
        """Accept one deployment and run it to its end on the caller's thread (tools, tests; the daemon queues
        through `submit_deploy`); the final state (also reported)."""
        d, _ = self._accept(request.request or new_request_id(), request, persist=True)
        if not self.pending.wait_manifest(d, self.stop):
            if self.stop.is_set():
                self.pending.release(d)
                raise DeliveryError(Reason.STOPPED, "stopped while waiting for the manifest")
            return self._finish(d, State.FAILED, Reason.NOT_FOUND,
                                f"no manifest on {self.topics.manifest(request.name, request.version)} "
                                f"after {self.settings.download.manifest_timeout:g} s")
        return self._run(d)

    def _run(self, d: Deployment) -> DeployState:
        """Run one deployment whose manifest has arrived to its end on this thread; the final state (also
        reported). It leaves the pending set unless the agent stops (DeliveryError `stopped`)."""
        request = d.request
        name, version, rid = request.name, request.version, d.id
        obtained = False

        def state(s: State, progress: float = 0.0, **kw: Any) -> DeployState:
            kw["extra"] = {**_ids(d), **kw.get("extra", {})}
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
                self.pending.done(d)
                return state(State.ACTIVE, 1.0, detail="already active")
            if d.manifest:
                signed = check_manifest(d.manifest, self.trusted, self.policy, active=active,
                                        expect_name=name, expect_version=version)
            else:  # accepted as already active, and another version is active by now (a rollback): fetch it
                signed = self.downloader.fetch_manifest(name, version, self.stop, active=active)
            self.pending.note(d, sha256=signed.sha256)
            state(State.DOWNLOADING, 0.0)
            stored, stats = self.downloader.download(
                signed, self.stop, progress=downloading)
            obtained = True
            state(State.VERIFYING, 0.0)
            hooks = self.hooks(name)
            prepared = self._self_test(stored, hooks, d.id)
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
            self.pending.done(d)
            self.store.gc()
            self._tell_active(name)
            return state(State.ACTIVE, 1.0, extra=extra)
        except DeliveryError as exc:
            if exc.reason is Reason.STOPPED:
                logger.info("%s@%s: %s", name, version, exc.detail)
                raise
            self.pending.done(d)
            extra = exc.extra if isinstance(exc, _Rejected) else {}
            final = State.ROLLED_BACK if obtained else State.FAILED
            logger.warning("%s@%s %s: %s", name, version, final.value, exc)
            return state(final, 0.0, reason=exc.reason, detail=exc.detail, extra=extra)


class _Rejected(DeliveryError):
    def __init__(self, reason: Reason, detail: str, extra: dict[str, Any]) -> None:
        super().__init__(reason, detail)
        self.extra = extra


def _ids(d: Deployment) -> dict[str, Any]:
    """`ids` in the state when several deploy commands share this deployment (each follows its own id)."""
    return {"ids": list(d.ids)} if len(d.ids) > 1 else {}


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


__all__ = ["DeliveryService", "DeliverySettings", "DeployRequest", "PipelineHooks", "check_manifest"]
