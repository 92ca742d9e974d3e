"""The daemon's side of model delivery: the service made from the config, and the pipelines it reaches.

`DeliveryService` sees pipelines only through `PipelineHooks` (docs/delivery.md §8), and those
reach the pipelines' model slots (`agent.slot`), never their loops: a reload that rebuilds a
loop keeps its slot, so a deployment in probation goes on judging, and if need be undoing,
the model that runs. A model name may run in several pipelines (two cameras, one detector);
`ModelPipelines` makes their slots look like one: the swap goes into each of them (the first
takes the self-tested runner, the others load their own interpreter of the same file, since
an interpreter belongs to one thread), their health counters are summed, and a shadow trial
and the self-test's sample item use the first. Only pipelines whose loop is alive take part;
a stopped one picks the store's trial or active model up when it starts again (`delivered_spec`).
A pipeline that names its model by the delivered name (`delivered = "NAME"`) and finds none in
the store waits (`waiting_for_model`, no loop thread); the service's `on_active` tells the
daemon when a deployment of NAME has become active, and the daemon starts the waiting ones.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import threading
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import Effective, KeyFile, ShadowDefaults
from agent.delivery.activation import PipelineHealth, ProbationSettings, ShadowTrial
from agent.delivery.deploy_state import DeployState, State
from agent.delivery.download import DownloadSettings
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.selftest import Fit, Prepared, spec_for
from agent.delivery.service import DeliveryService, DeliverySettings, PipelineHooks
from agent.delivery.signed_manifest import DevicePolicy
from agent.delivery.signing import TrustedKeys, key_id
from agent.delivery.store import ModelStore
from agent.delivery.transport import Link
from agent.errors import BadInput, LeptonError
from agent.manifest import ModelSpec, load_spec
from agent.mqtt.topics import FleetTopics
from agent.pipeline import Pipeline
from agent.runtime import Model
from agent.sdnotify import Watchdog
from agent.slot import ModelSlot, build_runner
from agent.tasks.task import Runner
from agent.tomlpos import find_line
from agent.version import Version, version_key

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


# -- from the config ---------------------------------------------------------------------------


def _public_key(entry: str | KeyFile) -> Ed25519PublicKey:
    """The key from the config's text (base64 of the 32 raw bytes) or from a key file (PEM or base64)."""
    if isinstance(entry, str):
        data = entry.encode()
    else:
        try:
            data = entry.file.read_bytes()
        except OSError as exc:
            raise ValueError(f"{entry.file}: cannot read the key file ({exc.strerror})") from None
        if data.lstrip().startswith(b"-----BEGIN"):
            try:
                key = serialization.load_pem_public_key(data)
            except ValueError:
                raise ValueError(f"{entry.file}: not a PEM public key") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"{entry.file}: not an Ed25519 public key")
            return key
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except (binascii.Error, ValueError):
        what = "" if isinstance(entry, str) else f"{entry.file}: "
        raise ValueError(f"{what}not a base64 Ed25519 public key (32 raw bytes)") from None


def trusted_keys(eff: Effective) -> TrustedKeys:
    """The config's `[trusted_keys]`, each id checked against its key; BadInput names the entry and its line."""
    text = ""
    if eff.path is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = eff.path.read_text(encoding="utf-8")
    keys: dict[str, Ed25519PublicKey] = {}
    for kid, entry in eff.config.trusted_keys.items():
        line = find_line(text, ("trusted_keys", kid)) if text else None
        where = (f"{eff.path}: " if eff.path else "") + f'trusted_keys."{kid}"' + (f" (line {line})" if line else "")
        try:
            key = _public_key(entry)
        except ValueError as exc:
            raise BadInput(f"{where}: {exc}") from None
        if key_id(key) != kid:
            raise BadInput(f"{where}: the id does not match the key (its id is {key_id(key)})")
        keys[kid] = key
    return TrustedKeys(keys)


def device_policy(eff: Effective, backend: str) -> DevicePolicy:
    """What this device accepts: its backend, its profile class and the profile's size cap."""
    return DevicePolicy(backend=backend, board=eff.profile.name, max_model_bytes=int(eff.profile.max_model_mb * MIB))


def delivery_settings(eff: Effective, backend: str | None) -> DeliverySettings:
    d = eff.config.delivery
    return DeliverySettings(
        download=DownloadSettings(window=d.window, manifest_timeout=d.manifest_timeout_s,
                                  stall_timeout=d.chunk_timeout_s),
        probation=ProbationSettings(window_s=d.probation_s, stall_s=d.stall_s),
        latency_budget_ms=eff.profile.selftest_latency_ms,
        memory_budget=int(eff.profile.memory_budget_mb * MIB),
        shadow_timeout_s=d.shadow.timeout_s,
        backend=backend,
        threads=min(eff.profile.threads, os.cpu_count() or 1),
    )


def open_store(eff: Effective) -> ModelStore:
    """The model store (`delivery.store_dir`, default `<state_dir>/models`); LeptonError when unusable."""
    return ModelStore(eff.config.delivery.store_dir or eff.config.agent.state_dir / "models")


def make_service(eff: Effective, link: Link, store: ModelStore, backend: str, backend_option: str | None,
                 hooks: Any, baseline: Any, stop: threading.Event, watchdog: Watchdog | None = None) -> DeliveryService:
    service = DeliveryService(
        link, store, trusted_keys(eff), device_policy(eff, backend),
        device_id=eff.device_id, topics=FleetTopics(eff.config.mqtt.prefix),
        settings=delivery_settings(eff, backend_option), hooks=hooks, baseline=baseline, stop=stop,
    )
    if watchdog is not None:
        def overrun(over: bool) -> None:
            # A heart that never beats: systemd's watchdog ends a self-test stuck in the runtime (and the
            # agent); at the next start the self-test marker rolls that deployment back, not tried again.
            if over:
                watchdog.register("delivery self-test")
            else:
                watchdog.unregister("delivery self-test")

        service.overrun = overrun
    return service


def shadow_request(defaults: ShadowDefaults, given: dict[str, Any]) -> dict[str, Any]:
    """A deploy command's `shadow` object completed with the config's defaults.

    A command that sets `seconds` and not `items` runs for those seconds, not for the default item count."""
    merged: dict[str, Any] = defaults.model_dump(exclude={"timeout_s"})
    if given.get("seconds") is not None and "items" not in given:
        merged["items"] = None
    merged.update(given)
    return merged


def delivered_spec(store: ModelStore, name: str) -> ModelSpec | None:
    """The model of this name that the store says runs: the one on trial while a probation window is
    open (a pipeline started in it must run what is judged), else the active one. None: the pipeline
    runs its configured file, or (`delivered = NAME`) waits for a deployment."""
    slot = store.slot(name)
    active = slot.trial or slot.active
    if active is None:
        return None
    if not store.has_object(active.sha256):
        logger.error("model store: %s %s is active but its file is gone; not running it", active.name,
                     active.version)
        return None
    try:
        return spec_for(store, active)
    except (OSError, ValueError) as exc:
        logger.error("model store: %s %s cannot be read (%s); not running it", active.name, active.version, exc)
        return None


def configured_spec(pipeline: Pipeline) -> ModelSpec | None:
    """The model file the pipeline's config names (None when its files are bad, or when it names a
    delivered model: there is no file to go back to)."""
    if pipeline.settings.model is None:
        return None
    try:
        return load_spec(pipeline.settings.model, pipeline.settings.labels)
    except BadInput:
        return None


def configured_version(pipelines: list[Pipeline], name: str) -> Version | None:
    """The version of `name` the config gives its pipelines: what they run when the store has none."""
    for p in pipelines:
        spec = configured_spec(p)
        if spec is not None and spec.name == name and spec.version is not None:
            try:
                version_key(spec.version)
            except ValueError:
                return None
            return spec.version
    return None


def rollback_to_configured(service: DeliveryService, pipelines: list[Pipeline], name: str, version: Version | None,
                           request: str | None) -> dict[str, Any] | None:
    """Back to the model the config names, when the store keeps no older version: the config's model is
    the device's first known good. None when the config has no versioned model of that name (or another
    version than asked for)."""
    chosen = [(p, spec) for p in pipelines if (spec := configured_spec(p)) is not None and spec.name == name]
    if not chosen or chosen[0][1].version is None:
        return None
    target = chosen[0][1].version
    if version is not None and version_key(version) != version_key(target):
        return None
    undos = []
    try:
        for p, spec in chosen:
            if p.running:  # a stopped pipeline loads it when it starts (the store no longer names a model)
                model, runner = p.slot.prepare(spec)
                undos.append(p.slot.swap(spec, runner, model))
    except LeptonError as exc:
        for undo in reversed(undos):
            undo()
        raise DeliveryError(Reason.LOAD_FAILED, f"the configured model does not load: {exc}") from None
    before = service.store.deactivate(name)
    service.report(DeployState(name, target, State.ROLLED_BACK, progress=1.0, active=target, request=request,
                               detail=f"explicit rollback from {before.version if before else 'nothing'} "
                                      f"to the configured model"))
    return {"model": name, "active": target, "from": before.version if before else None, "configured": True}


# -- the pipelines of one model name ------------------------------------------------------------


class ModelPipelines:
    """The model slots of the running pipelines of one model name, as one `PipelineHooks`."""

    def __init__(self, slots: list[ModelSlot]) -> None:
        assert slots
        self.slots = slots
        self.lead = slots[0]

    def hooks(self) -> PipelineHooks:
        return PipelineHooks(swap=self.swap, health=self.health, attach=self.attach, fit=self.fit,
                             sample=self.lead.sample, make_runner=self.make_runner)

    def make_runner(self, model: Model, spec: ModelSpec) -> Runner:
        return build_runner(model, spec, self.lead.settings.task)

    def swap(self, prepared: Prepared) -> Any:
        undos = [self.lead.swap(prepared.spec, prepared.runner, prepared.model)]
        try:
            for slot in self.slots[1:]:
                model, runner = slot.prepare(prepared.spec)
                undos.append(slot.swap(prepared.spec, runner, model))
        except LeptonError:
            for undo in reversed(undos):
                undo()
            raise

        def undo_all() -> None:
            for undo in reversed(undos):
                undo()

        return undo_all

    def health(self) -> PipelineHealth:
        states = [slot.health() for slot in self.slots]
        errors = [h.last_error for h in states if h.last_error]
        return PipelineHealth(items=sum(h.processed for h in states), errors=sum(h.errors for h in states),
                              restarts=sum(h.restarts for h in states), last_error=errors[0] if errors else None)

    def attach(self, trial: ShadowTrial | None) -> None:
        self.lead.attach(trial)

    def fit(self) -> Fit | None:
        model, runner = self.lead.model, self.lead.runner
        if model is None:
            return None
        if self.lead.variant is not None:
            # The governor runs a cheaper variant now (its tensors may differ): the base is what is replaced.
            return Fit(item_kind=runner.item_kind if runner is not None else None)
        return Fit.like(model, runner)


__all__ = ["ModelPipelines", "configured_version", "delivered_spec", "make_service", "open_store",
           "rollback_to_configured", "shadow_request", "trusted_keys"]
