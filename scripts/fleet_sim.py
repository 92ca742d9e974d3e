#!/usr/bin/env python3
"""N virtual devices over worker processes, to measure fleet-level behaviour instead of guessing it (issue 13).

Each device is the agent's own MQTT link (`agent.mqtt.link.Link`: its own client id, retained will, birth and
heartbeat, presence answers, a spool of results sent at QoS 1, telemetry at QoS 0) and pulls models with the
agent's own delivery client (`agent.delivery.download.Downloader` into a `ModelStore`: manifest signature and
every chunk's hash checked, the file committed and made active). What a virtual device does not do is run the
model: no interpreter is loaded (1,000 interpreters would measure this machine's memory, not the fleet).
The devices (scripts/fleet_devices.py) run in `--procs` worker processes (scripts/fleet_workers.py), each a
contiguous slice of the ids sim-0000, sim-0001, ... with its own MQTT links; a worker that dies ends the run
with one line naming it (exit 1).

    scripts/fleet_sim.py --broker mqtt://host:1883 -n 200 [--procs 2]  # run a fleet until Ctrl-C
    scripts/fleet_sim.py --bench -n 1000 [--procs 2] [--model PATH]    # the benchmark: JSON on stdout

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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fleet_brokers import KINDS  # noqa: E402
from fleet_workers import Workers  # noqa: E402

from agent.mqtt.topics import FleetTopics  # noqa: E402
from agent.version import parse_version  # noqa: E402

FLEET = [sys.executable, "-c", "import sys; from agent.cli import fleet_main; sys.exit(fleet_main())"]


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


def bench(n: int, model: Path, folder: Path, kind: str = "mosquitto", procs: int = 1) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from fleet_brokers import topology
    from paho.mqtt.enums import MQTTProtocolVersion

    from agent.delivery.signing import key_id, public_text
    from agent.fleet.publish import build, upload
    from agent.fleet.seeder import save_seed
    from agent.mqtt.client import BrokerAddress, PahoLink

    key = Ed25519PrivateKey.generate()
    trusted = {key_id(key.public_key()): public_text(key.public_key())}
    prefix = "lepton"
    # The machine is shared: what else ran is part of the figures (busy seconds of all cores minus our own).
    machine: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_start": _load()}
    busy0, own0, wall0 = _machine_busy_s(), _own_cpu_s(), time.monotonic()
    topo = topology(kind, folder / "brokers")
    out: dict[str, Any] = {"devices": n, "broker_kind": kind, "machine": machine}
    protocol = MQTTProtocolVersion.MQTTv311 if topo.protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5

    def link_to(port: int) -> PahoLink:
        return PahoLink(BrokerAddress("127.0.0.1", port, False), protocol=protocol).start()

    fleet: Workers | None = None
    links: list[PahoLink] = []
    seeder: subprocess.Popen[str] | None = None
    try:
        topo.start()  # inside: a broker started before a failure is stopped (one outlived a failed run)
        watcher = link_to(topo.operator_port)
        publisher = link_to(topo.operator_port)
        device_side = link_to(topo.device_port)
        links += [watcher, publisher, device_side]
        def kept(port: int) -> PahoLink:
            links.append(link_to(port))
            return links[-1]

        meters = topo.meters(kept)
        fleet = Workers(folder / "fleet", topo.device_url, n, procs, prefix, trusted, protocol=topo.protocol).built()
        cpu0 = topo.cpu_s()
        out["online_s"] = round(fleet.start(), 2)
        print(f"fleet_sim: {n} devices in {_processes(len(fleet.workers))} online in {out['online_s']:g} s",
              file=sys.stderr, flush=True)
        t0 = time.monotonic()
        fleet.wait(threading.Event(), 10.0)  # ten seconds of a steady fleet: results, telemetry, heartbeats
        out["broker_idle"] = {"cpu_percent": round(100 * (topo.cpu_s() - cpu0) / (time.monotonic() - t0
                                                                                   + out["online_s"]), 1),
                              "rss_mb": topo.rss_mb()}
        url = ["--broker", topo.operator_url, "--prefix", prefix, "--protocol", topo.protocol]
        status = _run_tool("status", "--format", "json", "--settle", "3", *url)
        fleet.check()
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
        fleet.check()
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
        fleet.wait(done, 900)
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
        fleet.check()
        # What the workers' own devices counted (each device in exactly one worker), and what they cost.
        out["sim"] = fleet.close()
    finally:
        if seeder is not None:
            _stop_seeder(seeder)
        for link in links:
            link.close()
        if fleet is not None and "sim" not in out:
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
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                        help="worker processes the devices are spread over, a contiguous slice of ids each "
                        "(default: the machine's cores; at most -n)")
    args = parser.parse_args()
    if args.n < 1 or args.procs < 1:
        print("fleet_sim: -n and --procs must be at least 1", file=sys.stderr)
        return 2
    problem = None if args.bench else _bad_link(args.broker, args.prefix)
    if problem:
        print(f"fleet_sim: {problem}", file=sys.stderr)
        return 2
    if args.bench and not args.model.is_file():
        print(f"fleet_sim: no model file at {args.model} (--model)", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
            if args.bench:
                print(json.dumps(bench(args.n, args.model, Path(tmp), args.broker_kind, args.procs), indent=1))
                return 0
            run(Path(tmp), args)
    except RuntimeError as exc:  # a worker died (WorkerDied names it), or the fleet never came online
        print(f"fleet_sim: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the benchmark's own finally has stopped its workers and brokers
        print("fleet_sim: interrupted", file=sys.stderr)
        return 130
    return 0


def _bad_link(url: str, prefix: str) -> str | None:
    """What is wrong with --broker or --prefix, as the agent's config would say it (checked once here, not by
    every worker)."""
    from pydantic import ValidationError

    from agent.config import MqttSection

    try:
        MqttSection(broker=(url,), prefix=prefix)
    except ValidationError as exc:
        first = exc.errors()[0]
        return f"--{first['loc'][0]}: {first['msg'].removeprefix('Value error, ')}"
    return None


def _processes(k: int) -> str:
    return f"{k} process" if k == 1 else f"{k} processes"


def run(folder: Path, args: argparse.Namespace) -> None:
    """The fleet on `--broker` until Ctrl-C, --seconds, or a worker's death (WorkerDied)."""
    fleet = Workers(folder, args.broker, args.n, args.procs, args.prefix, {})
    try:
        online = fleet.start()
        print(f"{args.n} devices in {_processes(len(fleet.workers))} online in {online:.1f} s (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        fleet.wait(threading.Event(), args.seconds)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.close()


if __name__ == "__main__":
    sys.exit(main())
