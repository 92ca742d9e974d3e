"""A real mosquitto for the tests: own config, a free loopback port, ready when it says it is running."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections import deque
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """`mosquitto -c` with a generated config; `extra` lines go into it (limits, persistence)."""

    def __init__(self, workdir: Path, extra: str = "", port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra = extra
        self.port = port or free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.log: deque[str] = deque(maxlen=200)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Broker:
        # The free port may be taken between our probe and mosquitto's bind (shared machine): retry.
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError:
                if attempt == 2 or "in use" not in " ".join(self.log):
                    raise
                self.port = free_port()
        return self

    def _start(self, timeout: float) -> Broker:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\n"
            # Started as root, mosquitto drops to user `mosquitto`, which cannot write our temp dirs.
            + (f"user {getpass.getuser()}\n" if os.geteuid() == 0 else "")
            + "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            f"{self.extra}\n"
        )
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, cwd=self.workdir)
        running = threading.Event()
        proc = self.proc

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.log.append(line.rstrip())
                if " running" in line:
                    running.set()
            running.set()  # exited: start() reports it

        threading.Thread(target=read, daemon=True).start()
        if not running.wait(timeout) or proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"mosquitto did not start on port {self.port}: {' | '.join(self.log)}")
        return self

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file on the way out) and wait."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self.proc = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
