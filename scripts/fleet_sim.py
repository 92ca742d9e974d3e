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
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fleet_brokers import KINDS  # noqa: E402

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

FLEET = [sys.executable, "-c", "import sys; from agent.cli import fleet_main; sys.exit(fleet_main())"]


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
            self._reply(request, True, {"result": {"active": str(version)}})
        except DeliveryError as exc:
            self._state(name, version, State.FAILED, request, reason=exc.reason, detail=str(exc))
            self._reply(request, False, {"error": {"code": exc.reason.value, "message": str(exc)}})


class Fleet:
    """N virtual devices and the clock that makes their results and telemetry."""

    def __init__(self, folder: Path, url: str, n: int, prefix: str, trusted: TrustedKeys,
                 result_every_s: float = 10.0, telemetry_every_s: float = 30.0, protocol: Protocol = "5") -> None:
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sim-deploy")
        self.devices = [VirtualDevice(folder / f"d{i:04d}", url, f"sim-{i:04d}", prefix, "sim", trusted, self.pool,
                                      protocol=protocol) for i in range(n)]
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


def _machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, all processes): /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


MEASURED = [sys.executable, "-c", "import resource, sys\nfrom agent.cli import fleet_main\n"
            "try:\n    rc = fleet_main()\nfinally:\n    r = resource.getrusage(resource.RUSAGE_SELF)\n"
            "    hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0].split()[1]\n"
            "    print(f'\\nfleet_sim-rusage {hwm} {r.ru_utime + r.ru_stime}', file=sys.stderr)\nsys.exit(rc)"]
"""A fleet tool that says its own peak RSS (VmHWM) and CPU last on stderr. ru_maxrss would not do, neither
RUSAGE_CHILDREN's nor the tool's own: Linux carries the high-water mark of the memory the child was forked
(or vforked) with across exec, i.e. the simulator's whole resident memory (600 MB at 1,000 devices)."""


def _run_tool(*args: str) -> dict[str, Any]:
    t0 = time.monotonic()
    done = subprocess.run([*MEASURED, *args], capture_output=True, text=True, check=False, cwd=ROOT)
    took = time.monotonic() - t0
    err, _, usage = done.stderr.rstrip().rpartition("fleet_sim-rusage ")
    try:
        maxrss_kb, cpu_s = usage.split()
        measured: dict[str, Any] = {"cpu_s": round(float(cpu_s), 2), "max_rss_mb": round(int(maxrss_kb) / 1024, 1)}
    except ValueError:
        measured, err = {}, done.stderr
    return {"rc": done.returncode, "seconds": round(took, 2), **measured, "out": done.stdout,
            "err": err.strip()[-500:]}


def bench(n: int, model: Path, folder: Path, kind: str = "mosquitto") -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from fleet_brokers import topology
    from paho.mqtt.enums import MQTTProtocolVersion

    from agent.delivery.signing import key_id, public_text
    from agent.fleet.publish import build, upload
    from agent.fleet.seeder import save_seed
    from agent.mqtt.client import BrokerAddress, PahoLink

    key = Ed25519PrivateKey.generate()
    trusted = TrustedKeys.from_config({key_id(key.public_key()): public_text(key.public_key())})
    prefix = "lepton"
    # The machine is shared: what else ran is part of the figures (busy seconds of all cores minus our own).
    machine: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_start": _load()}
    busy0, own0, wall0 = _machine_busy_s(), _own_cpu_s(), time.monotonic()
    topo = topology(kind, folder / "brokers")
    out: dict[str, Any] = {"devices": n, "broker_kind": kind, "machine": machine}
    protocol = MQTTProtocolVersion.MQTTv311 if topo.protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5

    def link_to(port: int) -> PahoLink:
        return PahoLink(BrokerAddress("127.0.0.1", port, False), protocol=protocol).start()

    fleet: Fleet | None = None
    links: list[PahoLink] = []
    seeder: subprocess.Popen[str] | None = None
    try:
        topo.start()  # inside: a broker started before a failure is stopped (one outlived a failed run)
        # Operator-side links before the fleet: paho's own loop select()s, and the fleet's 1,000 devices open
        # over 2,000 files (two databases each), past the 1024 descriptors select() can take.
        watcher = link_to(topo.operator_port)
        publisher = link_to(topo.operator_port)
        device_side = link_to(topo.device_port)
        links += [watcher, publisher, device_side]
        def kept(port: int) -> PahoLink:
            links.append(link_to(port))
            return links[-1]

        meters = topo.meters(kept)
        fleet = Fleet(folder / "fleet", topo.device_url, n, prefix, trusted, protocol=topo.protocol)
        cpu0 = topo.cpu_s()
        out["online_s"] = round(fleet.start(), 2)
        t0 = time.monotonic()
        threading.Event().wait(10.0)  # ten seconds of a steady fleet: results, telemetry, heartbeats
        out["broker_idle"] = {"cpu_percent": round(100 * (topo.cpu_s() - cpu0) / (time.monotonic() - t0
                                                                                   + out["online_s"]), 1),
                              "rss_mb": topo.rss_mb()}
        url = ["--broker", topo.operator_url, "--prefix", prefix, "--protocol", topo.protocol]
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
        upload(publisher, pub, FleetTopics(prefix))
        if topo.seeded:
            seeds = folder / "seeds"
            save_seed(seeds, "bench", parse_version("1"), pub.raw, pub.path)
            seeder = subprocess.Popen([*FLEET, "serve-models", "--dir", str(seeds), *url], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT)
            assert seeder.stdout is not None
            if not seeder.stdout.readline().startswith("serving "):
                raise RuntimeError(f"serve-models did not start: {seeder.stderr.read() if seeder.stderr else ''}")
        active: set[str] = set()
        failed: dict[str, str] = {}
        done = threading.Event()

        def on_deploy(topic: str, payload: bytes) -> None:
            # Every device ends active or failed: the wait ends when all have, not at its timeout.
            state = json.loads(payload)
            if state.get("model") != "bench" or state.get("state") not in ("active", "failed"):
                return
            with lock:
                if state["state"] == "active":
                    active.add(topic)
                    failed.pop(topic, None)
                else:
                    failed[topic] = f"{state.get('reason')}: {str(state.get('detail'))[:120]}"
                if len(active) + len(failed) == n:
                    done.set()

        cpu0, t0 = topo.cpu_s(), time.monotonic()
        sent = {name: m.at(t0) for name, m in meters.items()}
        watcher.subscribe(f"{prefix}/+/deploy", on_deploy)
        deploy = _run_tool("deploy", "bench@1", "--to", "group:sim", "--no-wait", *url)
        deploy.pop("out")
        done.wait(900)
        took = time.monotonic() - t0
        broker_cpu = topo.cpu_s() - cpu0
        now = time.monotonic()
        sent_bytes = {name: m.after(now) - sent[name] for name, m in meters.items()}
        first = next(iter(sent_bytes.values()))  # the devices' broker (a cluster: every node)
        out["deploy"] = {"model_bytes": size, "active_and_verified": len(active), "seconds": round(took, 2),
                         "failed": len(failed), "failures": dict(Counter(failed.values()).most_common(5)),
                         "broker_bytes_sent": sent_bytes, "ideal_bytes": n * size,
                         "ratio_to_ideal": round(first / (n * size), 3),
                         "broker_cpu_s": round(broker_cpu, 2), "broker_rss_mb": topo.rss_mb(), "tool": deploy}
        if seeder is not None:
            out["deploy"]["seeder"] = _stop_seeder(seeder)
            seeder = None
        out["mosquitto_pub_per_device"] = _baseline(topo, device_side, model, n, meters, prefix)
    finally:
        if seeder is not None:
            _stop_seeder(seeder)
        for link in links:
            link.close()
        if fleet is not None:
            fleet.close()
        topo.close()
        GRANDCHILD_CPU_S[0] += getattr(topo, "grandchild_cpu_s", 0.0)
        machine.update(_machine_share(busy0, own0, wall0))
    return out


def _stop_seeder(seeder: subprocess.Popen[str]) -> dict[str, Any]:
    seeder.send_signal(signal.SIGINT)
    stdout, stderr = seeder.communicate(timeout=60)
    lines = stdout.splitlines()
    try:
        stats: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        stats = {"out": lines[-1][:200]}
    return {"rc": seeder.returncode, **stats, **({"err": stderr[-300:]} if seeder.returncode else {})}


def _machine_share(busy0: float, own0: float, wall0: float) -> dict[str, Any]:
    wall, busy, own = time.monotonic() - wall0, _machine_busy_s() - busy0, _own_cpu_s() - own0
    return {"loadavg_end": _load(), "seconds": round(wall, 1),
            "all_cores_busy_percent": round(100 * busy / wall / (os.cpu_count() or 1), 1),
            "this_run_cpu_s": round(own, 1), "others_cpu_s": round(busy - own, 1)}


def _own_cpu_s() -> float:
    """This process and its reaped children (fleet tools, mosquitto_pub, mosquitto), and GRANDCHILD_CPU_S."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + GRANDCHILD_CPU_S[0]


GRANDCHILD_CPU_S = [0.0]
"""CPU of processes of ours that RUSAGE_CHILDREN never sees (a RabbitMQ node's beam.smp, killed with its group):
read from /proc before they end."""


def _baseline(topo: Any, link: Any, model: Path, n: int, meters: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The same file to each device once with the C client: one `mosquitto_pub -f` per device to the operator's
    broker, one subscriber (`link`) on the devices' broker."""
    tool = shutil.which("mosquitto_pub")
    if tool is None:
        return {"skipped": "mosquitto_pub not installed"}
    arrived = threading.Semaphore(0)
    link.subscribe(f"{prefix}/baseline/#", lambda t, p: arrived.release())
    link.wait_subscribed(10)
    t0 = time.monotonic()
    sent = {name: m.at(t0) for name, m in meters.items()}
    for i in range(n):
        subprocess.run([tool, "-h", "127.0.0.1", "-p", str(topo.operator_port), "-q", "1", "-t",
                        f"{prefix}/baseline/{i}", "-f", str(model)], check=True)
    got = sum(1 for _ in range(n) if arrived.acquire(timeout=60))
    took = time.monotonic() - t0
    now = time.monotonic()
    return {"devices": n, "received": got, "seconds": round(took, 2),
            "broker_bytes_sent": {name: m.after(now) - sent[name] for name, m in meters.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100, help="virtual devices (default 100)")
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--prefix", default="lepton")
    parser.add_argument("--seconds", type=float, help="run this long (default: until Ctrl-C)")
    parser.add_argument("--bench", action="store_true", help="start the broker(s) and measure (JSON on stdout)")
    parser.add_argument("--broker-kind", choices=KINDS, default="mosquitto",
                        help="the benchmark's brokers: one mosquitto (default), a bridged mosquitto pair (devices on "
                        "the site, operator on the central), a two-node RabbitMQ cluster (devices on node a, "
                        "operator and serve-models on node b)")
    parser.add_argument("--model", type=Path, default=ROOT / ".cache/models/face/face_landmark.tflite",
                        help="the model the benchmark deploys (default: face_landmark.tflite, 2.4 MB)")
    args = parser.parse_args()
    if args.n < 1:
        print("fleet_sim: -n must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
        if args.bench:
            print(json.dumps(bench(args.n, args.model, Path(tmp), args.broker_kind), indent=1))
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
