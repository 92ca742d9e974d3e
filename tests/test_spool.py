"""The store-and-forward spool: order, per-pipeline seq across restarts, the byte cap, kills."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from agent.mqtt.spool import Spool


def _payloads(spool: Spool) -> list[dict]:
    return [json.loads(r.payload) for r in spool.pending(0, 100000)]


def test_rows_keep_order_and_seq_per_pipeline(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 1 << 20)
    for i in range(5):
        spool.append("a", "t/a", {"i": i})
        spool.append("b", "t/b", {"i": i})
    rows = spool.pending(0, 100)
    assert [r.pipeline for r in rows] == ["a", "b"] * 5
    assert [r.seq for r in rows if r.pipeline == "a"] == [1, 2, 3, 4, 5]
    assert [json.loads(r.payload)["seq"] for r in rows if r.pipeline == "b"] == [1, 2, 3, 4, 5]
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert spool.pending(rows[3].id, 2) == rows[4:6]


def test_ack_removes_and_seq_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 1 << 20)
    for i in range(4):
        spool.append("a", "t/a", {"i": i})
    rows = spool.pending(0, 10)
    assert spool.ack([rows[0].id, rows[1].id, 999999]) == 2
    assert spool.stats().queued == 2
    spool.close()
    again = Spool(tmp_path / "s.db", 1 << 20)
    assert [p["i"] for p in _payloads(again)] == [2, 3]
    assert again.append("a", "t/a", {"i": 4}) == 5  # seq goes on, never restarts at 1
    assert again.stats().queued == 3


def test_historical_marker() -> None:
    from agent.mqtt.spool import SpooledResult

    row = SpooledResult(1, "a", 1, "t", '{"seq":1,"x":2}')
    assert json.loads(row.body(historical=True)) == {"seq": 1, "x": 2, "historical": True}
    assert json.loads(row.body(historical=False)) == {"seq": 1, "x": 2}


def test_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    cap = 64 * 1024
    spool = Spool(tmp_path / "s.db", cap)
    blob = "x" * 1000
    for i in range(200):
        spool.append("a", "t/a", {"i": i, "blob": blob})
    stats = spool.stats()
    assert stats.bytes <= cap
    assert stats.dropped > 0 and stats.queued + stats.dropped == 200
    kept = [p["i"] for p in _payloads(spool)]
    assert kept == list(range(200 - len(kept), 200))  # the newest survive, in order
    spool.close()
    assert Spool(tmp_path / "s.db", cap).stats().dropped == stats.dropped  # the count is persisted


_WRITER = """
import sys
from pathlib import Path
from agent.mqtt.spool import Spool
spool = Spool(Path(sys.argv[1]), 1 << 24)
for i in range(1_000_000):
    spool.append("a", "t/a", {"i": i})
    if i == 500:
        print("ready", flush=True)
"""


def test_survives_sigkill_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    spool = Spool(path, 1 << 24)
    got = [p["i"] for p in _payloads(spool)]
    assert len(got) > 500
    assert got == list(range(len(got)))  # every committed row, in order, none torn
    assert [r.seq for r in spool.pending(0, 10)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert spool.append("a", "t/a", {"i": -1}) == len(got) + 1
