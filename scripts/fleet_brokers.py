"""The broker topologies `fleet_sim.py --bench` runs on (issue 13), started the way the tests start them:

- `mosquitto`: one broker, devices and operator on it;
- `bridge`: a site mosquitto bridged to a central one (`topic lepton/# both 1`, tests/bridge.py): devices on the
  site, the operator on the central broker;
- `rabbitmq`: a two-node RabbitMQ 3.10 cluster (tests/rabbitmq.py; MQTT 3.1.1 only, retained messages kept per
  node): devices on node a, the operator on node b, and `lepton-fleet serve-models` on node b answering the
  devices' `want` requests (the retained chunks published through b never reach a).

Each says where devices and the operator connect, the brokers' CPU seconds and RSS, and the bytes they sent to
clients (mosquitto: `$SYS/broker/bytes/sent`; RabbitMQ: the kernel's `bytes_sent` of each client socket, `ss`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Literal

KINDS = ("mosquitto", "bridge", "rabbitmq")


def _tree(pid: int) -> list[int]:
    """pid and its descendants (a RabbitMQ node is a shell script with beam.smp and helpers under it)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            line = next(x for x in Path(f"/proc/{p}/status").read_text().splitlines() if x.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        total += int(line.split()[1])
    return round(total / 1024, 1)


class SysBytes:
    """A mosquitto's `$SYS/broker/bytes/sent` as it is updated (every second: `sys_interval 1`)."""

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


class SocketBytes:
    """Bytes brokers sent to their MQTT clients, from the kernel: `bytes_sent` of every established TCP socket on
    their listening ports (`ss -tin`). RabbitMQ 3.10 has no `$SYS` and `rabbitmqctl list_connections` does not
    list MQTT connections; a socket that closed in between is not counted."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.before: dict[str, int] = {}

    def _now(self) -> dict[str, int]:
        import re
        import subprocess

        out: dict[str, int] = {}
        for port in self.ports:
            text = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                                  capture_output=True, text=True, check=True).stdout
            # One socket per two lines: addresses, then its counters.
            lines = text.splitlines()
            for head, info in zip(lines[::2], lines[1::2], strict=False):
                found = re.search(r"\bbytes_sent:(\d+)", info)
                if found:
                    out[" ".join(head.split()[-2:])] = int(found.group(1))
        return out

    def at(self, when: float) -> int:
        self.before = self._now()
        return 0

    def after(self, when: float) -> int:
        return sum(v - self.before.get(k, 0) for k, v in self._now().items())


class Topology:
    """Start, addresses, costs and stop of one kind of broker set-up."""

    kind = "mosquitto"
    protocol: Literal["5", "3.1.1"] = "5"
    seeded = False
    """The devices need `serve-models` (retained messages do not reach them)."""

    def __init__(self, folder: Path) -> None:
        from broker import Broker

        self.broker = Broker(folder / "broker", extra="sys_interval 1\nmax_connections -1")

    def start(self) -> Topology:
        self.broker.start()
        return self

    @property
    def device_url(self) -> str:
        return str(self.broker.url)

    @property
    def operator_port(self) -> int:
        return int(self.broker.port)

    @property
    def device_port(self) -> int:
        return int(self.broker.port)

    @property
    def operator_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.operator_port}"

    def pids(self) -> dict[str, list[int]]:
        assert self.broker.proc is not None
        return {"broker": [self.broker.proc.pid]}

    def cpu_s(self) -> float:
        return sum(proc_cpu_s(p) for pids in self.pids().values() for p in pids)

    def rss_mb(self) -> dict[str, float]:
        return {name: _rss_mb(pids) for name, pids in self.pids().items()}

    def meters(self, link_to: Any) -> dict[str, Any]:
        """`link_to(port)`: a connected operator-side link. The first meter is the devices' broker."""
        return {"broker": SysBytes(link_to(self.broker.port))}

    def close(self) -> None:
        self.broker.stop()


class Bridge(Topology):
    kind = "bridge"

    def __init__(self, folder: Path) -> None:
        from bridge import BridgePair

        self.pair = BridgePair(folder)
        # fleet_sim's 1,000 clients need more than mosquitto's default; $SYS every second for the byte counts.
        for b in (self.pair.central, self.pair.site):
            b.extra = "sys_interval 1\nmax_connections -1\n" + b.extra

    def start(self) -> Topology:
        self.pair.start()
        return self

    @property
    def device_url(self) -> str:
        return str(self.pair.site.url)

    @property
    def operator_port(self) -> int:
        return int(self.pair.central.port)

    @property
    def device_port(self) -> int:
        return int(self.pair.site.port)

    def pids(self) -> dict[str, list[int]]:
        assert self.pair.site.proc is not None and self.pair.central.proc is not None
        return {"site": [self.pair.site.proc.pid], "central": [self.pair.central.proc.pid]}

    def meters(self, link_to: Any) -> dict[str, Any]:
        return {"site": SysBytes(link_to(self.pair.site.port)), "central": SysBytes(link_to(self.pair.central.port))}

    def close(self) -> None:
        self.pair.stop()


class Rabbit(Topology):
    kind = "rabbitmq"
    protocol: Literal["5", "3.1.1"] = "3.1.1"
    seeded = True

    def __init__(self, folder: Path) -> None:
        import rabbitmq

        if not rabbitmq.available():
            raise SystemExit("fleet_sim: rabbitmq-server is not installed (scripts/test-brokers installs it)")
        self.cluster = rabbitmq.Cluster(folder)
        self.grandchild_cpu_s = 0.0

    def start(self) -> Topology:
        self.cluster.start()
        return self

    @property
    def device_url(self) -> str:
        return str(self.cluster.a.url)

    @property
    def operator_port(self) -> int:
        return int(self.cluster.b.mqtt_port)

    @property
    def device_port(self) -> int:
        return int(self.cluster.a.mqtt_port)

    def pids(self) -> dict[str, list[int]]:
        out = {}
        for label, node in (("node_a", self.cluster.a), ("node_b", self.cluster.b)):
            out[label] = _tree(node.proc.pid) if node.proc is not None else []
        return out

    def meters(self, link_to: Any) -> dict[str, Any]:
        return {"cluster": SocketBytes([self.cluster.a.mqtt_port, self.cluster.b.mqtt_port])}

    def close(self) -> None:
        # beam.smp is killed with its group, never reaped by us: its CPU is read while it runs.
        self.grandchild_cpu_s = self.cpu_s()
        self.cluster.stop()


def topology(kind: str, folder: Path) -> Topology:
    return {"mosquitto": Topology, "bridge": Bridge, "rabbitmq": Rabbit}[kind](folder)
