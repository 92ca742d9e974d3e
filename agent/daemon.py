"""`lepton-agent run`: the daemon. Pipelines, the MQTT link and the command worker under one stop event.

Start: check the configuration (models, sources, TLS files, password, trusted keys) before
anything runs, so a bad config exits 2 with one line; open the spool, the state and the model
store; start the link, the command worker, the enabled pipelines (each on the store's active
model of its name when there is one) and the model delivery service, which shares the link.
SIGTERM/SIGINT set the stop event; the ordered shutdown then halts the pipelines, publishes the
retained `stopped` status, sends what it can of the spool, disconnects cleanly and exits, all
within `SHUTDOWN_S`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.actions import Actions
from agent.agent_state import AgentState
from agent.command_bus import CommandBus, Handler
from agent.commands import Command
from agent.config import Effective, PipelineSettings, parse_broker_url
from agent.config_load import load
from agent.delivery.service import DeliveryService, PipelineHooks
from agent.delivery.store import ModelStore
from agent.errors import BadInput
from agent.governor import Governor
from agent.homeassistant import Discovery
from agent.manifest import ModelSpec
from agent.monitor import Monitor
from agent.mqtt.link import Link
from agent.mqtt.spool import Spool
from agent.mqtt.tls import read_password, tls_context
from agent.mqtt.topics import Topics
from agent.pipeline import Pipeline, check_pipelines
from agent.runtime import Backend, load_backend
from agent.samples.capturer import CaptureWriter
from agent.samples.sample_store import SampleStore
from agent.sdnotify import Notifier, Watchdog, watchdog_interval
from agent.slot import ModelSlot
from agent.sources.network import network_source
from agent.tune import Tuner

if TYPE_CHECKING:
    from agent.prometheus import PrometheusEndpoint

logger = logging.getLogger(__name__)

STATUS_EVERY_S = 5.0
"""How often the systemd STATUS= line is refreshed."""

SHUTDOWN_S = 4.5
"""Everything is stopped, said and flushed within this after SIGTERM (systemd waits longer)."""


def check_link(eff: Effective) -> str | None:
    """TLS files (the key's mode) and the password; returns the password (never logged)."""
    mqtt = eff.config.mqtt
    where = f"{eff.path}: " if eff.path else ""
    try:
        if any(parse_broker_url(u)[2] for u in mqtt.broker):
            tls_context(mqtt)
        return read_password(mqtt.auth.password_file, mqtt.auth.password_env)
    except BadInput as exc:
        raise BadInput(f"{where}{exc}") from None


def check_delivery(eff: Effective) -> None:
    """The trusted keys: each parses and its id is its key's (BadInput names the entry and line)."""
    from agent.ota import trusted_keys

    trusted_keys(eff)


class Agent:
    """The running daemon."""

    def __init__(self, eff: Effective) -> None:
        self.eff = eff
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.topics = Topics(eff.config.mqtt.prefix, eff.device_id)
        self.pipelines: dict[str, Pipeline] = {}
        self._slots: dict[str, ModelSlot] = {}
        """The model slot of each pipeline name: kept when a reload rebuilds the pipeline (agent.slot)."""
        self._lock = threading.Lock()  # pipelines dict: the command worker changes it, status reads it
        backend = eff.config.agent.backend
        self.backend_name: str | None = None if backend == "auto" else backend
        self.spool: Spool | None = None
        self.state: AgentState | None = None
        self.link: Link | None = None
        self.commands: CommandBus | None = None
        self.actions = Actions(self)
        self.backend: Backend | None = None
        self.store: ModelStore | None = None
        self.delivery: DeliveryService | None = None
        # systemd: READY/STATUS/STOPPING, and WATCHDOG=1 only while every loop makes progress.
        self.notifier = Notifier()
        self.watchdog = Watchdog(self.notifier, watchdog_interval(), self.stop)
        self.governor: Governor | None = None
        self.tuner: Tuner | None = Tuner(self._pipeline_list, self.stop,
                                         level=lambda: 0 if self.governor is None else self.governor.level)
        """Measures each pipeline's model variants on this device and runs the cheapest within budget."""
        self.monitor: Monitor | None = None
        self.discovery: Discovery | None = None
        self.prometheus: PrometheusEndpoint | None = None
        self.capture: CaptureWriter | None = None
        """Sample capture's writer and store, made when a pipeline enables `[pipelines.capture]`."""

    # -- life cycle ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that can fail on bad configuration, before anything starts (BadInput)."""
        check_pipelines(self.eff)
        password = check_link(self.eff)
        check_delivery(self.eff)
        self.backend = load_backend(self.backend_name)
        state_dir = self.eff.config.agent.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self.spool = Spool(self.eff.spool_path, self.eff.spool_cap_bytes)
            self.state = AgentState(state_dir / "agent.sqlite3")
        except OSError as exc:
            raise BadInput(f"agent.state_dir: {state_dir}: cannot use it ({exc.strerror})") from None
        if self.eff.config.delivery.enabled:
            from agent.ota import open_store

            self.store = open_store(self.eff)  # before the pipelines: they start on its active models
        for p in self.eff.config.pipelines:
            self.pipelines[p.name] = self._pipeline(p)
        self.commands = CommandBus(self._handlers(), self.state, self._reply, self.stop)
        mqtt = self.eff.config.mqtt
        self.link = Link(
            mqtt,
            topics=self.topics,
            groups=self.eff.config.agent.groups,
            client_id=self.eff.client_id,
            spool=self.spool,
            next_bdseq=self.state.next_bdseq,
            birth=self.birth,
            on_command=self.commands.submit,
            stop=self.stop,
            password=password,
        )
        self._serve_wants()
        if self.store is not None:
            from agent.ota import make_service

            self.delivery = make_service(self.eff, self.link, self.store, self.backend.name, self.backend_name,
                                         hooks=self._model_hooks, baseline=self._configured_version, stop=self.stop,
                                         watchdog=self.watchdog)
            self.delivery.on_active = self._model_active
        self._prepare_reporting()

    def _prepare_reporting(self) -> None:
        """Telemetry, the governor, Home Assistant discovery and the Prometheus endpoint (issue 7)."""
        assert self.link is not None
        cfg, profile = self.eff.config, self.eff.profile
        if cfg.governor.enabled:
            self.governor = Governor(cfg.governor, profile, self._pipeline_list)
            tuner = self.tuner
            if tuner is not None:
                self.governor.on_level.append(lambda level: tuner.request_all(f"pressure level {level}"))
        link = self.link
        if cfg.telemetry.enabled or self.governor is not None or cfg.prometheus.enabled:
            self.monitor = Monitor(
                pipelines=self._pipeline_list, spool=self._spool_figures,
                publish=(lambda payload: link.offer(self.topics.telemetry, payload)) if cfg.telemetry.enabled else None,
                governor=self.governor, root=cfg.telemetry.root,
                disk_path=cfg.telemetry.disk_path or cfg.agent.state_dir,
                telemetry_interval_s=profile.telemetry_interval_s, governor_interval_s=cfg.governor.interval_s,
                profile=profile.name, stop=self.stop)
        if cfg.homeassistant.enabled:
            self.discovery = Discovery(
                link, self.topics, cfg.homeassistant, device=self.eff.device_id,
                model=profile.description or profile.name, pipelines=lambda: [p.name for p in self._pipeline_list()],
                telemetry=cfg.telemetry.enabled, telemetry_interval_s=profile.telemetry_interval_s,
                root=cfg.telemetry.root,
                cameras=lambda: [p.name for p in self._pipeline_list() if network_source(p.settings.source)])
            self.discovery.attach()
            if self.monitor is not None:
                self.monitor.on_tick.append(self.discovery.refresh)
        if cfg.prometheus.enabled:
            from agent.prometheus import PrometheusEndpoint

            monitor = self.monitor
            self.prometheus = PrometheusEndpoint(cfg.prometheus.host, cfg.prometheus.port, self.eff.device_id,
                                                 lambda: None if monitor is None else monitor.latest)
            self.prometheus.start()  # BadInput (exit 2) when the extra is missing or the port is taken

    def _pipeline_list(self) -> list[Pipeline]:
        with self._lock:
            return list(self.pipelines.values())

    def _spool_figures(self) -> dict[str, Any] | None:
        if self.spool is None:
            return None
        st = self.spool.stats()
        return {"queued": st.queued, "dropped": st.dropped, "bytes": st.bytes}

    def _pipeline(self, settings: PipelineSettings) -> Pipeline:
        if network_source(settings.source):
            # A camera down when the agent starts is waited for (retried with backoff, shown in status),
            # not parked as failed: it is a runtime condition, not bad input. The config may still say no.
            settings = settings.model_copy(update={"source_options": {"retry_open": True,
                                                                      **settings.source_options}})
        slot = self._slots.get(settings.name)
        p = Pipeline(settings, profile=self.eff.profile, supervisor=self.eff.config.supervisor,
                     backend=self.backend_name, sink=self._spool_result, stop=self.stop,
                     ring_size=self.eff.config.telemetry.ring_size, slot=slot,
                     capture=self._capture_writer() if settings.capture.enabled else None)
        self._slots[settings.name] = p.slot
        p.on_state = self._announce
        p.watchdog = self.watchdog
        if self.store is not None and slot is None:
            p.slot.model_source = self._delivered
            with contextlib.suppress(BadInput):  # reported when the loop starts
                p.slot.spec = p.slot.configured_spec()  # for status, before the model loads
        return p

    def _capture_writer(self) -> CaptureWriter:
        if self.capture is None:
            store = SampleStore(self.eff.config.agent.state_dir / "samples", self.eff.profile.capture_cap_bytes)
            self.capture = CaptureWriter(store, self.eff.device_id, self.stop)
            self.capture.start()
            self._serve_wants()
        return self.capture

    def _serve_wants(self) -> None:
        """Pulls on brokers without shared retained messages ask the device for its offered samples."""
        if self.link is not None and self.capture is not None:
            self.link.subscribe(f"{self.topics.base}/samples/+/want", self.actions.sample_want, qos=0)

    def _delivered(self, name: str) -> ModelSpec | None:
        from agent.ota import delivered_spec

        return delivered_spec(self.store, name) if self.store is not None else None

    def _model_active(self, name: str) -> None:
        """A deployment (or rollback) made model `name` active: start the pipelines waiting for it."""
        started = []
        for p in self._pipeline_list():
            if p.waiting and p.settings.delivered == name and not self.stop.is_set():
                p.start()
                started.append(p.name)
        if started:
            logger.info("model %s is active: pipeline %s started", name, ", ".join(started))
            self._announce()

    def _configured_version(self, name: str) -> Any:
        from agent.ota import configured_version

        return configured_version(self._pipeline_list(), name)

    def _model_hooks(self, name: str) -> PipelineHooks | None:
        """How delivery reaches the live pipelines running model `name` (None: none runs it now)."""
        from agent.ota import ModelPipelines

        chosen = [p.slot for p in self._pipeline_list() if p.running and p.spec is not None and p.spec.name == name]
        return ModelPipelines(chosen).hooks() if chosen else None

    def _spool_result(self, pipeline: str, payload: dict[str, Any]) -> None:
        assert self.spool is not None
        self.spool.append(pipeline, self.topics.results(pipeline), payload)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or `stop` is set); the exit code."""
        self.prepare()
        self._install_signals()
        assert self.link is not None and self.commands is not None
        logger.info("lepton-agent %s: device %s, profile %s, %d pipelines", __version__, self.eff.device_id,
                    self.eff.profile.name, len(self._pipeline_list()))
        self.link.heartbeat = self.watchdog.register("mqtt")
        self.link.start()
        self.commands.start()
        if self.delivery is not None:
            self.delivery.recover()  # a model left on trial by a stop or crash is not what the pipelines start on
        for p in self._pipeline_list():  # the command worker runs already: a reload may change them
            if p.settings.enabled:
                p.start()
        if self.delivery is not None:
            self.delivery.start()  # after the pipelines: a resumed deployment finds them running
        if self.tuner is not None:
            self.tuner.start()  # tunes each pipeline with a budget and variants once it runs
        if self.monitor is not None:
            self.monitor.start()
        # Ready once the first connection attempt has an outcome, whatever it is: the agent works offline too.
        self.link.attempted.wait(self.eff.config.mqtt.connect_timeout_s + 2.0)
        if not self.stop.is_set():
            self.notifier.ready(self.status_line())
            self.watchdog.start()
        # Telemetry (issue 7) starts here: a loop on self.stop publishing status_snapshot()-based
        # payloads on self.topics.telemetry every self.eff.profile.telemetry_interval_s.
        while not self.stop.wait(STATUS_EVERY_S):
            if self.notifier.enabled:
                self.notifier.status(self.status_line())
        self.shutdown()
        return 0

    def status_line(self) -> str:
        """The short state systemctl shows (sd_notify STATUS=)."""
        link = "online" if self.link is not None and self.link.connected.is_set() else "offline"
        pipelines = self._pipeline_list()  # under the lock: `reload` changes them in the command worker
        running = sum(1 for p in pipelines if p.stats.state == "running")
        queued = self.spool.stats().queued if self.spool is not None else 0
        return f"{link}; {running}/{len(pipelines)} pipelines running; {queued} results queued"

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded (tests): whoever runs us sets `stop`

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("%s: stopping", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def shutdown(self) -> None:
        """The ordered stop: pipelines, commands, goodbye + flush on the link, then the files."""
        deadline = time.monotonic() + SHUTDOWN_S
        self.stop.set()
        self.notifier.stopping()
        # A copy taken under the lock; a pipeline a reload adds after it ends at once (`stop` is set).
        pipelines = self._pipeline_list()
        for p in pipelines:
            p.halt()
        for p in pipelines:
            if not p.join(max(0.0, min(2.0, deadline - time.monotonic() - 1.5))):
                logger.warning("pipeline %s did not stop in time", p.name)
        if self.capture is not None:
            self.capture.drain(max(0.0, min(1.0, deadline - time.monotonic() - 2.0)))  # what the loops kept
        if self.commands is not None:
            self.commands.close(0.3)
        if self.delivery is not None:
            # A download or probation in progress stops at once and resumes (or rolls back) at the next start.
            self.delivery.join(max(0.1, min(1.0, deadline - time.monotonic() - 1.0)))
        if self.tuner is not None:
            self.tuner.join(0.5)  # a tune in progress ends with its current variant: the thread is a daemon's
        if self.prometheus is not None:
            self.prometheus.close()
        if self.monitor is not None:
            self.monitor.join(0.5)
        if self.link is not None:
            goodbye = {**self.birth(), "state": "stopped"}
            self.link.close(goodbye, max(0.5, deadline - time.monotonic() - 0.3))
        if self.spool is not None:
            self.spool.close()
        if self.state is not None:
            self.state.close()
        self.watchdog.join(1.0)
        self.notifier.close()
        logger.info("stopped")

    # -- what the agent says about itself -----------------------------------------------------------

    def birth(self) -> dict[str, Any]:
        """The `online` status (DESIGN §5) without state/bdseq/ts/v, which the link adds."""
        with self._lock:
            pipelines = [p.describe() for p in self.pipelines.values()]
        models: dict[str, Any] = {}
        for p in pipelines:
            if "model" in p:
                models[p["model"]["name"]] = {"version": p["model"]["version"], "task": p["task"]}
        return {
            "agent": __version__,
            "device": self.eff.device_id,
            "groups": list(self.eff.config.agent.groups),
            "profile": self.eff.profile.name,
            "backend": self.backend.name if self.backend is not None else None,
            "pipelines": pipelines,
            "models": models,
        }

    def status_snapshot(self) -> dict[str, Any]:
        """Everything the `status` command reports (and the base telemetry builds on)."""
        out = self.birth()
        with self._lock:
            stats = {name: {**p.stats.as_dict(), "source": p.source_status()} for name, p in self.pipelines.items()}
        spool = self.spool.stats() if self.spool else None
        out.update(
            state="online" if self.link is not None and self.link.connected.is_set() else "offline",
            uptime_s=round(time.monotonic() - self.started, 1),
            pipeline_stats=stats,
            spool=None if spool is None else {"queued": spool.queued, "dropped": spool.dropped,
                                              "bytes": spool.bytes, "cap_bytes": self.eff.spool_cap_bytes},
            link=None if self.link is None else {**self.link.stats.as_dict(), "bdseq": self.link.bdseq},
            commands=None if self.commands is None else self.commands.stats.as_dict(),
            governor=None if self.governor is None else self.governor.state(),
            tune=None if self.tuner is None else self.tuner.state(),
        )
        if self.capture is not None:
            out["capture"] = self.capture_status()
        return out

    def capture_status(self) -> dict[str, Any]:
        assert self.capture is not None
        store = self.capture.store
        with self._lock:
            per = {n: p.capture.stats.as_dict() for n, p in self.pipelines.items() if p.capture is not None}
        return {"samples": len(store), "bytes": store.size_bytes, "cap_bytes": store.cap_bytes,
                **store.stats.as_dict(), "errors": self.capture.errors, "pipelines": per}

    def _reply(self, reply: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.send(self.topics.reply, reply)

    def _handlers(self) -> dict[str, Handler]:
        return {**self.actions.handlers(), "retire": self._cmd_retire}

    def _cmd_retire(self, command: Command) -> dict[str, Any]:
        """Home Assistant's side of the device: empty every discovery config (agent.homeassistant.retire)."""
        from agent.homeassistant import retire

        assert self.link is not None
        return retire(self.discovery, self.link, self.eff.config.homeassistant.discovery_prefix, self.eff.device_id,
                      [p.name for p in self._pipeline_list()])

    def _announce(self) -> None:
        if self.link is not None:
            self.link.announce()


def run(config: str | None) -> int:
    """`lepton-agent run`: load and check the config, then run until stopped."""
    return Agent(load(config)).run()
