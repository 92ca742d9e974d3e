"""Issue 12, fault 12: a corrupt state file (the result spool, the command record, the model store's
index) costs one warning line naming it, the file moved aside as `<name>.corrupt-<ts>`, and a
start on a new one; never a traceback and an agent that cannot start. Each case runs the real
`lepton-agent run` against a real mosquitto."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import Broker, Watcher
from test_daemon import Daemon, fleet, write_config

from agent.agent_state import AgentState
from agent.delivery.store import ModelStore
from agent.mqtt.spool import Spool


def _spool(state: Path) -> Path:
    """A real spool with rows in it, then a page in the middle of its table overwritten."""
    path = state / "spool.sqlite3"
    spool = Spool(path, 10_000_000)
    for i in range(300):
        spool.append("colors", "lepton/dev1/results/colors", {"n": i, "pad": "x" * 100})
    spool.close()
    data = bytearray(path.read_bytes())
    data[3 * 4096 : 3 * 4096 + 256] = b"\xff" * 256
    path.write_bytes(bytes(data))
    return path


def _command_record(state: Path) -> Path:
    """A real command record whose header was overwritten (SQLite: "file is not a database")."""
    path = state / "agent.sqlite3"
    record = AgentState(path)
    record.claim_command("before")
    record.close()
    data = bytearray(path.read_bytes())
    data[:16] = b"not sqlite at all"[:16]
    path.write_bytes(bytes(data))
    return path


def _index(state: Path) -> Path:
    """The store's index cut off half way (a torn write on a card that lied about its flush)."""
    store = ModelStore(state / "models")
    store._index["pending"]["deploy-1"] = {"model": "colors", "version": 2, "id": "deploy-1"}
    store._write_index()
    path = state / "models" / "index.json"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


@pytest.mark.parametrize("corrupt", [_spool, _command_record, _index], ids=["spool", "command_record", "index"])
def test_corrupt_state_file_is_moved_aside_and_the_agent_starts(
        tmp_path: Path, broker: Broker, fixtures: Path, corrupt: Callable[[Path], Path]) -> None:
    device = f"corrupt-{corrupt.__name__.strip('_')}"
    config = write_config(tmp_path, broker.port, fixtures, device=device)
    state = tmp_path / "state"
    state.mkdir()
    path = corrupt(state)
    damaged = path.read_bytes()
    with Watcher(broker.port, [f"lepton/{device}/#"]) as w, Daemon(config) as daemon:
        w.wait_json("/results/colors", lambda m: len(m) >= 2, timeout=60)
        rc, (pong,) = fleet(broker.port, "cmd", device, "ping")
        assert rc == 0 and pong["ok"]
        assert daemon.terminate(signal.SIGTERM) == 0
    log = (tmp_path / "agent.log").read_text()
    warnings = [line for line in log.splitlines() if "is corrupt" in line]
    assert len(warnings) == 1, log
    assert " WARNING " in warnings[0] and str(path) in warnings[0] and "lost:" in warnings[0]
    (moved,) = path.parent.glob(f"{path.name}.corrupt-*")
    assert moved.name in warnings[0]
    assert moved.read_bytes() == damaged  # kept as it was, for a post-mortem
    assert path.exists() and path.read_bytes() != damaged  # a new one, in use
    assert "Traceback" not in log
