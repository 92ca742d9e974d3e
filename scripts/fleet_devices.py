"""The virtual devices of scripts/fleet_sim.py, N of them in one process (issue 13).

Each device is the agent's own MQTT link (`agent.mqtt.link.Link`: its own client id, retained will, birth and
heartbeat, presence answers, a spool of results sent at QoS 1, telemetry at QoS 0) and pulls models with the
agent's own delivery client (`agent.delivery.download.Downloader` into a `ModelStore`: manifest signature and
every chunk's hash checked, the file committed and made active). What a virtual device does not do is run the
model: no interpreter is loaded (1,000 interpreters would measure this machine's memory, not the fleet).

fleet_sim.py runs a `Fleet` in each of its worker processes (scripts/fleet_workers.py), a contiguous slice of
the device ids each; scripts/bench_dashboard.py runs one in its own process.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.agent_state import AgentState  # noqa: E402
from agent.config import MqttSection  # noqa: E402
from agent.delivery.deploy_state import DeployState, State  # noqa: E402
from agent.delivery.download import Downloader  # noqa: E402
from agent.delivery.reasons import DeliveryError  # noqa: E402
from agent.delivery.signed_manifest import DevicePolicy  # noqa: E402
from agent.delivery.signing import TrustedKeys  # noqa: E402
from agent.delivery.store import ModelStore  # noqa: E402
from agent.mqtt.link import Link  # noqa: E402
from agent.mqtt.spool import Spool  # noqa: E402
from agent.mqtt.topics import FleetTopics, Topics  # noqa: E402
from agent.mqtt.wire import encode  # noqa: E402
from agent.version import parse_version  # noqa: E402

Protocol = Literal["5", "3.1.1"]


def device_id(i: int) -> str:
    return f"sim-{i:04d}"


class VirtualDevice:
    """One device: the agent's link, spool and delivery client, answering ping/status/deploy."""

    def __init__(self, folder: Path, url: str, device: str, prefix: str, group: str, trusted: TrustedKeys,
                 pool: ThreadPoolExecutor, heartbeat_s: float = 60.0, protocol: Protocol = "5") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.device, self.pool = device, pool
        self.topics = Topics(prefix, device)
        self.spool = Spool(folder / "spool.sqlite3", 1 << 20)
        self.state = AgentState(folder / "agent.sqlite3")
        self.stop = threading.Event()
        self.seq = 0
        self.outcome: str | None = None
        """The last deploy's end: "active" or "failed" (what the worker reports when it closes)."""
        self.link = Link(MqttSection(broker=(url,), prefix=prefix, keepalive_s=60, heartbeat_s=heartbeat_s,
                                     protocol=protocol),
                         topics=self.topics, groups=(group,), client_id=f"sim-{device}", spool=self.spool,
                         next_bdseq=self.state.next_bdseq, birth=lambda: {"agent": "fleet_sim", "groups": [group],
                                                                     "pipelines": [{"name": "p", "state": "running"}]},
                         on_command=self._on_command, stop=self.stop)
        self.store = ModelStore(folder / "store")
        self.downloader = Downloader(self.link, self.store, trusted, DevicePolicy(backend="sim", board="sim"),
                                     topics=FleetTopics(prefix))

    def start(self) -> None:
        self.link.start()

    def close(self) -> None:
        self.stop.set()
        self.link.close({"state": "stopped"}, 2.0)
        self.spool.close()
        self.state.close()

    def result(self) -> None:
        self.seq += 1
        self.spool.append("p", self.topics.results("p"), {"pipeline": "p", "classes": [{"label": "x", "score": 0.9}]})

    def telemetry(self) -> None:
        # The fields a fleet view shows (docs/telemetry.md), with made-up figures: what a dashboard has to parse.
        self.link.offer(self.topics.telemetry, {
            "ts": time.time(), "v": 1, "cpu_percent": 12.5, "rss_mb": 80.0, "temp_c": 51.0, "throttled": None,
            "profile": "sim", "spool": {"queued": 0, "dropped": 0, "bytes": 0},
            "governor": {"enabled": True, "level": 0, "paused": False},
            "pipelines": {"p": {"state": "running", "fps": 5.0, "variant": None,
                                "latency_ms": {"p50": 8.0, "p95": 11.0, "p99": 14.0}}}})

    def _reply(self, cmd_id: Any, ok: bool, body: dict[str, Any]) -> None:
        self.link.send(self.topics.reply, {"id": cmd_id, "ok": ok, **body})

    def _on_command(self, topic: str, payload: bytes) -> None:
        try:
            cmd = json.loads(payload)
        except ValueError:
            return
        action = cmd.get("action")
        if action == "ping":
            self._reply(cmd.get("id"), True, {"result": {"pong": True}})
        elif action == "deploy":
            self.pool.submit(self._deploy, cmd)
        else:
            self._reply(cmd.get("id"), False, {"error": {"code": "unknown_action", "message": str(action)}})

    def _state(self, name: str, version: Any, state: State, request: Any, **kw: Any) -> None:
        body = DeployState(name, version, state, request=request, **kw).payload()
        self.link.publish(self.topics.deploy, encode(body), qos=1, retain=True)

    def _deploy(self, cmd: dict[str, Any]) -> None:
        name, version, request = cmd["model"], parse_version(str(cmd["version"])), cmd.get("id")
        try:
            signed = self.downloader.fetch_manifest(name, version, self.stop)
            self._state(name, version, State.DOWNLOADING, request)
            stored, _ = self.downloader.download(signed, self.stop)
            self.store.activate(stored)
            self._state(name, version, State.ACTIVE, request, progress=1.0, active=version)
            self.outcome = "active"
            self._reply(request, True, {"result": {"active": str(version)}})
        except DeliveryError as exc:
            self.outcome = "failed"
            self._state(name, version, State.FAILED, request, reason=exc.reason, detail=str(exc))
            self._reply(request, False, {"error": {"code": exc.reason.value, "message": str(exc)}})


class Fleet:
    """N virtual devices (ids from sim-`first`) and the clock that makes their results and telemetry."""

    def __init__(self, folder: Path, url: str, n: int, prefix: str, trusted: TrustedKeys,
                 result_every_s: float = 10.0, telemetry_every_s: float = 30.0, protocol: Protocol = "5",
                 first: int = 0) -> None:
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sim-deploy")
        self.devices = [VirtualDevice(folder / f"d{i:04d}", url, device_id(i), prefix, "sim", trusted, self.pool,
                                      protocol=protocol) for i in range(first, first + n)]
        self.result_every_s, self.telemetry_every_s = result_every_s, telemetry_every_s
        self._stop = threading.Event()
        self._clock = threading.Thread(target=self._tick, name="sim-clock", daemon=True)

    def start(self, timeout: float = 120.0) -> float:
        """Start every device; the seconds until all are subscribed to their commands."""
        started = time.monotonic()
        for d in self.devices:
            d.start()
        deadline = started + timeout
        for d in self.devices:
            if not d.link.subscribed.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{d.device} not connected within {timeout:g} s")
        self._clock.start()
        return time.monotonic() - started

    def _tick(self) -> None:
        # Spread each device's results and telemetry evenly over the period: realistic rates, no bursts.
        n = len(self.devices)
        step = self.result_every_s / n
        i = 0
        while not self._stop.wait(step):
            d = self.devices[i % n]
            d.result()
            if (i // n) % max(1, round(self.telemetry_every_s / self.result_every_s)) == 0:
                d.telemetry()
            i += 1

    def counts(self) -> dict[str, int]:
        """How many devices ended their last deploy active, failed, or never had one; and how often their links
        connected again (a starved link misses its keepalive and reconnects: the simulator measuring itself)."""
        out = {k: sum(1 for d in self.devices if d.outcome == v)
               for k, v in (("active", "active"), ("failed", "failed"), ("no_deploy", None))}
        out["reconnects"] = sum(max(0, d.link.stats.connects - 1) for d in self.devices)
        out["half_open"] = sum(d.link.stats.half_open for d in self.devices)
        return out

    def close(self) -> None:
        self._stop.set()
        with ThreadPoolExecutor(max_workers=32) as closer:
            list(closer.map(VirtualDevice.close, self.devices))
        self.pool.shutdown(wait=False, cancel_futures=True)
