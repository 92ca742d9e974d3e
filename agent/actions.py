"""What each fleet command does to the running agent: the handlers the command worker runs.

`start`/`stop`/`configure` act on pipelines, `bench` measures the model a pipeline runs (in a
thread of its own, one at a time), `deploy`/`rollback`/`models` go to the delivery service,
and `reload` reads the config again and applies what can change while running (DESIGN §5).
Decoding, validation and the one reply per id are `agent.commands`'s; the life cycle is
`agent.daemon`'s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent import __version__
from agent.command_bus import Handler, Later
from agent.commands import (
    Bench,
    Capture,
    Command,
    CommandError,
    Configure,
    Deploy,
    Rollback,
    Samples,
    Start,
    Stop,
    Tune,
)
from agent.config import Effective, PipelineSettings
from agent.config_load import load
from agent.delivery.service import DeliveryService
from agent.errors import BadInput, LeptonError
from agent.pipeline import Pipeline, check_pipelines
from agent.samples.capturer import CaptureWriter
from agent.samples.offer import OFFER_MAX_BYTES, WantServer, offer, retract
from agent.slot import ModelSlot
from agent.supervisor import STOP_WAIT_S
from agent.tune import Tuner, TuneResult

logger = logging.getLogger(__name__)


class Host(Protocol):
    """What the handlers use of the daemon (`agent.daemon.Agent`), which owns all of it."""

    eff: Effective
    started: float
    pipelines: dict[str, Pipeline]
    _lock: threading.Lock
    _slots: dict[str, ModelSlot]
    delivery: DeliveryService | None
    tuner: Tuner | None
    capture: CaptureWriter | None
    link: Any
    topics: Any

    def _pipeline(self, settings: PipelineSettings) -> Pipeline: ...

    def _pipeline_list(self) -> list[Pipeline]: ...

    def status_snapshot(self) -> dict[str, Any]: ...

    def _announce(self) -> None: ...


class Actions:
    """The command handlers of one agent."""

    APPLIED_ON_RELOAD = ("pipelines", "supervisor", "trusted_keys")
    """Config sections a reload applies; a change anywhere else is reported in `restart_needed`."""

    def __init__(self, agent: Host) -> None:
        self.agent = agent
        self._bench_gate = threading.Lock()  # one bench at a time: each takes the cores the pipelines use
        self._offered: dict[str, int] = {}  # samples published for a pull and not yet acknowledged → bytes
        self._want: WantServer | None = None

    def handlers(self) -> dict[str, Handler]:
        return {
            "ping": lambda c: {"pong": True, "agent": __version__,
                               "uptime_s": round(time.monotonic() - self.agent.started, 1)},
            "status": lambda c: self.agent.status_snapshot(),
            "start": self.start,
            "stop": self.stop,
            "configure": self.configure,
            "reload": lambda c: self.reload(),
            "bench": self.bench,
            "tune": self.tune,
            "deploy": self.delivery_command,
            "rollback": self.delivery_command,
            "models": self.delivery_command,
            "capture": self.capture,
            "samples": self.samples,
        }

    def capture(self, command: Command) -> dict[str, Any]:
        """Keep the next items of a pipeline whose capture is enabled (docs/capture.md)."""
        assert isinstance(command, Capture)
        (p,) = self._chosen(command.pipeline)
        if p.capture is None:
            raise CommandError("unsupported", f"pipeline {p.name}: capture is off in this agent's config "
                                              f"([pipelines.capture] enabled)")
        return p.capture.request(command.count, command.duration_s)

    def _publish_raw(self, topic: str, payload: bytes, retain: bool) -> None:
        self.agent.link.publish(topic, payload, qos=1, retain=retain)

    def samples(self, command: Command) -> dict[str, Any]:
        """List, delete (the operator acknowledged them) or purge the captured samples."""
        assert isinstance(command, Samples)
        writer = self.agent.capture
        if writer is None:
            raise CommandError("unsupported", "no pipeline of this agent captures samples")
        store = writer.store
        if command.op in ("offer", "delete", "purge") and self.agent.link is None:
            raise CommandError("unsupported", "this agent has no MQTT link")
        publish = self._publish_raw
        base = self.agent.topics.base
        if command.op == "offer":
            if not command.ids:
                raise CommandError("bad_request", "ids: name the samples to offer")
            again = [sid for sid in command.ids if sid in self._offered]  # a resumed pull: counted once
            outstanding = sum(size for sid, size in self._offered.items() if sid not in again)
            if outstanding >= OFFER_MAX_BYTES:
                raise CommandError("busy", f"{outstanding} bytes offered and not acknowledged; pull them (or purge) "
                                           f"before offering more")
            result = offer(store, publish, base, list(command.ids), OFFER_MAX_BYTES - outstanding)
            self._offered.update((o["id"], o["size"]) for o in result["offered"])
            return result
        if command.op in ("delete", "purge"):
            ids = list(command.ids) if command.op == "delete" else store.ids()
            for sid in ids:
                if command.op == "delete" or sid in self._offered:
                    retract(store, publish, base, sid)
                self._offered.pop(sid, None)
            return {"deleted": store.delete(ids), "samples": len(store)}
        listed: list[dict[str, Any]] = []
        for sid in store.ids():
            meta = store.sidecar(sid)
            if meta is None or (command.pipeline and meta.get("pipeline") != command.pipeline) \
                    or (command.reason and meta.get("reason") != command.reason) \
                    or (command.since is not None and float(meta.get("ts", 0)) < command.since):
                continue
            listed.append({k: meta.get(k) for k in ("id", "pipeline", "reason", "kind", "ts", "bytes", "sha256",
                                                     "file", "score")})
            if len(listed) >= command.limit:
                break
        return {"samples": listed, "total": len(store), "bytes": store.size_bytes}

    def sample_want(self, topic: str, payload: bytes) -> None:
        """An operator's pull asks again for an offered sample it could not find retained (link thread)."""
        writer, link = self.agent.capture, self.agent.link
        if writer is None or link is None:
            return
        if self._want is None:
            self._want = WantServer(writer.store, self._publish_raw, self.agent.topics.base, self._offered)
        self._want.on_want(topic, payload)

    def delivery_command(self, command: Command) -> dict[str, Any]:
        """deploy / rollback / models: answered by the delivery service (the deploy runs on its thread)."""
        from agent.delivery.reasons import DeliveryError, Reason
        from agent.ota import rollback_to_configured, shadow_request

        if self.agent.delivery is None:
            raise CommandError("unsupported", "model delivery is off in this agent's config (delivery.enabled)")
        if isinstance(command, Rollback):
            busy = next(iter(self.agent.delivery.pending_of(command.model)), None)
            if busy is not None:
                # The deployment owns the pipelines and the store's record until it ends; a rollback now would
                # be undone by its commit or its own undo. It rolls back by itself if it fails its probation.
                raise CommandError("failed", f"{command.model}@{busy.get('version')} is being deployed; roll back "
                                             f"once its deployment has ended (it rolls back by itself if it fails)")
        args = command.model_dump(exclude={"shadow"})
        if isinstance(command, Deploy) and command.shadow is not None:
            args["shadow"] = shadow_request(self.agent.eff.config.delivery.shadow,
                                            command.shadow.model_dump(exclude_none=True))
        try:
            try:
                result = self.agent.delivery.handle(command.action, args)
            except DeliveryError as exc:
                # The store keeps nothing older: the config's own model is the first known good.
                if not (isinstance(command, Rollback) and exc.reason is Reason.NOT_KEPT):
                    raise
                by_name = [p.name for p in self.agent._pipeline_list() if p.settings.delivered == command.model]
                if by_name:
                    # No file of the config's to go back to: refused rather than leave the pipeline with nothing.
                    raise DeliveryError(Reason.NOT_KEPT, f"{exc.detail}; {command.model} runs by its delivered name "
                                        f"in pipeline {', '.join(by_name)}, with no model file to go back to: "
                                        f"deploy another version, or stop the pipeline") from None
                restored = rollback_to_configured(self.agent.delivery, self.agent._pipeline_list(), command.model,
                                                  command.version, command.id)
                if restored is None:
                    raise
                result = restored
        except BadInput as exc:
            raise CommandError("bad_request", str(exc)) from None
        except DeliveryError as exc:
            raise CommandError("not_found" if exc.reason is Reason.NOT_KEPT else "failed", str(exc)) from None
        if command.action == "rollback":
            self.agent._announce()
        return result

    def _chosen(self, name: str | None) -> list[Pipeline]:
        with self.agent._lock:
            if name is None:
                return list(self.agent.pipelines.values())
            if name not in self.agent.pipelines:
                raise CommandError("not_found", f"pipeline {name!r}: no such pipeline "
                                                f"(have: {', '.join(self.agent.pipelines) or 'none'})")
            return [self.agent.pipelines[name]]

    def start(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, Start)
        chosen = self._chosen(command.pipeline)
        try:
            for p in chosen:
                p.start()  # waits for a halted loop that is still ending; LeptonError if it does not end
        except LeptonError as exc:
            raise CommandError("busy", str(exc)) from None
        finally:
            self.agent._announce()
        return {"pipelines": [p.describe() for p in chosen]}

    def stop(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, Stop)
        chosen = self._chosen(command.pipeline)
        for p in chosen:
            p.halt()
        deadline = time.monotonic() + STOP_WAIT_S
        stuck = [p.name for p in chosen if not p.join(max(0.0, deadline - time.monotonic()))]
        self.agent._announce()
        if stuck:
            raise CommandError("busy", f"pipeline {', '.join(stuck)}: asked to stop, still ending its current item "
                                       f"after {STOP_WAIT_S:.0f} s (it stops once that ends)")
        return {"pipelines": [p.describe() for p in chosen]}

    def configure(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, Configure)
        (p,) = self._chosen(command.pipeline)
        policy = command.policy.apply(p.settings.policy) if command.policy is not None else None
        settings = p.reconfigure(threshold=command.threshold, fps=command.fps, policy=policy)
        self.agent._announce()
        return {"pipeline": p.describe(), "policy": settings.policy.model_dump(mode="json")}

    def bench(self, command: Command) -> Later:
        """Bench the model the pipeline runs now (its slot's, variant included), with the profile's
        threads, in a thread of its own: the command worker goes on; one bench at a time."""
        assert isinstance(command, Bench)
        (p,) = self._chosen(command.pipeline)
        slot = p.slot
        try:
            spec = slot.spec or slot.configured_spec()
        except BadInput as exc:
            raise CommandError("bad_config", f"pipeline {p.name}: {exc}") from None
        if not self._bench_gate.acquire(blocking=False):
            raise CommandError("busy", "a bench is running (one at a time); send this again once it has answered")
        later = Later()
        model_ref = {"name": spec.name, "version": spec.version, **({"variant": slot.variant} if slot.variant else {})}

        def work() -> None:
            from agent.bench import bench
            from agent.tasks import Inference

            try:
                # A second interpreter of the same file: the pipeline's own belongs to its thread.
                _, runner = slot.prepare(spec)
                if not isinstance(runner, Inference):
                    later.fail(CommandError("unsupported", f"pipeline {p.name}: bench runs per-item models only"))
                    return
                result = bench(runner, [], runs=command.runs, warmup=min(10, command.runs))
                later.done({**result, "pipeline": p.name, "running": model_ref})
            except BadInput as exc:
                later.fail(CommandError("failed", f"pipeline {p.name}: {exc}"))
            except Exception as exc:
                logger.exception("bench of pipeline %s failed", p.name)
                later.fail(CommandError("failed", f"{type(exc).__name__}: {str(exc)[:200]}"))
            finally:
                self._bench_gate.release()

        threading.Thread(target=work, name=f"bench-{p.name}", daemon=True).start()
        return later

    def tune(self, command: Command) -> Later:
        """Measure the variants of the pipeline's model on this device now and run the cheapest that meets
        its budget (agent.tune); answered with the measured tables once every tune has ended."""
        assert isinstance(command, Tune)
        tuner = self.agent.tuner
        if tuner is None:
            raise CommandError("unsupported", "this agent does not tune")
        chosen = [p for p in self._chosen(command.pipeline) if tuner.tunable(p)]
        if not chosen:
            what = f"pipeline {command.pipeline}" if command.pipeline else "no pipeline"
            raise CommandError("unsupported", f"{what}: nothing to tune (its model's manifest lists no variants, "
                                              f"or no latency_budget_ms applies)")
        not_running = [p.name for p in chosen if not p.running]
        if not_running:
            raise CommandError("failed", f"pipeline {', '.join(not_running)}: not running (a tune measures on "
                                         f"its recent items); start it first")
        later = Later()
        results: dict[str, Any] = {}
        errors: dict[str, str] = {}
        lock = threading.Lock()

        def done(name: str, result: TuneResult | None, error: str | None) -> None:
            with lock:
                if result is not None:
                    results[name] = result.as_dict()
                else:
                    errors[name] = error or "failed"
                if len(results) + len(errors) < len(chosen):
                    return
            if errors and not results:
                later.fail(CommandError("failed", "; ".join(f"{k}: {v}" for k, v in errors.items())))
            else:
                later.done({"tune": results, "errors": errors})

        def for_pipeline(name: str) -> Callable[[TuneResult | None, str | None], None]:
            return lambda result, error: done(name, result, error)

        for p in chosen:
            tuner.request(p.name, "command", for_pipeline(p.name))
        return later

    def reload(self) -> dict[str, Any]:
        """Read the config file again and apply what can change while running: pipelines that changed are
        restarted (on the same model slot), new ones started, removed ones stopped; `[supervisor]` applies
        to every pipeline; `[trusted_keys]` (re-read, key files too) to the next manifest checked. Every
        other section that changed is listed in `restart_needed`, never silently ignored."""
        try:
            fresh = load(self.agent.eff.path)
            check_pipelines(fresh)
            keys = self._trusted_keys(fresh)
        except BadInput as exc:
            raise CommandError("bad_config", str(exc)) from None
        old, new = self.agent.eff.config, fresh.config
        restart_needed = [k for k in type(new).model_fields
                          if k not in self.APPLIED_ON_RELOAD and getattr(old, k) != getattr(new, k)]
        applied: list[str] = []
        # `[profile] threads` applies now; the profile's other values are the daemon's sizing: a restart.
        kept_profile = old.profile.model_copy(update={"threads": new.profile.threads})
        if fresh.profile.threads != self.agent.eff.profile.threads:
            self._set_threads(fresh.profile.threads)
            applied.append("threads")
            if kept_profile == new.profile and "profile" in restart_needed:
                restart_needed.remove("profile")
        if new.supervisor != old.supervisor:
            applied.append("supervisor")
        service = self.agent.delivery
        if keys is not None and service is not None and set(keys.keys) != set(service.trusted.keys):
            # One assignment each: a manifest being checked now uses the old keys or the new, never a mix.
            service.trusted = service.downloader.trusted = keys
            applied.append("trusted_keys")
            logger.info("reload: trusted keys are now %s", ", ".join(sorted(keys.keys)) or "none")
        self.agent.eff = self.agent.eff.model_copy(update={"config": old.model_copy(update={
            "pipelines": new.pipelines, "supervisor": new.supervisor, "trusted_keys": new.trusted_keys,
            "profile": kept_profile})})
        before = {p.name: p for p in old.pipelines}
        after = {p.name: p for p in new.pipelines}
        report: dict[str, list[str]] = {"added": [], "removed": [], "restarted": [], "unchanged": []}
        for name in before.keys() - after.keys():
            self._retire(name)
            self.agent._slots.pop(name, None)
            report["removed"].append(name)
        for name, settings in after.items():
            if name in before and before[name] == settings:
                report["unchanged"].append(name)
                with self.agent._lock:
                    kept = self.agent.pipelines.get(name)
                if kept is not None:
                    kept.supervisor.budget.settings = new.supervisor  # read at its next failure
                continue
            if name in before:
                self._retire(name)
                report["restarted"].append(name)
            else:
                report["added"].append(name)
            p = self.agent._pipeline(settings)
            with self.agent._lock:
                self.agent.pipelines[name] = p
            if settings.enabled:
                p.start()
        self.agent._announce()
        return {**{k: sorted(v) for k, v in report.items()}, "applied": applied, "restart_needed": restart_needed}

    def _set_threads(self, threads: int) -> None:
        """The profile's thread count, now: every slot loads its running model again with it and swaps it in
        between two items (no restart, no gap in `seq`); the tuner sees the new count and measures again."""
        profile = self.agent.eff.profile.model_copy(update={"threads": threads})
        logger.info("reload: interpreter threads %d -> %d", self.agent.eff.profile.threads, threads)
        self.agent.eff = self.agent.eff.model_copy(update={"profile": profile})
        for p in self.agent._pipeline_list():
            p.profile = profile
        for slot in list(self.agent._slots.values()):
            slot.set_threads(profile)

    def _trusted_keys(self, eff: Effective) -> Any:
        """The keys `eff` trusts (BadInput names a bad entry); None when delivery is off."""
        from agent.ota import trusted_keys

        return trusted_keys(eff) if eff.config.delivery.enabled else None

    def _retire(self, name: str) -> None:
        with self.agent._lock:
            p = self.agent.pipelines.pop(name, None)
        if p is not None:
            p.halt()
            if not p.join(STOP_WAIT_S):
                # Its replacement starts anyway (on the same slot); this one ends once its item does.
                logger.warning("reload: pipeline %s is still ending its current item", name)
