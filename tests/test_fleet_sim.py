"""scripts/fleet_sim.py: virtual devices spread over worker processes, every one counted once, a dead worker a
clear failure (never a hang), and the benchmark's JSON with the devices in two processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Broker
from conftest import FIXTURES, ROOT, run_cli
from delivery_kit import unique_prefix

SIM = ROOT / "scripts" / "fleet_sim.py"


class Sim:
    """fleet_sim.py running a fleet on a broker; its stderr lines as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(SIM), *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line.rstrip("\n"))
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, text: str, timeout: float = 120) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, f"fleet_sim ended before saying {text!r}:\n" + "\n".join(self.err)
            if text in line:
                return line

    def workers(self) -> dict[int, int]:
        """The worker processes: {first device index: pid} (their command lines say which slice)."""
        out = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for pid in map(int, (task / "children").read_text().split()):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                if "--first" in argv:
                    out[int(argv[argv.index("--first") + 1])] = pid
        return out

    def end(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout)
        # The reader has seen the end of stderr once it queued None.
        while self.lines.get(timeout=timeout) is not None:
            pass
        return rc


@pytest.fixture
def sim_broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


def fleet(*args: str) -> list[dict[str, object]]:
    r = run_cli(*args, prog="fleet")
    assert r.rc == 0, r.err
    return [json.loads(line) for line in r.out.splitlines() if line.strip()]


def test_every_workers_devices_are_online_once_and_answer(sim_broker: Broker) -> None:
    prefix = unique_prefix()
    sim = Sim("--broker", str(sim_broker.url), "--prefix", prefix, "-n", "6", "--procs", "3")
    try:
        sim.wait_line("online")
        assert sorted(sim.workers()) == [0, 2, 4]  # three workers, two ids each
        url = ["--broker", str(sim_broker.url), "--prefix", prefix]
        rows = fleet("status", "--format", "json", "--settle", "3", *url)
        ids = [f"sim-{i:04d}" for i in range(6)]
        assert sorted(str(r["device"]) for r in rows) == ids
        assert all(r.get("presence") == "yes" for r in rows), rows
        replies = fleet("cmd", "group:sim", "ping", "--timeout", "5", "--format", "json", *url)
        assert sorted(str(r["device"]) for r in replies) == ids
        assert all(r["ok"] for r in replies), replies
        workers = sim.workers()
    finally:
        sim.proc.send_signal(signal.SIGINT)
    assert sim.end() == 0, "\n".join(sim.err)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers.values())


def test_a_killed_worker_fails_the_run_with_one_line_naming_it(sim_broker: Broker) -> None:
    sim = Sim("--broker", str(sim_broker.url), "--prefix", unique_prefix(), "-n", "4", "--procs", "2")
    try:
        sim.wait_line("online")
        workers = sim.workers()
        victim = workers[2]
        os.kill(victim, signal.SIGKILL)
        assert sim.end() == 1, "\n".join(sim.err)
    finally:
        if sim.proc.poll() is None:
            sim.proc.kill()
    said = [line for line in sim.err if line.startswith("fleet_sim:")]
    assert said == [f"fleet_sim: worker 1 (devices sim-0002..sim-0003, pid {victim}) died: "
                    "killed by signal 9 (SIGKILL)"], sim.err
    assert not any("Traceback" in line for line in sim.err), sim.err
    assert not Path(f"/proc/{workers[0]}").exists(), "the other worker was left running"


@pytest.mark.parametrize("args, says", [
    (["--procs", "0"], "fleet_sim: -n and --procs must be at least 1"),
    (["-n", "0"], "fleet_sim: -n and --procs must be at least 1"),
    (["--broker", "localhost:1883"], "fleet_sim: --broker: 'localhost:1883': scheme must be mqtt:// or mqtts://"),
    (["--prefix", "a/b"], "fleet_sim: --prefix: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'"),
    (["--bench", "--model", "/nonexistent/model.tflite"],
     "fleet_sim: no model file at /nonexistent/model.tflite (--model)"),
])
def test_bad_arguments_say_so_in_one_line(args: list[str], says: str) -> None:
    r = subprocess.run([sys.executable, str(SIM), *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       check=False)
    assert (r.returncode, r.stderr.strip().splitlines()) == (2, [says])


@pytest.mark.slow
def test_the_benchmark_with_two_worker_processes_counts_every_device() -> None:
    """The benchmark's JSON contract (docs/scale.md) with the fleet in two processes: every figure counts all
    four devices once, and what the workers say their devices did agrees with what the broker carried."""
    r = subprocess.run([sys.executable, str(SIM), "--bench", "-n", "4", "--procs", "2", "--model",
                        str(FIXTURES / "colors_int8.tflite")], capture_output=True, text=True, cwd=ROOT,
                       timeout=280, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["devices"] == 4 and out["online_s"] >= 0
    assert (out["status"]["devices_listed"], out["status"]["online"]) == (4, 4)
    assert out["group_cmd"]["replies"] == 4
    deploy = out["deploy"]
    assert (deploy["active_and_verified"], deploy["failed"]) == (4, 0), deploy
    assert deploy["broker_bytes_sent"]["broker"] >= deploy["ideal_bytes"] == 4 * deploy["model_bytes"]
    assert out["mosquitto_pub_per_device"]["received"] == 4 or "skipped" in out["mosquitto_pub_per_device"]
    sim = out["sim"]
    assert (sim["procs"], sim["closed"], sim["devices"], sim["active"], sim["failed"]) == (2, 2, 4, 4, 0), sim
    assert (sim["reconnects"], sim["half_open"]) == (0, 0), sim
    assert len(sim["max_rss_mb"]) == 2
    assert "fleet_sim: 4 devices in 2 processes online in" in r.stderr


def test_a_worker_killed_during_the_benchmark_ends_it_at_once_broker_stopped() -> None:
    """The benchmark waits for ten seconds of a steady fleet, then for tools and the deploy: a worker's death cuts
    any of those waits short (never a 15-minute deploy wait), and the broker it started is stopped."""
    sim = Sim("--bench", "-n", "4", "--procs", "2", "--model", str(FIXTURES / "colors_int8.tflite"))
    try:
        sim.wait_line("online")
        children = {}
        for task in Path(f"/proc/{sim.proc.pid}/task").iterdir():
            for pid in map(int, (task / "children").read_text().split()):
                children[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        brokers = [pid for pid, name in children.items() if name == "mosquitto"]
        assert len(brokers) == 1, children
        victim = sim.workers()[0]
        os.kill(victim, signal.SIGKILL)
        assert sim.end(timeout=60) == 1, "\n".join(sim.err)
    finally:
        if sim.proc.poll() is None:
            sim.proc.kill()
    said = [line for line in sim.err if line.startswith("fleet_sim:") and "online" not in line]
    assert said == [f"fleet_sim: worker 0 (devices sim-0000..sim-0001, pid {victim}) died: "
                    "killed by signal 9 (SIGKILL)"], sim.err
    assert not any("Traceback" in line for line in sim.err), sim.err
    assert not Path(f"/proc/{brokers[0]}").exists(), "the benchmark's broker outlived it"
