"""systemd readiness, status and watchdog (sd_notify(3)) without libsystemd.

`Notifier` sends datagrams to `$NOTIFY_SOCKET` (a path, or `@name` for the
abstract namespace); without it every call is a no-op, so the agent runs the
same under systemd, in a terminal and in tests. `Watchdog` sends `WATCHDOG=1` at
half of `$WATCHDOG_USEC`, but only while every registered component — each
pipeline loop, the MQTT network thread — has beaten since the previous ping: a
hung loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """Send `KEY=value` lines as one message; False (logged) when systemd is not listening."""
        if self._sock is None:
            return False
        try:
            with self._lock:
                self._sock.sendto("\n".join(lines).encode("utf-8"), self.address)
        except OSError as exc:
            logger.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        # STATUS= is one line; systemctl shows it as is.
        return self.send("STATUS=" + " ".join(text.split()))

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """The watchdog interval systemd asks for, in seconds; None when it asks for none (or not of us)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Heartbeat:
    """One component's proof of progress: call `beat()` each time round its loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.last = time.monotonic()
        self._beaten = threading.Event()
        self._beaten.set()

    def beat(self) -> None:
        self.last = time.monotonic()
        # Called per frame: Event.set() takes a lock and notifies; once set, until the watchdog clears it,
        # a read is all a beat needs.
        if not self._beaten.is_set():
            self._beaten.set()


class Watchdog:
    """Pings systemd only while every registered component keeps beating."""

    def __init__(self, notifier: Notifier, interval_s: float | None, stop: threading.Event) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self.stop = stop
        self._hearts: dict[str, Heartbeat] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.withheld = 0

    def register(self, name: str) -> Heartbeat:
        with self._lock:
            heart = self._hearts.get(name) or Heartbeat(name)
            heart.beat()
            self._hearts[name] = heart
            return heart

    def unregister(self, name: str) -> None:
        with self._lock:
            self._hearts.pop(name, None)

    def stalled(self) -> list[str]:
        """Components that have not beaten since the previous check (and re-arm the others)."""
        with self._lock:
            hearts = list(self._hearts.values())
        stalled = [h.name for h in hearts if not h._beaten.is_set()]
        for h in hearts:
            h._beaten.clear()
        return stalled

    def start(self) -> None:
        if self.interval_s is None or not self.notifier.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.interval_s is not None
        period = self.interval_s / 2
        reported: tuple[str, ...] = ()
        while not self.stop.wait(period):
            stalled = tuple(self.stalled())
            if stalled:
                self.withheld += 1
                if stalled != reported:
                    logger.error("watchdog: no progress from %s; not pinging systemd", ", ".join(stalled))
                reported = stalled
                continue
            reported = ()
            if self.notifier.watchdog():
                self.pings += 1

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
