#!/usr/bin/env python3
"""N virtual devices in one process, to measure fleet-level behaviour instead of guessing it (issue 13).

Each device is the agent's own MQTT link (`agent.mqtt.link.Link`: its own client id, retained will, birth and
heartbeat, presence answers, a spool of results sent at QoS 1, telemetry at QoS 0) and pulls models with the
agent's own delivery client (`agent.delivery.download.Downloader` into a `ModelStore`: manifest signature and
every chunk's hash checked, the file committed and made active). What a virtual device does not do is run the
model: no interpreter is loaded (1,000 interpreters would measure this machine's memory, not the fleet).

    scripts/fleet_sim.py --broker mqtt://host:1883 -n 200            # run a fleet until Ctrl-C
    scripts/fleet_sim.py --bench -n 1000 [--model PATH]              # the benchmark: JSON on stdout

The benchmark starts its own mosquitto and reports, side by side: broker CPU and RSS with N devices online,
`lepton-fleet status` (time to list all N, its CPU and RSS), `lepton-fleet cmd group:sim ping` (time until
all N replies), a model deployed to all N (time until every device is active with a verified file, bytes the
broker sent against N x the model size) and the same file sent once per device with `mosquitto_pub -f`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

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

FLEET = [sys.executable, "-c", "import sys; from agent.cli import fleet_main; sys.exit(fleet_main())"]


class VirtualDevice:
    """One device: the agent's link, spool and delivery client, answering ping/status/deploy."""

    def __init__(self, folder: Path, url: str, device: str, prefix: str, group: str, trusted: TrustedKeys,
                 pool: ThreadPoolExecutor, heartbeat_s: float = 60.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.device, self.pool = device, pool
        self.topics = Topics(prefix, device)
        self.spool = Spool(folder / "spool.sqlite3", 1 << 20)
        self.state = AgentState(folder / "agent.sqlite3")
        self.stop = threading.Event()
        self.seq = 0
        self.link = Link(MqttSection(broker=(url,), prefix=prefix, keepalive_s=60, heartbeat_s=heartbeat_s),
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
            self._reply(request, True, {"result": {"active": str(version)}})
        except DeliveryError as exc:
            self._state(name, version, State.FAILED, request, reason=exc.reason, detail=str(exc))
            self._reply(request, False, {"error": {"code": exc.reason.value, "message": str(exc)}})


class Fleet:
    """N virtual devices and the clock that makes their results and telemetry."""

    def __init__(self, folder: Path, url: str, n: int, prefix: str, trusted: TrustedKeys,
                 result_every_s: float = 10.0, telemetry_every_s: float = 30.0) -> None:
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sim-deploy")
        self.devices = [VirtualDevice(folder / f"d{i:04d}", url, f"sim-{i:04d}", prefix, "sim", trusted, self.pool)
                        for i in range(n)]
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

    def close(self) -> None:
        self._stop.set()
        with ThreadPoolExecutor(max_workers=32) as closer:
            list(closer.map(VirtualDevice.close, self.devices))
        self.pool.shutdown(wait=False, cancel_futures=True)


# -- the benchmark ---------------------------------------------------------------------------------------------


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime, r.ru_maxrss


def _run_tool(*args: str) -> dict[str, Any]:
    cpu0, _ = _children()
    t0 = time.monotonic()
    done = subprocess.run([*FLEET, *args], capture_output=True, text=True, check=False, cwd=ROOT)
    took = time.monotonic() - t0
    cpu1, maxrss = _children()
    return {"rc": done.returncode, "seconds": round(took, 2), "cpu_s": round(cpu1 - cpu0, 2),
            "max_rss_mb_children": round(maxrss / 1024, 1), "out": done.stdout, "err": done.stderr[-500:]}


def bench(n: int, model: Path, folder: Path) -> dict[str, Any]:
    from broker import Broker
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.delivery.signing import key_id, public_text
    from agent.fleet.publish import build, upload
    from agent.mqtt.client import BrokerAddress, PahoLink

    key = Ed25519PrivateKey.generate()
    trusted = TrustedKeys.from_config({key_id(key.public_key()): public_text(key.public_key())})
    prefix = "lepton"
    out: dict[str, Any] = {"devices": n, "machine": {"cpus": os.cpu_count()}}
    broker = Broker(folder / "broker", extra="sys_interval 1\nmax_connections -1").start()
    assert broker.proc is not None
    fleet = Fleet(folder / "fleet", broker.url, n, prefix, trusted)
    watcher = PahoLink(BrokerAddress("127.0.0.1", broker.port, False)).start()
    sys_bytes = SysBytes(watcher)
    try:
        cpu0 = _proc_cpu_s(broker.proc.pid)
        out["online_s"] = round(fleet.start(), 2)
        t0 = time.monotonic()
        threading.Event().wait(10.0)  # ten seconds of a steady fleet: results, telemetry, heartbeats
        out["broker_idle"] = {"cpu_percent": round(100 * (_proc_cpu_s(broker.proc.pid) - cpu0)
                                                   / (time.monotonic() - t0 + out["online_s"]), 1),
                              "rss_mb": round(broker.rss_kb() / 1024, 1)}
        url = ["--broker", broker.url, "--prefix", prefix]
        status = _run_tool("status", "--format", "json", "--settle", "3", *url)
        rows = status.pop("out").splitlines()
        out["status"] = {**status, "devices_listed": len(rows),
                         "online": sum(1 for r in rows if json.loads(r).get("presence") == "yes")}

        replies: dict[str, float] = {}
        lock = threading.Lock()
        cmd_id = "bench-ping"

        def on_reply(topic: str, payload: bytes) -> None:
            if b'"bench-ping"' in payload:
                with lock:
                    replies.setdefault(topic, time.monotonic())

        watcher.subscribe(f"{prefix}/+/reply", on_reply)
        watcher.wait_subscribed(10)
        t0 = time.monotonic()
        ping = _run_tool("cmd", "group:sim", "ping", "--id", cmd_id, "--timeout", "20", "--format", "json", *url)
        ping.pop("out")
        with lock:
            last = max(replies.values(), default=t0)
            out["group_cmd"] = {**ping, "replies": len(replies), "all_replies_s": round(last - t0, 2)}

        pub = build(model, name="bench", version=parse_version("1"), key=key, chunk_size=64 * 1024, task="classify")
        size = pub.manifest["size"]
        publisher = PahoLink(BrokerAddress("127.0.0.1", broker.port, False)).start()
        upload(publisher, pub, FleetTopics(prefix))
        publisher.close()
        active: set[str] = set()
        done = threading.Event()

        def on_deploy(topic: str, payload: bytes) -> None:
            if b'"active"' in payload and b'"bench"' in payload:
                with lock:
                    active.add(topic)
                    if len(active) == n:
                        done.set()

        cpu0, t0 = _proc_cpu_s(broker.proc.pid), time.monotonic()
        sent = sys_bytes.at(t0)
        watcher.subscribe(f"{prefix}/+/deploy", on_deploy)
        deploy = _run_tool("deploy", "bench@1", "--to", "group:sim", "--no-wait", *url)
        deploy.pop("out")
        done.wait(600)
        took = time.monotonic() - t0
        broker_cpu = _proc_cpu_s(broker.proc.pid) - cpu0
        sent_after = sys_bytes.after(time.monotonic())
        out["deploy"] = {"model_bytes": size, "active_and_verified": len(active), "seconds": round(took, 2),
                         "broker_bytes_sent": sent_after - sent, "ideal_bytes": n * size,
                         "ratio_to_ideal": round((sent_after - sent) / (n * size), 3),
                         "broker_cpu_s": round(broker_cpu, 2), "broker_rss_mb": round(broker.rss_kb() / 1024, 1),
                         "tool": deploy}
        out["mosquitto_pub_per_device"] = _baseline(broker, watcher, model, n, sys_bytes)
    finally:
        watcher.close()
        fleet.close()
        broker.stop()
    return out


class SysBytes:
    """The broker's `$SYS/broker/bytes/sent` as it is updated (every second: `sys_interval 1`)."""

    def __init__(self, link: Any) -> None:
        self.updates: list[tuple[float, int]] = []
        self.cond = threading.Condition()
        link.subscribe("$SYS/broker/bytes/sent", self._on, qos=0)

    def _on(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.updates.append((time.monotonic(), int(payload)))
            self.cond.notify_all()

    def at(self, when: float) -> int:
        """The last value published before `when` (at most a second old)."""
        with self.cond:
            self.cond.wait_for(lambda: any(t < when for t, _ in self.updates), 10)
            return [v for t, v in self.updates if t < when][-1]

    def after(self, when: float) -> int:
        """The first value published over a second after `when`: it counts everything sent until `when`."""
        with self.cond:
            self.cond.wait_for(lambda: any(t > when + 1.05 for t, _ in self.updates), 10)
            return next(v for t, v in self.updates if t > when + 1.05)


def _baseline(broker: Any, link: Any, model: Path, n: int, sys_bytes: SysBytes) -> dict[str, Any]:
    """The same file to each device once with the C client: one `mosquitto_pub -f` per device, one subscriber."""
    tool = shutil.which("mosquitto_pub")
    if tool is None:
        return {"skipped": "mosquitto_pub not installed"}
    arrived = threading.Semaphore(0)
    link.subscribe("baseline/#", lambda t, p: arrived.release())
    link.wait_subscribed(10)
    t0 = time.monotonic()
    sent = sys_bytes.at(t0)
    for i in range(n):
        subprocess.run([tool, "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", f"baseline/{i}", "-f",
                        str(model)], check=True)
    got = sum(1 for _ in range(n) if arrived.acquire(timeout=60))
    took = time.monotonic() - t0
    return {"devices": n, "received": got, "seconds": round(took, 2),
            "broker_bytes_sent": sys_bytes.after(time.monotonic()) - sent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100, help="virtual devices (default 100)")
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--prefix", default="lepton")
    parser.add_argument("--seconds", type=float, help="run this long (default: until Ctrl-C)")
    parser.add_argument("--bench", action="store_true", help="start a mosquitto and measure (JSON on stdout)")
    parser.add_argument("--model", type=Path, default=ROOT / ".cache/models/face/face_landmark.tflite",
                        help="the model the benchmark deploys (default: face_landmark.tflite, 2.4 MB)")
    args = parser.parse_args()
    if args.n < 1:
        print("fleet_sim: -n must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
        if args.bench:
            print(json.dumps(bench(args.n, args.model, Path(tmp)), indent=1))
            return 0
        trusted = TrustedKeys.from_config({})
        fleet = Fleet(Path(tmp), args.broker, args.n, args.prefix, trusted)
        try:
            print(f"{args.n} devices online in {fleet.start():.1f} s (Ctrl-C to stop)", file=sys.stderr)
            threading.Event().wait(args.seconds)
        except KeyboardInterrupt:
            pass
        finally:
            fleet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
