"""SIGKILL the device mid-delivery (at byte offsets and at named points), restart it, check the store.

After every kill: every file in the store hashes to its name (never a partial
file), and the active model is the old one, or the new one only if its file was
renamed into the store. After every restart the download resumes from the first
chunk that is not whole on disk.
"""

from __future__ import annotations

import json
import queue
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker
from delivery_kit import (
    FIXTURES,
    Keys,
    StateWatch,
    connect,
    new_keys,
    publish,
    service,
    store_files_are_whole,
    unique_prefix,
)

from agent.delivery.service import DeployRequest
from agent.delivery.store import ModelStore
from agent.mqtt.topics import FleetTopics

WORKER = Path(__file__).resolve().parent / "delivery_worker.py"
CHUNK = 4096
NEW = FIXTURES / "shapes_int8.json"  # 36560 bytes: 9 chunks, the last one short
N = (FIXTURES / "shapes_int8.tflite").stat().st_size


class WorkerServer:
    """`delivery_worker.py --serve`: one import, then a forked device process per run."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def run(self, argv: list[str], timeout: float = 120.0) -> tuple[int, list[dict[str, Any]]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        out: list[dict[str, Any]] = []
        while True:
            line = self.lines.get(timeout=timeout)
            if not line:
                raise AssertionError("the worker server ended")
            if line.startswith("{"):
                data = json.loads(line)
                if set(data) == {"exit"}:
                    return int(data["exit"]), out
                out.append(data)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerServer]:
    server = WorkerServer()
    yield server
    server.close()


class Device:
    """A store with v1 active and v2 published, and the worker command that deploys v2."""

    def __init__(self, broker: Broker, tmp: Path, backend: str, worker: WorkerServer) -> None:
        self.worker = worker
        self.keys: Keys = new_keys()
        self.topics = FleetTopics(unique_prefix())
        self.store_dir = tmp / "store"
        with connect(broker.port) as link:
            publish(link, self.topics, FIXTURES / "colors_int8.json", "kt", 1, self.keys, chunk_size=CHUNK)
            self.new = publish(link, self.topics, NEW, "kt", 2, self.keys, chunk_size=CHUNK)
            svc = service(link, self.store_dir, self.keys, self.topics, backend)
            assert svc.deploy(DeployRequest("kt", 1)).state.value == "active"
            old = svc.store.active("kt")
            assert old is not None
            self.old_sha = old.sha256
        self.new_sha = self.new.manifest["sha256"]
        self.port = broker.port

    def run(self, *extra: str) -> tuple[int, list[dict[str, Any]]]:
        argv = [str(self.port), self.topics.prefix, str(self.store_dir), json.dumps(self.keys.table), "kt", "2",
                *extra]
        rc, lines = self.worker.run(argv)
        if rc not in (0, -signal.SIGKILL):
            raise AssertionError(f"worker exited {rc}: {lines}")
        return rc, lines

    def check(self) -> str:
        """The invariants after any kill; returns which model is active."""
        store = ModelStore(self.store_dir)
        store_files_are_whole(store)
        active = store.active("kt")
        assert active is not None
        if active.sha256 == self.new_sha:
            assert store.has_object(self.new_sha), "new model active without its file renamed in"
            return "new"
        assert active.sha256 == self.old_sha
        return "old"


def _offsets(seed: int = 6) -> list[int]:
    rng = random.Random(seed)
    fixed = {0, 1, CHUNK - 1, CHUNK, CHUNK + 1, N - 1, N}
    return sorted(fixed | {rng.randrange(2, N - 1) for _ in range(20)})


def test_kill_at_byte_offsets_then_resume(delivery_broker: Broker, tmp_path: Path, backend: str,
                                          worker: WorkerServer) -> None:
    device = Device(delivery_broker, tmp_path, backend, worker)
    previous: int | None = None
    for k in _offsets():
        rc, lines = device.run("--kill-at-byte", str(k))
        expected_first = 0 if previous is None else (previous // CHUNK) * CHUNK
        if previous == N:
            raise AssertionError("nothing is left to kill after the last byte")
        assert rc == -signal.SIGKILL, (k, lines)
        assert lines and lines[0] == {"first_write": expected_first}, (k, previous, lines)
        assert device.check() == "old", k
        part = device.store_dir / "partial" / f"{device.new_sha}.part"
        assert part.stat().st_size <= N
        previous = k
    # The last kill was after byte N: everything is on disk, the restart only re-checks and finishes.
    rc, lines = device.run()
    assert rc == 0
    final = lines[-1]
    assert final["state"] == "active" and final["version"] == 2
    assert final["download"] == {"chunks_on_disk": len(device.new.manifest["delivery"]["chunks"]),
                                 "bytes_received": 0}
    assert not [line for line in lines if "first_write" in line]
    assert device.check() == "new"
    assert not list((device.store_dir / "partial").iterdir())


@pytest.mark.parametrize(("point", "after_kill"), [
    ("after_verify", "old"),
    ("before_rename", "old"),
    ("after_rename", "old"),
    ("after_activate", "new"),
])
def test_kill_at_named_points_then_resume(point: str, after_kill: str, delivery_broker: Broker, tmp_path: Path,
                                          backend: str, worker: WorkerServer) -> None:
    device = Device(delivery_broker, tmp_path, backend, worker)
    rc, _ = device.run("--kill-at", point)
    assert rc == -signal.SIGKILL
    assert device.check() == after_kill
    store = ModelStore(device.store_dir)
    renamed = store.has_object(device.new_sha)
    assert renamed == (point in ("after_rename", "after_activate"))
    rc, lines = device.run()
    assert rc == 0
    final = lines[-1]
    assert final["state"] == "active" and final["version"] == 2, final
    if point != "after_activate":
        # Resumed, not restarted: nothing was fetched again.
        assert final["download"]["bytes_received"] == 0, final
    else:
        assert final["detail"] == "already active"
    assert device.check() == "new"
    slot = ModelStore(device.store_dir).slot("kt")
    assert slot.previous is not None and slot.previous.sha256 == device.old_sha


def test_killed_in_self_test_is_rolled_back_at_the_next_start_not_retried(
        delivery_broker: Broker, tmp_path: Path, backend: str, worker: WorkerServer) -> None:
    """Issue 12, fault 1: the process dies in the self-test (as the OOM killer does): the next start fails
    that deployment with a reason instead of resuming it into the same death at every start."""
    device = Device(delivery_broker, tmp_path, backend, worker)
    rc, _ = device.run("--kill-at", "selftest")
    assert rc == -signal.SIGKILL
    assert device.check() == "old"
    assert [e["version"] for e in ModelStore(device.store_dir).pending().values()] == [2]
    with connect(device.port) as link:
        watch = StateWatch(link, device.topics, "dev1")
        svc = service(link, device.store_dir, device.keys, device.topics, backend)
        svc.stop.set()  # recover() only: nothing is resumed
        svc.start()
        final = watch.wait_terminal(2)
        svc.join(5)
    assert final["state"] == "rolled_back" and final["reason"] == "selftest_crashed" and final["active"] == 1
    store = ModelStore(device.store_dir)
    assert store.pending() == {} and store.selftest_marker() is None
    assert device.check() == "old"
    assert [s["state"] for s in watch.states if s["version"] == 2] == ["rolled_back"]  # not tried again
