"""Real RabbitMQ nodes for the tests (Debian's `rabbitmq-server` 3.10 with its MQTT plugin, which speaks MQTT
3.1.1 only and keeps retained messages per node): the server binary run directly, no systemd, each node with
its own name, ports, data and log folders, on loopback, under a private epmd so that nothing on the machine
(another node, rabbitmqctl's own 35672-35682) is in the way. `Cluster` joins two with `rabbitmqctl`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path

from broker import free_port

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
CTL_PORTS = range(35672, 35683)
"""rabbitmqctl's own distribution ports: none of our nodes may take one."""


def available() -> bool:
    return SERVER.exists() and CTL.exists()


def _port() -> int:
    while (port := free_port()) in CTL_PORTS:
        pass
    return port


class Epmd:
    """The Erlang port mapper the nodes and rabbitmqctl share, on a private port, in the foreground."""

    def __init__(self) -> None:
        self.port = _port()
        self.proc = subprocess.Popen(["epmd", "-port", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Node:
    """One RabbitMQ node named `name@localhost` with the MQTT plugin on 127.0.0.1:`mqtt_port`."""

    def __init__(self, folder: Path, name: str, epmd: Epmd) -> None:
        self.folder = folder
        self.name = f"{name}@localhost"
        self.mqtt_port, self.amqp_port, self.dist_port = _port(), _port(), _port()
        self.epmd = epmd
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {self.mqtt_port}\n"
            "loopback_users = none\nmqtt.allow_anonymous = true\n")
        (folder / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        cookie = folder.parent / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text("LEPTONTESTCLUSTER")
            cookie.chmod(0o400)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def env(self) -> dict[str, str]:
        f = self.folder
        return {**os.environ, "HOME": str(f.parent), "ERL_EPMD_PORT": str(self.epmd.port),
                "RABBITMQ_NODENAME": self.name, "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(f / "mnesia"), "RABBITMQ_LOG_BASE": str(f / "log"),
                "RABBITMQ_CONFIG_FILE": str(f / "rabbitmq.conf"), "RABBITMQ_ENABLED_PLUGINS_FILE":
                str(f / "enabled_plugins"), "RABBITMQ_PID_FILE": str(f / "pid"), "RABBITMQ_LOGS": "-"}

    def start(self) -> Node:
        """Start the server process (returns at once: `wait_started` waits for it)."""
        self.log.clear()
        self._ready = ready = threading.Event()
        # Its own process group: the script starts beam.smp as a child, and both go together.
        self.proc = subprocess.Popen([str(SERVER)], env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = self.proc

        def drain() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self.log.append(line)
                if "Server startup complete" in line:
                    ready.set()
            ready.set()  # it exited: wait_started says so

        threading.Thread(target=drain, daemon=True).start()
        return self

    def wait_started(self, timeout: float = 90.0) -> Node:
        if not self._ready.wait(timeout) or self.proc is None or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"rabbitmq {self.name} did not start: " + " | ".join(self.log[-8:]))
        return self

    def ctl(self, *args: str, timeout: float = 90.0) -> str:
        done = subprocess.run([str(CTL), "-n", self.name, *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def stop(self) -> None:
        """A clean stop (rabbitmqctl stop), the process group killed if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=60)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        self.kill()

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


class Cluster:
    """Two nodes, `a` and `b`, started together, `b` joined to `a`."""

    def __init__(self, folder: Path) -> None:
        self.epmd = Epmd()
        self.a = Node(folder / "a", "lepton-a", self.epmd)
        self.b = Node(folder / "b", "lepton-b", self.epmd)

    def start(self) -> Cluster:
        try:
            for node in (self.a.start(), self.b.start()):
                node.wait_started()
            self.b.ctl("stop_app")
            self.b.ctl("join_cluster", self.a.name)
            self.b.ctl("start_app")
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in (self.b, self.a):
            node.stop()
        self.epmd.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
