"""sd_notify against a real datagram socket bound where systemd would listen."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier, Watchdog, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier(path)
    assert n.enabled
    n.ready("2 pipelines up")
    assert _recv(sock) == "READY=1\nSTATUS=2 pipelines up"
    n.status("connecting to\nbroker")
    assert _recv(sock) == "STATUS=connecting to broker"
    n.stopping()
    assert _recv(sock) == "STOPPING=1"


def test_abstract_socket_names(tmp_path: Path) -> None:
    name = f"lepton-test-{tmp_path.name}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        Notifier("@" + name).watchdog()
        assert _recv(sock) == "WATCHDOG=1"
    finally:
        sock.close()


def test_without_systemd_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and n.ready() is False


def test_watchdog_interval_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval() is None


def test_pings_stop_while_a_component_is_stalled(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    stop = threading.Event()
    interval = 0.4
    dog = Watchdog(Notifier(path), interval, stop)
    loop = dog.register("pipeline:cam")
    mqtt = dog.register("mqtt")
    beating = threading.Event()
    beating.set()

    def components() -> None:
        while not stop.wait(interval / 8):
            mqtt.beat()
            if beating.is_set():
                loop.beat()

    worker = threading.Thread(target=components, daemon=True)
    worker.start()
    dog.start()
    try:
        assert _recv(sock) == "WATCHDOG=1"
        assert _recv(sock) == "WATCHDOG=1"
        beating.clear()  # the pipeline loop hangs
        sock.settimeout(interval / 4)
        after_hang = 0
        deadline = time.monotonic() + 4 * interval
        while time.monotonic() < deadline:
            try:
                _recv(sock)
                after_hang += 1
            except TimeoutError:
                pass
        # At most the one ping whose check saw the last beat before the hang; then none (a slow
        # machine can only make fewer pings, never more).
        assert after_hang <= 1
        assert dog.withheld >= 2
        beating.set()
        sock.settimeout(5)
        assert _recv(sock) == "WATCHDOG=1"  # progress again: pings resume
    finally:
        stop.set()
        dog.join(2)
        worker.join(2)
