#!/usr/bin/env python3
"""Reliability figures of the daemon's MQTT path under faults, as JSON (issue 5).

Each scenario runs the real daemon (`lepton-agent run`) streaming N results from a
`test:colors` pipeline (every frame reported) to a real mosquitto on loopback, with a
small TCP proxy in between for blackholes and resets, and a durable QoS 1 subscriber
counting what arrives. Faults: broker SIGTERM / SIGKILL for --outage s, broker SIGSTOP for
3 x keepalive, proxy blackhole for 3 x keepalive, proxy reset, agent SIGKILL while the broker
is down, spool overflow (the spool capped at a quarter of what N results take, the broker away for
--outage s and then until the spool has dropped results: `outage_s` says how long).

Reported per scenario: `lost` (results the broker never acknowledged and that never
arrived: the target is 0), `lost_by_broker` (acknowledged by the broker, then lost by it: a
SIGKILLed mosquitto loses what it had not saved; not the agent's to keep), `dropped_by_spool`
(the spool's cap, counted by the agent), `duplicates` (at-least-once re-sends),
`order_inversions` (first deliveries out of seq order), `reconnect_s` (broker back → agent's
new `online`), `half_open_detect_s` (fault → agent drops the dead link), `peak_spool_bytes`.
Exits 1, naming them, when a scenario streamed no result, lost results or reordered them, or the overflow
scenario's spool never overflowed (N under ~400 cannot fill the smallest cap the config accepts).
Each scenario runs in its own /tmp/faults-<scenario>-* folder: removed when it passed, kept (its path on
stderr) when it failed, so that its logs can be read; --keep keeps them all.

    scripts/faults.py [--n 10000] [--outage 30] [--keepalive 4] [--only broker_sigterm,...]
    scripts/faults.py --quick        # every scenario, N=600, 4 s outages: a few minutes; prints a table
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from broker import Broker, Watcher  # noqa: E402

QUICK: dict[str, Any] = {"n": 600, "rate": 60, "outage": 4.0, "keepalive": 2, "finish_timeout": 40.0}
"""`--quick`: every scenario in a few minutes on 2 cores (the full run's figures need the defaults)."""

ROW_BYTES = 214
"""About what one result of the scenarios' stream takes in the spool (payload bytes, measured)."""
MIN_SPOOL_CAP = 64 * 1024
"""The smallest `[spool] cap_bytes` the config accepts."""

SCENARIOS = ("baseline", "broker_sigterm", "broker_sigkill", "broker_sigstop", "proxy_blackhole", "proxy_reset",
             "agent_sigkill_broker_down", "spool_overflow")


class Proxy:
    """A TCP relay 127.0.0.1:port → broker that can stop forwarding (blackhole) or reset every connection."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self.conns: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        self.flowing.wait()  # a blackhole also swallows new connections
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self.lock:
            self.conns.append((client, upstream))
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def blackhole(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.reset()  # what was blackholed is dead on both ends by now
        self.flowing.set()

    def reset(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for pair in conns:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.close()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        self.reset()


def agent_config(tmp: Path, port: int, n: int, rate: int, keepalive: int, spool_cap: int | None) -> Path:
    cap = f"cap_bytes = {spool_cap}" if spool_cap else ""
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
device_id = "faults"
state_dir = "{tmp / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
keepalive_s = {keepalive}
connect_timeout_s = {keepalive}
[spool]
{cap}
[profile]
max_fps = 240
threads = 1
[[pipelines]]
name = "stream"
source = "test:colors"
model = "{ROOT / 'tests' / 'fixtures' / 'colors_int8.json'}"
threshold = 0.0
[pipelines.source_options]
fps = {rate}
hold = 1
count = {n}
width = 32
height = 32
[pipelines.policy]
on_change = false
max_rate = 1000
max_results = 1
""")
    return path


class Run:
    """One scenario: broker, proxy, subscriber, agent, spool sampler."""

    def __init__(self, tmp: Path, args: argparse.Namespace, spool_cap: int | None = None) -> None:
        self.tmp = tmp
        self.args = args
        self.broker = Broker(tmp / "broker", persistence=True).start()
        self.proxy = Proxy(self.broker.port)
        self.config = agent_config(tmp, self.proxy.port, args.n, args.rate, args.keepalive, spool_cap)
        self.spool = tmp / "state" / "spool.sqlite3"
        self.log = tmp / "agent.log"
        self.sub = self._subscriber()
        self.births: list[tuple[float, int]] = []
        self.status = self._status_watch()
        self.agent: subprocess.Popen[bytes] | None = None
        self.peak_bytes = 0
        self.peak_file = 0
        self.sampling = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _subscriber(self) -> Watcher:
        w = Watcher(self.broker.port, ["lepton/faults/results/#"], client_id="faults-durable", clean=False)
        w.client.reconnect_delay_set(1, 1)
        return w.start()

    def _status_watch(self) -> Watcher:
        w = Watcher(self.broker.port, ["lepton/faults/status"], client_id="faults-status")
        w.client.reconnect_delay_set(1, 1)
        return w.start()

    def start_agent(self) -> None:
        with self.log.open("ab") as log:
            self.agent = subprocess.Popen([sys.executable, "-m", "agent", "-v", "run", "--config", str(self.config)],
                                          cwd=ROOT, stdout=log, stderr=log)

    def received(self) -> list[int]:
        with self.sub.cond:
            return [json.loads(p)["seq"] for t, p, _ in self.sub.messages]

    def wait_received(self, count: int, timeout: float = 120) -> None:
        self.sub.wait_for(lambda m: len(m) >= count, timeout)

    def spool_state(self) -> tuple[int, int, int, int]:
        """(rows, payload bytes, dropped, last seq) read from the agent's spool file."""
        try:
            with contextlib.closing(sqlite3.connect(self.spool, timeout=5)) as db:
                rows, size = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM results").fetchone()
                counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        except sqlite3.Error:
            return 0, 0, 0, 0
        return int(rows), int(size), int(counters.get("dropped", 0)), int(counters.get("seq:stream", 0))

    def _sample(self) -> None:
        while not self.sampling.wait(0.2):
            if self.spool.exists():
                _, size, _, _ = self.spool_state()
                self.peak_bytes = max(self.peak_bytes, size)
                wal = self.spool.with_name(self.spool.name + "-wal")
                files = self.spool.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
                self.peak_file = max(self.peak_file, files)

    def online_after(self, since: float, timeout: float = 180) -> float | None:
        """Seconds from `since` (wall) to the agent's next `online` status published after it. Retained copies
        count: the watcher's own connection may have died with the broker and come back after the agent's
        birth, which it then receives retained (its `ts` says when the agent published it)."""
        ok = self.status.wait_for(lambda m: any(json.loads(p).get("state") == "online" and
                                                json.loads(p)["ts"] >= since for _, p, _ in m if p),
                                  timeout)
        if not ok:
            return None
        times = [json.loads(p)["ts"] for _, p, _ in self.status.messages
                 if p and json.loads(p).get("state") == "online" and json.loads(p)["ts"] >= since]
        return round(min(times) - since, 3)

    def hold_until_overflow(self, at_least: float, timeout: float) -> float:
        """Keep the broker away for `at_least` s and then until the spool drops a result (what the overflow
        scenario is about), the stream ends, or `timeout`; returns how long that was."""
        started = time.monotonic()
        waiting = threading.Event()
        last, moved = -1, started
        while time.monotonic() - started < timeout and not waiting.wait(0.2):
            _, _, dropped, seq = self.spool_state()
            if seq != last:
                last, moved = seq, time.monotonic()
            if time.monotonic() - started >= at_least and (dropped > 0 or time.monotonic() - moved > 3):
                break
        return round(time.monotonic() - started, 3)

    def dropped_link_after(self, since: float) -> float | None:
        """Seconds from `since` to the agent's log saying it dropped an unanswering connection."""
        pattern = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*no answer from the broker")
        for line in self.log.read_text(errors="replace").splitlines():
            m = pattern.match(line)
            if m:
                t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if t >= since:
                    return round(t - since, 3)
        return None

    def finish(self, expected_last: int, timeout: float = 300) -> dict[str, Any]:
        """Wait until the agent has nothing left to send, stop it, and count."""
        deadline = time.monotonic() + timeout
        done = threading.Event()
        progress, quiet_since = None, time.monotonic()
        while time.monotonic() < deadline:
            rows, _, dropped, last = self.spool_state()
            now_progress = (last, len(self.received()))
            if now_progress != progress:
                progress, quiet_since = now_progress, time.monotonic()
            # The fps limit may skip frames, so the stream's length is known only when seq stops moving.
            quiet = time.monotonic() - quiet_since
            if rows == 0 and last >= min(expected_last, 1) and quiet > 3 and \
                    len(set(self.received())) + dropped >= last:
                break
            if rows == 0 and quiet > 10:
                break  # the stream has ended and the spool is empty; what is missing is not coming
            if self.agent is not None and self.agent.poll() is not None:
                break
            done.wait(0.5)
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            self.agent.wait(20)
        self.sub.wait_for(lambda m: False, 1.0)  # let the last deliveries land
        rows, _, dropped, last = self.spool_state()
        seqs = self.received()
        distinct = set(seqs)
        first: list[int] = []
        seen: set[int] = set()
        for s in seqs:
            if s not in seen:
                seen.add(s)
                first.append(s)
        inversions = sum(1 for a, b in itertools.pairwise(first) if b < a)
        missing = last - len(distinct & set(range(1, last + 1)))
        # Rows still in the spool were never acknowledged; the others the broker acknowledged
        # (rows leave the spool only on PUBACK) or the cap dropped (counted).
        lost = rows
        return {
            "results": last,
            "received": len(distinct),
            "lost": lost,
            "lost_by_broker": max(0, missing - dropped - rows),
            "dropped_by_spool": dropped,
            "duplicates": len(seqs) - len(distinct),
            "order_inversions": inversions,
            "peak_spool_bytes": self.peak_bytes,
            "peak_spool_file_bytes": self.peak_file,
        }

    def close(self) -> None:
        self.sampling.set()
        if self.agent is not None and self.agent.poll() is None:
            self.agent.kill()
        for w in (self.sub, self.status):
            with contextlib.suppress(Exception):
                w.stop()
        self.proxy.close()
        self.broker.stop()


def scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One scenario in its own folder (under $TMPDIR): removed when the scenario passed, kept with its path on
    stderr when it failed (the agent's log, its spool, the broker's) or with --keep."""
    tmp = Path(tempfile.mkdtemp(prefix=f"faults-{name}-"))
    failed = True
    try:
        result = _scenario(name, args, tmp)
        failed = bool(verdict([result]))
        return result
    finally:
        if failed or args.keep:
            print(f"faults: {name}{' failed' if failed else ''}: its folder is kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _scenario(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cap = spool_cap(args.n) if name == "spool_overflow" else None
    run = Run(tmp, args, spool_cap=cap)
    extra: dict[str, Any] = {}
    k = args.keepalive
    expected = args.n
    try:
        run.start_agent()
        run.wait_received(max(1, min(2000, args.n // 5)), timeout=args.finish_timeout)
        if name == "spool_overflow":
            extra["spool_cap_bytes"] = cap
            run.broker.stop()
            extra["outage_s"] = run.hold_until_overflow(args.outage, timeout=args.finish_timeout)
            back = time.time()
            run.broker.start()
            extra["reconnect_s"] = run.online_after(back, timeout=args.finish_timeout)
        elif name in ("broker_sigterm", "broker_sigkill"):
            (run.broker.stop if name != "broker_sigkill" else run.broker.kill)()
            pause = threading.Event()
            pause.wait(args.outage)
            back = time.time()
            run.broker.start()
            extra["reconnect_s"] = run.online_after(back, timeout=args.finish_timeout)
        elif name == "broker_sigstop":
            frozen = time.time()
            run.broker.freeze()
            threading.Event().wait(3 * k)
            back = time.time()
            run.broker.thaw()
            extra["half_open_detect_s"] = run.dropped_link_after(frozen)
            extra["reconnect_s"] = run.online_after(back, timeout=args.finish_timeout)
        elif name == "proxy_blackhole":
            dark = time.time()
            run.proxy.blackhole()
            threading.Event().wait(3 * k)
            back = time.time()
            run.proxy.heal()
            extra["half_open_detect_s"] = run.dropped_link_after(dark)
            extra["reconnect_s"] = run.online_after(back, timeout=args.finish_timeout)
        elif name == "proxy_reset":
            back = time.time()
            run.proxy.reset()
            extra["reconnect_s"] = run.online_after(back, timeout=args.finish_timeout)
        elif name == "agent_sigkill_broker_down":
            run.broker.stop()
            # Some rows spooled while the broker is away, then the kill; bounded by N and by time, since a
            # short stream may end before that many rows pile up.
            before = run.spool_state()[0]
            want = before + max(1, min(500, args.n // 4))
            waiting, deadline = threading.Event(), time.monotonic() + max(10.0, 3 * args.outage)
            while run.spool_state()[0] < want and time.monotonic() < deadline and not waiting.wait(0.1):
                pass
            assert run.agent is not None
            run.agent.send_signal(signal.SIGKILL)
            run.agent.wait(10)
            extra["spooled_at_kill"] = run.spool_state()[0]
            expected = run.spool_state()[3] + args.n  # the restarted source streams N again
            back = time.time()
            run.broker.start()
            run.start_agent()
            extra["reconnect_s"] = run.online_after(back, timeout=args.finish_timeout)
        result = run.finish(expected, timeout=args.finish_timeout)
    finally:
        run.close()
    return {"scenario": name, **result, **extra}


def spool_cap(n: int) -> int:
    """The overflow scenario's spool cap: a quarter of what its N results take, so that holding the broker
    away overflows it whatever N (not below the config's minimum: N under ~400 cannot overflow it)."""
    return max(MIN_SPOOL_CAP, n * ROW_BYTES // 4)


def verdict(scenarios: list[dict[str, Any]]) -> list[str]:
    """What the run claims and did not hold: results streamed, nothing lost, nothing reordered, the overflow
    scenario overflowed."""
    problems = [f"{s['scenario']}: no result was streamed (the agent's log says why)" for s in scenarios
                if not s["results"]]
    problems += [f"{s['scenario']}: {s[key]} {key.replace('_', ' ')}" for s in scenarios
                for key in ("lost", "order_inversions") if s[key]]
    problems += [f"spool_overflow: the spool never overflowed (cap {s['spool_cap_bytes']} bytes, "
                 f"{s['results']} results); a larger --n overflows it"
                 for s in scenarios if s["scenario"] == "spool_overflow" and not s["dropped_by_spool"]]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="results per scenario (default 10000)")
    parser.add_argument("--rate", type=int, default=240, help="results per second the pipeline makes (max 240)")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the broker stays down (default 30)")
    parser.add_argument("--keepalive", type=int, default=4, help="agent keepalive in seconds (default 4)")
    parser.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true",
                        help="every scenario with small N and short outages (" +
                             " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in QUICK.items()) + "): minutes")
    parser.add_argument("--keep", action="store_true",
                        help="keep every scenario's folder (default: only a failed scenario's, its path on stderr)")
    parser.add_argument("--finish-timeout", type=float, default=300.0,
                        help="longest wait for the stream and the spool to drain, per scenario (default 300)")
    args = parser.parse_args()
    if args.n < 1 or args.outage < 0 or args.keepalive < 2 or not 1 <= args.rate <= 240:
        print("faults: --n must be >= 1, --keepalive >= 2 (the agent's minimum), --outage >= 0, --rate 1..240",
              file=sys.stderr)
        return 2
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    chosen = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [c for c in chosen if c not in SCENARIOS]
    if unknown:
        print(f"faults: unknown scenario {', '.join(unknown)} (known: {', '.join(SCENARIOS)})", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"n": args.n, "rate": args.rate, "outage_s": args.outage, "keepalive_s": args.keepalive,
                              "targets": {"lost": 0, "order_inversions": 0, "reconnect_s": "<= 2",
                                          "half_open_detect_s": f"<= {1.5 * args.keepalive:g}"},
                              "scenarios": []}
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    started = time.monotonic()
    for name in chosen:
        print(f"faults: {name}", file=sys.stderr, flush=True)
        report["scenarios"].append(scenario(name, args))
        print(table(report["scenarios"][-1:], header=len(report["scenarios"]) == 1), file=sys.stderr, flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    problems = verdict(report["scenarios"])
    report["problems"] = problems
    print(json.dumps(report, indent=2))
    print(table(report["scenarios"]), file=sys.stderr)
    for problem in problems:
        print(f"faults: {problem}", file=sys.stderr)
    if not problems:
        print("faults: 0 lost and 0 order inversions in every scenario" +
              ("; the spool overflowed and counted what it dropped" if "spool_overflow" in chosen else ""),
              file=sys.stderr)
    return 1 if problems else 0


COLUMNS = ("scenario", "results", "received", "lost", "lost_by_broker", "dropped_by_spool", "duplicates",
           "order_inversions", "reconnect_s", "half_open_detect_s", "outage_s")


def table(rows: list[dict[str, Any]], header: bool = True) -> str:
    """The scenarios as a fixed-width text table (the JSON on stdout has every figure)."""
    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    widths = [max(len(c), 24 if c == "scenario" else 0) for c in COLUMNS]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(COLUMNS, widths, strict=True)))]
    for r in rows:
        lines.append("  ".join(cell(r.get(c)).rjust(w) if i else cell(r.get(c)).ljust(w)
                               for i, (c, w) in enumerate(zip(COLUMNS, widths, strict=True))))
    return "\n".join(lines if header else lines[1:])


if __name__ == "__main__":
    sys.exit(main())
