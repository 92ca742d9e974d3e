"""The daemon under systemd's eyes: READY/STATUS/STOPPING on a real NOTIFY_SOCKET, and watchdog pings
that stop when a pipeline loop hangs or the MQTT thread dies."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Broker
from test_daemon import Daemon, write_config

from agent.config_load import load
from agent.daemon import Agent

INTERVAL_S = 1.0  # WatchdogSec: pings every 0.5 s while healthy


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield sock, path
    sock.close()


def _messages(sock: socket.socket, until: float, stop_after: str | None = None,
              count: int = 1) -> list[tuple[float, str]]:
    """What arrives until `until`, or until `count` messages containing `stop_after` have arrived."""
    got = []
    seen = 0
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(min(left, 0.25))
        try:
            text = sock.recv(4096).decode()
        except TimeoutError:
            continue
        got.append((time.monotonic(), text))
        if stop_after is not None and stop_after in text:
            seen += 1
            if seen >= count:
                break
    return got


def _quiet_for(sock: socket.socket, quiet_s: float, deadline_s: float) -> bool:
    """True once no WATCHDOG=1 has arrived for `quiet_s` (within `deadline_s`)."""
    last = time.monotonic()
    end = last + deadline_s
    while time.monotonic() < end:
        sock.settimeout(0.2)
        try:
            if "WATCHDOG=1" in sock.recv(4096).decode():
                last = time.monotonic()
        except TimeoutError:
            pass
        if time.monotonic() - last >= quiet_s:
            return True
    return False


def test_ready_status_pings_then_a_hung_source_stops_them(tmp_path: Path, broker: Broker, fixtures: Path,
                                                          notify_socket: tuple[socket.socket, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = notify_socket
    # 60 frames at 20 fps, then the source wedges like a stuck camera driver.
    config = write_config(tmp_path, broker.port, fixtures, device="d-sd")
    config.write_text(config.read_text().replace("hold = 4", "hold = 4\nstall_after = 60"))
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", str(int(INTERVAL_S * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with Daemon(config) as daemon:
        first = _messages(sock, time.monotonic() + 60, stop_after="READY=1")
        ready = [text for _, text in first if "READY=1" in text]
        assert ready, first
        assert "STATUS=" in ready[0] and "pipelines running" in ready[0]
        pings = _messages(sock, time.monotonic() + 30, stop_after="WATCHDOG=1", count=2)
        assert sum("WATCHDOG=1" in text for _, text in pings) >= 2
        # After the stall the pipeline loop stops beating: pings stop for good (systemd would restart us).
        assert _quiet_for(sock, quiet_s=2 * INTERVAL_S, deadline_s=30)
        assert daemon.terminate(signal.SIGTERM) == 0
    # STOPPING=1 was sent before the process exited.
    rest = _messages(sock, time.monotonic() + 10, stop_after="STOPPING=1")
    assert any("STOPPING=1" in text for _, text in rest), rest


def test_a_dead_mqtt_thread_stops_the_pings(tmp_path: Path, broker: Broker, fixtures: Path,
                                            notify_socket: tuple[socket.socket, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", str(int(INTERVAL_S * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    agent = Agent(load(write_config(tmp_path, broker.port, fixtures, device="d-sd2")))
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        first = _messages(sock, time.monotonic() + 60, stop_after="READY=1")
        assert any("READY=1" in text for _, text in first), first
        pings = _messages(sock, time.monotonic() + 30, stop_after="WATCHDOG=1", count=2)
        assert sum("WATCHDOG=1" in t for _, t in pings) >= 2
        assert agent.link is not None and agent.link.connected.is_set()
        link_thread = agent.link._thread
        assert link_thread is not None
        agent.link._closing.set()  # the MQTT thread ends while the pipelines keep running
        agent.link.wake()
        link_thread.join(10)
        assert not link_thread.is_alive()
        assert _quiet_for(sock, quiet_s=2 * INTERVAL_S, deadline_s=30)
        assert any(p.stats.state == "running" for p in agent.pipelines.values())
    finally:
        agent.stop.set()
        runner.join(15)
    assert not runner.is_alive()
