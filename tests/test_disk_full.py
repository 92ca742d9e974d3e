"""Issue 12, fault 3: a full disk (here a real 4 MiB tmpfs) is an error reported and survived, in the
model store during probation, the command record and the result spool; when space returns the work
goes on by itself. Needs root to mount; skipped with the reason where mounting is impossible."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, Watcher
from delivery_kit import Keys, StateWatch
from test_daemon import Daemon, fleet, write_config
from test_delivery_activation import _image, _setup

from agent.delivery.activation import PipelineHealth, ProbationSettings
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.service import PipelineHooks
from agent.delivery.store import ModelStore
from agent.mqtt.client import PahoLink


class SmallDisk:
    """A real filesystem of its own that can be filled to the last byte and freed again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        with self.filler.open("ab", buffering=0) as fh:
            for block in (1 << 16, 4096, 512, 1):
                try:
                    while True:
                        fh.write(b"\0" * block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        with pytest.raises(OSError), (self.path / "probe").open("wb", buffering=0) as fh:
            fh.write(b"x" * 4096)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        (self.path / "probe").unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield SmallDisk(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_in_probation_rolls_back_and_the_worker_goes_on(link: PahoLink, keys: Keys, small_disk: SmallDisk,
                                                                  backend: str) -> None:
    svc, pipeline, topics = _setup(link, keys, small_disk.path, backend, [_image("red_1")],
                                   ProbationSettings(window_s=1.0, poll_s=0.05))
    polls: list[int] = []

    def health() -> PipelineHealth:
        polls.append(1)
        if len(polls) == 2:  # the first poll inside the probation window (the first is the baseline)
            small_disk.fill()
        return pipeline.health()

    hooks = pipeline.hooks()
    svc.hooks = lambda name: PipelineHooks(swap=hooks.swap, health=health, fit=hooks.fit) if name == "colors" else None
    watch = StateWatch(link, topics, "dev1")
    svc.start()
    try:
        pipeline.wait_items(3)
        svc.submit_deploy({"model": "colors", "version": 2, "id": "full"})
        final = watch.wait_terminal(2)
        assert (final["state"], final["reason"], final["active"]) == ("rolled_back", "storage", 1), final
        assert svc._thread is not None and svc._thread.is_alive()  # no "Exception in thread delivery"
        assert svc.store.slot("colors").trial is None and svc.store.active("colors").version == 1
        pipeline.wait_items(3)
        assert pipeline.version == 1  # what runs is what the store says
        with pytest.raises(DeliveryError) as refused:  # a deploy now is refused, and says why
            svc.submit_deploy({"model": "colors", "version": 2, "id": "still-full"})
        assert refused.value.reason is Reason.STORAGE

        small_disk.free()
        svc.submit_deploy({"model": "colors", "version": 2, "id": "room-again"})
        again = watch.wait_for("active", 2)
        assert again["id"] == "room-again"
    finally:
        svc.stop.set()
        svc.join(5)
        pipeline.close()
    on_disk = ModelStore(small_disk.path / "store")
    assert on_disk.active("colors").version == 2 and on_disk.slot("colors").trial is None  # type: ignore[union-attr]
    assert on_disk.pending() == {} and on_disk.selftest_marker() is None


def test_daemon_answers_commands_and_keeps_running_on_a_full_disk(tmp_path: Path, broker: Broker, fixtures: Path,
                                                                  small_disk: SmallDisk) -> None:
    device = "disk-full"
    config = write_config(tmp_path, broker.port, fixtures, device=device, fps=30, hold=1)
    config.write_text(config.read_text().replace(str(tmp_path / "state"), str(small_disk.path / "state")))
    with Watcher(broker.port, [f"lepton/{device}/#"]) as w, Daemon(config) as daemon:
        w.wait_json("/results/colors", lambda m: len(m) >= 2, timeout=60)
        small_disk.fill()

        def spool(status: dict[str, Any]) -> dict[str, Any]:
            return dict(status["result"]["spool"])

        # Results are dropped and counted while the disk is full; commands are still claimed and answered.
        dropped = 0
        for i in range(60):
            rc, (status,) = fleet(broker.port, "cmd", device, "status", "--id", f"full-{i}")
            assert rc == 0 and status["ok"], status
            dropped = spool(status)["dropped"]
            if dropped:
                break
        assert dropped > 0
        rc, (repeat,) = fleet(broker.port, "cmd", device, "ping", "--id", "full-0")
        assert rc == 0 and "spool" in repeat["result"]  # a repeated id is recognised: the status reply it got

        small_disk.free()
        seen = max(json.loads(p)["seq"] for t, p, _ in w.messages if t.endswith("/results/colors"))
        w.wait_json("/results/colors", lambda m: max(r["seq"] for r in m) > seen + 3, timeout=60)
        rc, (pong,) = fleet(broker.port, "cmd", device, "ping")
        assert rc == 0 and pong["ok"]
        assert daemon.terminate(signal.SIGTERM) == 0
    log = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in log
    assert "cannot write" in log and "writable again" in log
