#!/usr/bin/env python3
"""scripts/fleet_sim.py's virtual devices spread over worker processes (`--procs N`).

One process running 1,000 virtual devices starved under load: its link threads missed their keepalives while
1,000 downloads checked and stored the model's chunks, and the deploy measured that process rather than the
fleet. Each worker here runs a `Fleet` (scripts/fleet_devices.py) of a contiguous slice of the device ids, with
its own MQTT links, and talks to the parent in JSON lines:

    worker -> parent   {"ready": true}            its devices built (databases open, links not started)
    parent -> worker   start                      connect them
    worker -> parent   {"online_s": S}            all its devices subscribed to their commands
    parent -> worker   (end of its input)         close them
    worker -> parent   {"closed": {...}}          its devices, deploy outcomes, CPU and peak RSS

A worker whose output ends before `closed` died: `Workers` says so in one line (`WorkerDied`, naming the worker,
its device ids, pid and how it ended) and cuts short whatever the parent was waiting for. A worker whose parent
is gone sees its input end and closes its devices.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


class WorkerDied(RuntimeError):
    """A worker process ended before it was told to: the message names it and says how it ended."""


class Worker:
    def __init__(self, index: int, first: int, count: int, argv: list[str],
                 on_change: Callable[[str | None], None]) -> None:
        from fleet_devices import device_id

        self.index, self.first, self.count = index, first, count
        self.last_words = ""
        self.ids = f"{device_id(first)}..{device_id(first + count - 1)}"
        self.ready = threading.Event()
        self.online_s: float | None = None
        self.closed: dict[str, Any] | None = None
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv,
                                      "--first", str(first), "--count", str(count)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        self._on_change = on_change
        self._relay = threading.Thread(target=self._relay_stderr, name=f"sim-worker-{index}-err", daemon=True)
        self._relay.start()
        self._reader = threading.Thread(target=self._read, name=f"sim-worker-{index}", daemon=True)
        self._reader.start()

    def _relay_stderr(self) -> None:
        # What its devices' links warn about (a missed keepalive, a refused connection) is the operator's to see,
        # marked with the worker; the last line is what a worker that crashed said last.
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.strip():
                self.last_words = line.strip()
                print(f"[worker {self.index}] {line.rstrip()}", file=sys.stderr, flush=True)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "ready" in msg:
                self.ready.set()
            if "online_s" in msg:
                self.online_s = float(msg["online_s"])
            if "closed" in msg:
                self.closed = msg["closed"]
            self._on_change(None)
        rc = self.proc.wait()
        self._relay.join(10)
        if self.closed is None:
            self._on_change(f"worker {self.index} (devices {self.ids}, pid {self.proc.pid}) died: {self._how(rc)}")

    def _how(self, rc: int) -> str:
        if rc < 0:
            try:
                how = f"killed by signal {-rc} ({signal.Signals(-rc).name})"
            except ValueError:
                how = f"killed by signal {-rc}"
        else:
            how = f"exited with {rc}" if rc else "exited before it was told to"
        return how + (f"; its last words: {self.last_words[:200]}" if self.last_words else "")

    def send(self, word: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # it died: its reader says so

    def end_input(self) -> None:
        """Tell it to stop: a worker closes its devices when its input ends (as it does if we die)."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass

    def reap(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)


def slices(n: int, procs: int) -> list[tuple[int, int]]:
    """(first id, count) of each worker: contiguous, the sizes differing by one at most."""
    procs = max(1, min(procs, n))
    return [(k * n // procs, (k + 1) * n // procs - k * n // procs) for k in range(procs)]


class Workers:
    """N virtual devices over `procs` worker processes: start, wait, stop, and the first death."""

    def __init__(self, folder: Path, url: str, n: int, procs: int, prefix: str, trusted: dict[str, str],
                 protocol: str = "5", result_every_s: float = 10.0, telemetry_every_s: float = 30.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._wake: set[threading.Event] = set()
        self.died: str | None = None
        self._closing = False
        argv = ["--url", url, "--prefix", prefix, "--folder", str(folder), "--trusted", json.dumps(trusted),
                "--protocol", protocol, "--result-every", str(result_every_s),
                "--telemetry-every", str(telemetry_every_s)]
        self.workers: list[Worker] = []
        try:
            for k, (first, count) in enumerate(slices(n, procs)):
                self.workers.append(Worker(k, first, count, argv, self._changed))
        except BaseException:
            self.close()
            raise

    def _changed(self, death: str | None) -> None:
        """A worker said something (wakes whoever waits for their progress) or died (`death` says how)."""
        with self._cond:
            if death is not None and self.died is None and not self._closing:
                self.died = death
                for event in self._wake:
                    event.set()
            self._cond.notify_all()

    def check(self) -> None:
        with self._cond:
            if self.died is not None:
                raise WorkerDied(self.died)

    def _wait_all(self, done: Any, timeout: float, what: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.died is not None or done(), timeout)
        self.check()
        if not done():
            raise RuntimeError(f"{what} within {timeout:g} s")

    def built(self, timeout: float = 600.0) -> Workers:
        """Wait until every worker has built its devices (opened their databases; not connected yet)."""
        self._wait_all(lambda: all(w.ready.is_set() for w in self.workers), timeout,
                       "the workers did not build their devices")
        return self

    def start(self, online_timeout: float = 180.0) -> float:
        """Connect every worker's devices at once: the seconds until every device of every worker is subscribed
        to its commands (building them is not counted, as it was not in one process)."""
        self.built()
        started = time.monotonic()
        for w in self.workers:
            w.send("start")
        self._wait_all(lambda: all(w.online_s is not None for w in self.workers), online_timeout,
                       "not every device connected")
        return time.monotonic() - started

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        """`event.wait(timeout)`, cut short by a worker's death (then `WorkerDied`)."""
        with self._cond:
            self._wake.add(event)
        try:
            self.check()
            got = event.wait(timeout)
        finally:
            with self._cond:
                self._wake.discard(event)
        self.check()
        return got

    def close(self, timeout: float = 120.0) -> dict[str, Any]:
        """Stop every worker (each closes its devices); what they said when they closed, summed."""
        with self._cond:
            self._closing = True
        for w in self.workers:
            w.end_input()
        for w in self.workers:
            w.reap(timeout)
        said = [w.closed for w in self.workers if w.closed is not None]
        total: dict[str, Any] = {"procs": len(self.workers), "closed": len(said)}
        for key in ("devices", "active", "failed", "no_deploy", "reconnects", "half_open"):
            total[key] = sum(int(c[key]) for c in said)
        total["cpu_s"] = round(sum(float(c["cpu_s"]) for c in said), 1)
        total["max_rss_mb"] = [c["max_rss_mb"] for c in said]
        return total


# -- the worker process ------------------------------------------------------------------------------------------


def _say(out: IO[str], **msg: Any) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def worker_main() -> int:
    # Ctrl-C at a terminal reaches the whole process group: the parent stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    p = argparse.ArgumentParser(description="one fleet_sim worker (started by scripts/fleet_sim.py)")
    for name in ("--url", "--prefix", "--folder", "--trusted", "--protocol"):
        p.add_argument(name, required=True)
    for name in ("--first", "--count"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--result-every", type=float, default=10.0)
    p.add_argument("--telemetry-every", type=float, default=30.0)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from fleet_devices import Fleet

    from agent.delivery.signing import TrustedKeys

    out = sys.stdout
    try:
        fleet = Fleet(Path(args.folder), args.url, args.count, args.prefix,
                      TrustedKeys.from_config(json.loads(args.trusted)), result_every_s=args.result_every,
                      telemetry_every_s=args.telemetry_every, protocol=args.protocol, first=args.first)
        try:
            _say(out, ready=True)
            if sys.stdin.readline().strip() == "start":
                _say(out, online_s=round(fleet.start(), 3))
                sys.stdin.read()  # until the parent closes our input (or dies)
        finally:
            fleet.close()
    except Exception as exc:
        # One line the parent quotes as this worker's last words; before it, the traceback of what was not
        # expected (devices that did not connect in time are a known end: Fleet.start's RuntimeError).
        if not isinstance(exc, RuntimeError):
            traceback.print_exc()
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _say(out, closed={"devices": len(fleet.devices), **fleet.counts(),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "max_rss_mb": _peak_rss_mb()})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(worker_main())
