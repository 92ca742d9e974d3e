"""A real mosquitto for the tests (and scripts/faults.py): free loopback port, its own config, and
ways to stop, kill, freeze and restart it. Plus `Watcher`, a real paho subscriber that collects
messages and lets a test wait for a condition with a timeout (no sleeps)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One mosquitto process on 127.0.0.1:`port`; restartable on the same port."""

    def __init__(self, folder: Path, port: int | None = None, persistence: bool = False, extra: str = "") -> None:
        self.folder = folder
        self.port = port or free_port()
        # A port we picked may be taken by another process (an xdist worker) before mosquitto binds it: then
        # the first start picks another. A port a test gave, or one a restart must keep, is never changed.
        self._may_move = port is None
        self.persistence = persistence
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        conf = self.folder / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "log_dest stderr",  # unbuffered, unlike stdout into a pipe
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.folder}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
            self.extra,
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto`, who cannot write our tmp folder
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> Broker:
        for _ in range(5):
            in_use = self._launch(timeout)
            if not in_use:
                break
            if not self._may_move:
                raise RuntimeError(f"mosquitto: port {self.port} is in use")
            self.port = free_port()
        else:
            raise RuntimeError("mosquitto: every free port tried was taken first")
        self._may_move = False
        self._wait_accepting(timeout)
        return self

    def _launch(self, timeout: float) -> bool:
        """Start mosquitto; True if it exited because its port was taken."""
        conf = self._config()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        ready = threading.Event()
        in_use = threading.Event()
        proc = self.proc

        def drain() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.log.append(line)
                if "Address already in use" in line:
                    in_use.set()
                # "running" comes after the listeners are bound (their "Opening ..." line comes before).
                if in_use.is_set() or " running" in line:
                    ready.set()
            ready.set()  # it exited: _wait_accepting says so with its last lines

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(timeout):
            self.kill()
            raise RuntimeError("mosquitto did not start: " + " | ".join(self.log[-5:]))
        if in_use.is_set():
            self.kill()
            return True
        return False

    def _wait_accepting(self, timeout: float) -> None:
        # The log line comes just before listen(); a connect with a deadline proves it.
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                # Wait on the process instead of sleeping: returns early only if it died.
                assert self.proc is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(0.02)
                    raise RuntimeError("mosquitto exited: " + " | ".join(self.log[-5:])) from None

    def rss_kb(self) -> int:
        """The broker's resident memory (for the delivery benchmark)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: a clean broker shutdown (it saves its persistence file)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what the broker had not saved is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the TCP connections stay open and nothing answers (a half-open link)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Watcher:
    """A real MQTT client subscribed to some topics; collects (topic, payload, retain) in order."""

    def __init__(self, port: int, topics: list[str], client_id: str | None = None, clean: bool = True,
                 protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        self.topics = topics
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"watch-{os.getpid()}-"
                                  f"{id(self)}", protocol=protocol, clean_session=None if protocol == mqtt.MQTTv5
                                  else clean)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.port = port
        self.clean = clean

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.cond.notify_all()

    def start(self, timeout: float = 10.0) -> Watcher:
        if self.client._protocol == mqtt.MQTTv5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self.clean else 3600
            self.client.connect("127.0.0.1", self.port, keepalive=10, clean_start=self.clean, properties=props)
        else:
            self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise TimeoutError("watcher did not get its SUBACK")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def json(self, topic_suffix: str = "") -> list[dict[str, Any]]:
        with self.cond:
            items = list(self.messages)
        return [json.loads(p) for t, p, _ in items if t.endswith(topic_suffix) and p]

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes, bool]]], bool], timeout: float = 15.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.messages), timeout)

    def wait_json(self, topic_suffix: str, predicate: Callable[[list[dict[str, Any]]], bool],
                  timeout: float = 15.0) -> list[dict[str, Any]]:
        def check(messages: list[tuple[str, bytes, bool]]) -> bool:
            return predicate([json.loads(p) for t, p, _ in messages if t.endswith(topic_suffix) and p])

        if not self.wait_for(check, timeout):
            raise AssertionError(f"timed out waiting on {topic_suffix}: {self.json(topic_suffix)[-5:]}")
        return self.json(topic_suffix)

    def __enter__(self) -> Watcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, step: float = 0.05) -> bool:
    """Wait for a condition that has no event of its own (re-checked every `step`), up to `timeout`."""
    done = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        done.wait(step)
    return True


def wait_readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


class Partition:
    """A TCP relay in front of a broker that can cut the network without closing anything: after
    `cut()`, the bytes of the connections open at that moment are read and dropped in both directions
    (nothing is acknowledged, nothing arrives); connections made later are relayed normally."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: list[dict[str, Any]] = []
        self.dropped = bytearray()
        """What the client sent into a cut connection (so a test can see its message was lost)."""
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            for conn in self._open:
                conn["cut"] = True

    def close(self) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            conn: dict[str, Any] = {"cut": False}
            with self._lock:
                self._open.append(conn)
            threading.Thread(target=self._relay, args=(client, upstream, conn, True), daemon=True).start()
            threading.Thread(target=self._relay, args=(upstream, client, conn, False), daemon=True).start()

    def _relay(self, src: socket.socket, dst: socket.socket, conn: dict[str, Any], from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not conn["cut"]:
                    dst.sendall(data)
                elif from_client:
                    with self._lock:
                        self.dropped += data
        if not conn["cut"]:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
